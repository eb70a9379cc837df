"""Generation, written once: what every loop that turns a call's logits into tokens and text shares (no torch).

    GenerationConfig   sampling, stop tokens and strings, limits, prompt lookup, a grammar
    TokenPicker        one sequence's tokens from one call's logits: sampled or greedy within the grammar's mask,
                       prompt-lookup drafts checked and kept, stop tokens, the new-token and context limits; the
                       next call's draft: the tokens the grammar forces, then prompt-lookup tokens it accepts
    TextStream         token ids -> text deltas (tokenizers' DecodeStream: constant work per token), cut at the first
                       stop string outside a tool call, never showing text that may still turn out to be the start
                       of one
    Completion         what a finished generation reports

Loops that use them: ``Conversation.generate`` (one sequence: ``engine.complete``/``stream``, ``Agent``,
``agentopt eval``) and ``Scheduler`` (many sequences, one batched call per step: ``agentopt serve``,
``engine.generate_batch``).

A call feeds a sequence's pending token and its draft ``d`` (prompt lookup) and returns logits rows ``r``:

    fed:     pending  d[0]  d[1]        row i predicts the token after fed[i]: d[i] is kept when the row chooses it
    rows:    r[0]     r[1]  r[2]        (sample: greedy, the argmax; sampled, with the probability p(d[i]))
             -> d[0]? -> d[1]? -> new   the first token that is not the draft ends the call's tokens

With a grammar (constraints.py) the draft starts with the tokens the grammar forces (fast-forward: fed in this one
call, kept without a check, as decoding them one per call would choose them), then prompt-lookup tokens cut where
the grammar rejects one; every other row is masked to the tokens the grammar accepts before the choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from ..errors import AgentOptError
from .constraints import CALL_SYNTAXES, Grammar, Matcher
from .prompt_lookup import DraftIndex
from .sampling import sample

# Within this many tokens of a limit (max_new_tokens, the end of the context), each token chosen under a grammar is
# checked: it is kept only if what it leaves open (a call, a JSON value) can still be closed in the tokens left
# (constraints.Matcher.closing); otherwise what is open is closed instead, and the sequence ends.
CLOSE_WINDOW = 48
SHORTEST_OUTPUT_SEARCH = 256  # tokens: how far the check that a limit leaves room for a whole output looks


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    stop_strings: tuple[str, ...] = ()
    stops_skip_calls: bool = True  # stop strings are not matched inside a tool call (False: text without tools,
    # where a call's tags are only text)
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks, parity tests)
    prompt_lookup: int = 0  # > 0: check up to this many tokens drafted from the context per call (the same tokens,
    # greedy or sampled with a seed)
    grammar: Grammar | None = None  # constrained decoding: only what the grammar accepts (constraints.py)
    fast_forward: bool = True  # feed the tokens the grammar forces in one call (False: one per call, same tokens)
    whole_tool_names: bool = False  # greedy under a tool-call grammar: a call's tool name is the offered name of the
    # highest probability over all its tokens (extra engine calls; off: token by token, each the likeliest allowed;
    # on agent-tiny neither way picks the right tool more often: benchmarks/tool_choice.py)
    whole_enum_values: bool = True  # greedy under a tool-call grammar: a string argument whose schema is an enum is
    # the value of the highest probability over all its tokens (extra engine calls; off: token by token, where the
    # first tokens decide alone: on agent-tiny's long-context lookups 77% -> 96% solved, MODEL_CARD.md)

    def __post_init__(self):
        for key in ("stop_token_ids", "stop_strings"):  # lists become tuples; one stop string is not its characters
            value = getattr(self, key)
            if isinstance(value, str):
                object.__setattr__(self, key, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, key, tuple(value))
        _check_types(self)
        if self.max_new_tokens < 0:
            raise AgentOptError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise AgentOptError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature >= 0.0:  # also refuses NaN
            raise AgentOptError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise AgentOptError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.seed is not None and self.seed < 0:
            raise AgentOptError(f"seed must be >= 0, got {self.seed}")
        if self.prompt_lookup < 0:
            raise AgentOptError(f"prompt_lookup must be >= 0 (0: off), got {self.prompt_lookup}")
        if self.grammar is not None and self.ignore_eos:
            raise AgentOptError(f"ignore_eos cannot be combined with {self.grammar.what}: the grammar says where the "
                                "output may end, and ignoring the end-of-sequence token would leave it nowhere to "
                                "end; drop ignore_eos (--ignore-eos in the CLI), or for an agent task decode its calls "
                                "freely (--no-constrain)")
        if self.grammar is not None and self.grammar.whole_output and any(self.stop_strings):
            raise AgentOptError(f"stop strings cannot be combined with {self.grammar.what}: it shapes the whole "
                                "output, which a stop string could only cut short of parsing; drop the stop strings "
                                "(stop in the server's API, --stop in the CLI)")

    def with_options(self, **overrides) -> "GenerationConfig":
        """A copy with ``overrides`` (names checked: an unknown option is an error naming the known ones)."""
        unknown = set(overrides) - set(GenerationConfig.__dataclass_fields__)
        if unknown:
            raise AgentOptError(f"unknown generation option(s): {', '.join(sorted(unknown))}; "
                                f"options: {', '.join(sorted(GenerationConfig.__dataclass_fields__))}")
        return replace(self, **overrides) if overrides else self


def _check_types(config: GenerationConfig) -> None:
    """Each option of the type it must have (an AgentOptError naming it, not a TypeError deep in sampling): 2.5 new
    tokens, a string temperature or a bool seed would otherwise pass or fail far from where they were given."""
    def integer(value) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    def number(value) -> bool:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

    wrong = [(name, kind) for name, kind, ok in (
        ("max_new_tokens", "an integer", integer(config.max_new_tokens)),
        ("temperature", "a number", number(config.temperature)), ("top_p", "a number", number(config.top_p)),
        ("top_k", "an integer", integer(config.top_k)), ("prompt_lookup", "an integer", integer(config.prompt_lookup)),
        ("seed", "an integer or None", config.seed is None or integer(config.seed)),
        ("stop_token_ids", "a list of token ids or None", config.stop_token_ids is None or (
            isinstance(config.stop_token_ids, tuple) and all(integer(t) for t in config.stop_token_ids))),
        ("stop_strings", "a list of strings", isinstance(config.stop_strings, tuple)
         and all(isinstance(t, str) for t in config.stop_strings)),
        ("ignore_eos", "True or False", isinstance(config.ignore_eos, bool)),
        ("fast_forward", "True or False", isinstance(config.fast_forward, bool)),
        ("stops_skip_calls", "True or False", isinstance(config.stops_skip_calls, bool)),
        ("whole_tool_names", "True or False", isinstance(config.whole_tool_names, bool)),
        ("whole_enum_values", "True or False", isinstance(config.whole_enum_values, bool)),
        ("grammar", "a Grammar (constraints.py) or None", config.grammar is None or isinstance(config.grammar, Grammar)),
    ) if not ok]
    if wrong:
        name, kind = wrong[0]
        raise AgentOptError(f"{name} must be {kind}, got {getattr(config, name)!r}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos / stop string), "length" (max_new_tokens) or "context" (engine full)
    time_to_first_token_s: float
    decode_tokens_per_s: float


class TokenPicker:
    """The token choices of one sequence: its random stream, stop tokens, limits and prompt-lookup drafts.

    ``finish`` is None while the sequence goes on, then "stop", "length" or "context"."""

    def __init__(self, config: GenerationConfig, eos_token_ids: Sequence[int], capacity: int, tokenizer=None,
                 vocab_size: int | None = None):
        self.config, self.capacity = config, capacity
        self.stops = set() if config.ignore_eos else set(
            config.stop_token_ids if config.stop_token_ids is not None else eos_token_ids)
        self.rng = np.random.default_rng(config.seed)
        self.sampling = (config.temperature, config.top_k, config.top_p)
        self.generated = 0
        self.drafted = self.accepted = 0  # prompt-lookup tokens checked, and those the model agreed with
        self.forced = 0  # tokens the grammar forced (fed without a choice)
        self.finish: str | None = None if config.max_new_tokens else "length"
        self._drafts = DraftIndex()
        self.matcher: Matcher | None = None
        if config.grammar is not None:
            if tokenizer is None or vocab_size is None:
                raise AgentOptError("constrained decoding needs the engine's tokenizer (this engine has none)")
            self.matcher = Matcher(config.grammar, tokenizer, vocab_size, sorted(self.stops))
            self._check_room_for_an_output()
        self._forced_in_draft = 0  # the current draft's leading tokens that the grammar forced
        self._tokenizer = tokenizer
        self.ends_at_draft = False  # the current draft's forced tokens end the sequence: no call needs to feed them
        self.closed_at_limit = False  # a call (or JSON value) was closed early, the limit being too near to go on
        self._closing_hint: list[int] = []  # the last closing found near a limit: often still the closing a token on
        # a call's tool name or an enum argument's value to choose whole (set by ``pick`` where one starts under greedy
        # decoding): name (value) -> its tokens with the closing quote, and the logits row that predicts the first
        self.choice: dict[str, list[int]] | None = None
        self.choice_row: np.ndarray | None = None
        self._forced_pending = False  # take_forced appended the sequence's last tokens

    def _check_room_for_an_output(self) -> None:
        """A grammar that asks for something from the start (a required call, a JSON answer) under a new-token limit
        too small for it would only ever give a cut, unparseable output: refuse the request instead, saying so."""
        limit = self.config.max_new_tokens
        if not limit or not self.matcher.open:
            return
        shortest = self.matcher.closing(SHORTEST_OUTPUT_SEARCH)
        if shortest is None or len(shortest) <= limit:
            return  # it fits; or no way was found (free text ended by a text tag): no proof, left to the model
        raise AgentOptError(
            f"a limit of {limit} new tokens is too small for {self.config.grammar.what}: the shortest output found "
            f"takes {len(shortest)} tokens; raise the limit (max_new_tokens; --max-new-tokens in the CLI, max_tokens "
            "in the server's API)")

    def pick(self, rows: np.ndarray, draft: Sequence[int], tokens: list[int]) -> tuple[list[int], int]:
        """Choose tokens from the logits ``rows`` (L, V) of a call that fed a pending token and ``draft``, appending
        them to ``tokens`` (the sequence so far). Returns (new tokens, how many of them are drafts the model kept or
        the grammar forced: their keys and values are already cached)."""
        new: list[int] = []
        forced, self._forced_in_draft = self._forced_in_draft, 0
        self._append_forced(draft[:forced], tokens, new)  # the grammar allows nothing else (consumed when drafted)
        if self.ends_at_draft:
            self.finish, self.ends_at_draft = self.finish or "stop", False
        if self.finish:
            return new, len(new)
        lookup = draft[forced:]
        # a row per fed token (the forced ones' rows predict forced tokens: unused), or, from an engine that returns
        # one row per call (no prompt lookup there), the last fed token's row
        rows = rows[forced:] if len(rows) > forced else rows[-1:]
        # a name or value starts only after forced tokens: fed in this call, or appended by take_forced and fed since
        after_forced, self._forced_pending = forced > 0 or self._forced_pending, False
        self.choice = self._whole_choice_at(tokens) if after_forced else None
        if self.choice is not None:  # the caller scores the choices (choose_whole), then ``take_choice``
            self.choice_row = rows[0]
            self.drafted += len(lookup)
            return new, forced
        kept = forced
        for index, row in enumerate(rows[:1 + len(lookup)]):
            drafted = index < len(lookup)
            if self.matcher is not None:
                row = self.matcher.masked(row)
            token = sample(row, self.rng, *self.sampling)  # a draft is kept when it is the token sampled
            if token in self.stops:
                self.finish = "stop"
                break
            instead = None if drafted else self._fit_before_limit(token, tokens)
            if instead is not None:
                self._append_forced(instead, tokens, new)
                self.finish, self.closed_at_limit = self._limit_reason(tokens), bool(instead)
                break
            if self.matcher is not None:
                self.matcher.consume(token)
            self._append(token, tokens, new)
            kept_draft = drafted and token == lookup[index]
            kept += kept_draft
            self.accepted += kept_draft
            if self.finish or not kept_draft:
                break  # the next call feeds the last token (its KV is computed there)
        self.drafted += len(lookup)
        return new, kept

    def _whole_choice_at(self, tokens: list[int]) -> dict[str, list[int]] | None:
        """At the start of a call's tool name (``whole_tool_names``) or of a string argument whose schema is an
        ``enum`` (``whole_enum_values``), under greedy decoding: each offered name's or value's tokens (with the
        closing quote). Chosen token by token, the first token decides alone; chosen whole, the name (value) of the
        highest probability is written. Near a limit, only those after which the call can still close in time.
        None elsewhere, or where the grammar does not take a choice's own tokens."""
        grammar = self.config.grammar
        if self.config.temperature > 0 or self._tokenizer is None or not (
                grammar.names and self.config.whole_tool_names or grammar.enums and self.config.whole_enum_values):
            return None
        generated = tokens[len(tokens) - self.generated:]
        decode = lambda ids: self._tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        if not decode(generated[-10:]).endswith('": "'):
            return None  # (the last 10 tokens hold those 4 characters: the whole output is read only then)
        text = decode(generated)
        if self.config.whole_tool_names and grammar.at_name(text):
            choices = {name: self._choice_tokens(name, ('", "',)) for name in grammar.names}
        elif self.config.whole_enum_values and (values := grammar.enum_at(text)):
            choices = {value: self._choice_tokens(json.dumps(value, ensure_ascii=False)[1:-1], ('", "', '"}}'))
                       for value in values}  # (a value as JSON writes it inside quotes)
        else:
            return None
        if any(ids is None for ids in choices.values()):
            return None
        left = min(self.config.max_new_tokens - self.generated, self.capacity + 1 - len(tokens))
        if left <= CLOSE_WINDOW + max(map(len, choices.values())):  # near a limit: the choices after which the call
            # can still be closed in the tokens left (the limit's check, _fit_before_limit, for a whole choice)
            choices = {name: ids for name, ids in choices.items()
                       if len(ids) < left and self.matcher.closing(left - len(ids), after=ids) is not None}
        return choices or None

    def _choice_tokens(self, text: str, followers: tuple[str, ...]) -> list[int] | None:
        """The tokens that write ``text`` and its closing quote as the model's text has them: the tokenizer's own
        split of the text followed by what the grammar writes next (``", "`` after a name; after a value, ``", "``
        before another argument, ``"}}`` where the value ends the call), up to the token holding the quote (``add",
        "`` -> ``ad``, ``d``, ``",``; a lone ``"`` would be a split the model never saw). The first follower whose
        tokens the grammar accepts; None if none."""
        for follower in followers:
            ids, offsets = self._tokenizer.encode_with_offsets(text + follower)
            ids = [token for token, (start, _) in zip(ids, offsets) if start <= len(text)]
            if self.matcher.valid_prefix(ids) == len(ids):
                return ids
        return None

    def take_choice(self, name: str, tokens: list[int]) -> list[int]:
        """Append the chosen name's (value's) tokens (``choice[name]``) to ``tokens``; returns them."""
        ids, self.choice, self.choice_row = self.choice[name], None, None
        self.matcher.consume_all(ids)
        new: list[int] = []
        for index, token in enumerate(ids):
            self._append(token, tokens, new, grammar_caught_up=index == len(ids) - 1)
        return new

    def _fit_before_limit(self, token: int, tokens: list[int]) -> list[int] | None:
        """Near a limit: None to keep ``token``, when what it leaves open can still be closed in the tokens left
        after it (or nothing can be closed in time anyway); else what to write instead, after which the sequence
        ends with the limit's reason: the tokens that close what is open now (consumed), or none, when ``token``
        would open a call (or value) that cannot close before the limit. A call cut by a limit cannot be parsed and
        is lost; one closed early is valid for its schema (a string cut short, a missing required property given
        its shortest value)."""
        left = min(self.config.max_new_tokens - self.generated, self.capacity + 1 - len(tokens))
        if self.matcher is None or left > CLOSE_WINDOW:
            return None
        after = self.matcher.closing(left - 1, after=token, hint=self._closing_hint)
        if after is not None:
            self._closing_hint = after
            return None
        closing = self.matcher.closing(left, hint=self._closing_hint)
        if closing is None:
            return None  # what is open cannot be closed in time either (a limit below its shortest closing)
        self.matcher.consume_all(closing)
        return closing

    def _limit_reason(self, tokens: list[int]) -> str:
        return "length" if self.config.max_new_tokens - self.generated <= self.capacity + 1 - len(tokens) else \
            "context"

    def take_forced(self, tokens: list[int]) -> list[int]:
        """The tokens the grammar forces next, appended to ``tokens`` without an engine call: for a caller whose
        next call cannot check a draft (several rows on GroupQueryAttention), which feeds them later as it feeds
        prompt tokens, on the sequence's row alone."""
        if self.matcher is None or self.finish is not None:
            return []
        new: list[int] = []
        self._append_forced(self.matcher.forced(min(self.config.max_new_tokens - self.generated,
                                                    self.capacity + 1 - len(tokens))), tokens, new)
        self._forced_pending = bool(new)
        return new

    def _append_forced(self, forced: Sequence[int], tokens: list[int], new: list[int]) -> None:
        """Add tokens the matcher forced and has already consumed, up to a limit that ends the sequence."""
        for index, token in enumerate(forced):
            self._append(token, tokens, new, grammar_caught_up=index == len(forced) - 1)
            self.forced += 1
            if self.finish:
                break

    def _append(self, token: int, tokens: list[int], new: list[int], grammar_caught_up: bool = True) -> None:
        """Add a chosen token; ``grammar_caught_up``: the matcher has consumed nothing past it."""
        tokens.append(token)
        new.append(token)
        self.generated += 1
        if self.generated == self.config.max_new_tokens:
            self.finish = "length"
        elif len(tokens) > self.capacity:  # no position left to feed it at
            self.finish = "context"
        elif self.matcher is not None and grammar_caught_up and self.matcher.done:
            self.finish = "stop"  # the grammar is complete: nothing may follow

    def next_draft(self, tokens: Sequence[int], limit: int | None = None) -> list[int]:
        """The tokens the next call checks after the pending one (at most ``limit``, never more than the new-token
        limit or the context leaves room for): those the grammar forces, then up to ``config.prompt_lookup`` drafted
        from ``tokens`` that the grammar accepts."""
        room = min(self.config.max_new_tokens - self.generated - 1, self.capacity - len(tokens),
                   self.capacity if limit is None else limit)
        forced = []
        if self.matcher is not None and room > 0:
            forced = self.matcher.forced(room if self.config.fast_forward else 1)
        self._forced_in_draft = len(forced)
        self.ends_at_draft = bool(forced) and self._forced_end(tokens, forced)
        if self.ends_at_draft:
            return forced
        lookup = []
        if self.matcher is not None:  # drafts stop short of the limit's window, where each token is checked
            room = min(room, max(len(forced), room - CLOSE_WINDOW))
        if self.config.prompt_lookup and room > len(forced):
            lookup = self._drafts.draft([*tokens, *forced], min(self.config.prompt_lookup, room - len(forced)))
            if self.matcher is not None:
                lookup = lookup[:self.matcher.valid_prefix(lookup)]
        return forced + lookup


    def _forced_end(self, tokens: Sequence[int], forced: list[int]) -> bool:
        """Whether the sequence ends with ``forced`` (already consumed by the matcher): the grammar is complete, or
        their text completes a stop string outside a tool call (an agent step's ``</tool_call>``). Then ``pick`` can
        take them from an empty call: the logits after them would choose a token nobody reads."""
        if self.matcher.done:
            return True
        if not self.config.stop_strings or self._tokenizer is None:
            return False
        generated = list(tokens[len(tokens) - self.generated:]) if self.generated else []
        before = self._tokenizer.decode(generated, skip_special_tokens=False)
        after = self._tokenizer.decode(generated + forced, skip_special_tokens=False)
        if not after.startswith(before):
            return False
        longest = max(len(stop) for stop in self.config.stop_strings)
        hit = find_stop(after, self.config.stop_strings, max(len(before) - longest + 1, 0),
                        self.config.stops_skip_calls)
        return hit is not None and hit[2]


def choose_whole(picker: TokenPicker, feed, start: int) -> str:
    """The offered name or enum value (``picker.choice``) of the highest log-probability over all its tokens: the first
    token's from ``picker.choice_row``, the others' from one call per name of two or more tokens, ``feed(ids, start,
    picks)`` -> logits (picks, V), which feeds all its tokens but the last at ``start`` (the cache's end). Names are
    tried in the order of their first token's log-probability, which bounds the whole name's: once the next bound is
    below the best score, no later name can win, so with many tools (keys) only the few likely ones cost a call.
    Leaves the cache holding the chosen name's tokens but its last, the sequence's pending token (one more call when
    another name was fed last)."""
    def log_probs(row: np.ndarray) -> np.ndarray:
        row = row.astype(np.float64)
        return row - (row.max() + np.log(np.exp(row - row.max()).sum()))

    first = log_probs(picker.choice_row)
    order = sorted(picker.choice, key=lambda name: -first[picker.choice[name][0]])  # stable: ties keep tool order
    best, best_score, fed_last = None, -np.inf, None
    for name in order:
        ids = picker.choice[name]
        score = first[ids[0]]
        if score <= best_score:
            break  # this bound and every later one: no better name is left
        if len(ids) > 1:
            rows = feed(ids[:-1], start, len(ids) - 1)
            score += sum(log_probs(row)[token] for row, token in zip(rows, ids[1:]))
            fed_last = name
        if score > best_score:
            best, best_score = name, score
    ids = picker.choice[best]
    if len(ids) > 1 and fed_last != best:
        feed(ids[:-1], start, 1)
    return best


class TextStream:
    """Text deltas of a growing token sequence, cut at the first stop string (outside a tool call unless
    ``skip_calls`` is False: ``find_stop``).

    ``push(token)`` returns the text that can be shown now; text that could be the beginning of a stop string is held
    back until the next tokens decide it, so a client never sees part of a stop string. ``stop`` is the stop string
    found (the text ends before it); ``flush()`` returns what was held back when generation ends without one."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), skip_calls: bool = True):
        self._step = tokenizer.decode_stream()
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.skip_calls = skip_calls
        self.text = ""  # all text decoded so far
        self.shown = 0  # text[:shown] has been returned
        self.stop: str | None = None

    @property
    def visible(self) -> str:
        """The text up to the stop string (all of it when none was found)."""
        return self.text[:self.shown] if self.stop is not None else self.text

    def push(self, token: int) -> str:
        if self.stop is not None:
            return ""
        self.text += self._step(token) or ""
        longest = max((len(s) for s in self.stop_strings), default=0)
        hit = find_stop(self.text, self.stop_strings, max(0, self.shown - longest + 1), self.skip_calls)
        if hit is not None and hit[2]:
            at, self.stop, _ = hit
            return self._show(at)
        end = len(self.text) - _held_back(self.text, self.stop_strings)
        return self._show(end if hit is None else min(end, hit[0]))  # an undecided one: held back from there

    def flush(self) -> str:
        return "" if self.stop is not None else self._show(len(self.text))

    def _show(self, end: int) -> str:
        delta = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return delta


# A stop string does not cut a tool call: a call cut short cannot be parsed, and the text a call copies (a name, an
# argument) is not the answer a stop string is meant to end. From a call's opening tag to the start of its closing tag
# (to the end of the text in syntaxes without one), and within a tag, stop strings are not matched; a stop string at
# a closing tag's first character is (an agent ends its step at ``</tool_call>``), at an opening tag's it is not.
# Where the text ends in the first characters of a tag, a stop string begun there is undecided until the tag is whole
# or turns out not to be one.
_CALL_TAGS = tuple(dict.fromkeys((syntax.open, syntax.close) for syntax in CALL_SYNTAXES.values()))
_TAGS = tuple(dict.fromkeys(tag for pair in _CALL_TAGS for tag in pair if tag))
_OPEN_TAGS = frozenset(open_tag for open_tag, _ in _CALL_TAGS) - {close for _, close in _CALL_TAGS}


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0,
              skip_calls: bool = True) -> tuple[int, str, bool] | None:
    """(position, stop string, decided) of the first stop string in ``text[start:]`` outside a tool call (anywhere
    when not ``skip_calls``), or None; ``decided`` False: it begins inside what may yet become a tag (the text ends
    before that is known)."""
    best = None
    for stop in stop_strings:
        at = text.find(stop, start) if stop else -1
        while at >= 0 and (place := _place(text, at) if skip_calls else "outside") == "inside":
            at = text.find(stop, at + 1)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, stop, place == "outside")
    return best


def _place(text: str, at: int) -> str:
    """Where ``text[at:]`` begins: "inside" a call or a tag, "outside", or "undecided" (in the unfinished first
    characters of a possible tag at the end of the text)."""
    for tag in _TAGS:
        # a stop string may end a step at a closing tag's first character, never at an opening tag's (with tools
        # offered, stop "<" or "<tool_call>" would otherwise remove every call)
        for begin in range(max(0, at - len(tag) + 1), at + (tag in _OPEN_TAGS)):
            if text.startswith(tag, begin):
                return "inside"
            if len(text) - begin < len(tag) and tag.startswith(text[begin:]):
                return "undecided"
    for open_tag, close_tag in _CALL_TAGS:
        opened = text.rfind(open_tag, 0, at)
        if opened >= 0 and (not close_tag or text.find(close_tag, opened + len(open_tag), at + len(close_tag)) < 0):
            return "inside"
    return "outside"


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of a stop string."""
    for length in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        tail = text[-length:]
        if any(s.startswith(tail) for s in stops):
            return length
    return 0
