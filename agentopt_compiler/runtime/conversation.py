"""A conversation's tokens and their KV cache on an engine, kept between turns.

    conv = Conversation(engine, prefix_cache)
    logits = conv.prefill_to(prompt_ids)      # computes KV only for tokens not already cached
    for token in conv.generate(logits, config): ...
    conv.rewind(n); conv.save(path); Conversation.load(engine, path)

``prefill_to`` compares the new prompt with the tokens whose KV is cached and keeps their longest common prefix
(a re-rendered conversation often differs from what was generated, e.g. templates that strip reasoning): it rewinds
to that point and prefills only the rest. A generated token's KV is computed when the next call feeds it, so tokens
appended right after generation see exactly the cache a full recompute would build.

The conversation's keys and values live in one KV slot, a row of the engine's cache (slots.py), bound to it while it
is in use: a conversation that is evicted (every slot taken by others) has its rows copied to host memory and back.

Engines with ring caches (bounded sparse-attention layers) keep only the last window of tokens, so going back
(a shorter common prefix than what is cached) recomputes the conversation from its start, and only the whole
cached state can be shared as a prefix. Drafts the model rejects are stepped back over all the same: they were
written into the ring's spare slots, which hold only positions already out of the window.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import AgentOptError, ContextOverflowError
from .generation import GenerationConfig, choose_whole
from .prefix_cache import PrefixCache


class Conversation:
    def __init__(self, engine, prefix_cache=None):
        if prefix_cache is not None and not isinstance(prefix_cache, PrefixCache):
            raise AgentOptError(f"prefix_cache must be a PrefixCache or None, got {type(prefix_cache).__name__}")
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.tokens: list[int] = []  # the conversation so far
        self.cached = 0  # tokens[:cached] have their KV in the slot (or in its host copy while evicted)
        self.slot: int | None = None  # set by the engine's SlotPool while the conversation holds a row
        self.busy = False  # a scheduled request runs on it: its slot is not evicted
        self.prefilled_tokens = 0  # totals over the conversation's life, for reports and benchmarks
        self.reused_tokens = 0
        self.drafted_tokens = 0  # prompt-lookup draft tokens checked, and those the model agreed with
        self.accepted_draft_tokens = 0
        self.forced_tokens = 0  # tokens a grammar forced (fed without a choice, several per call)
        self.closed_at_limit = 0  # generations whose call (or JSON value) a grammar closed early, a limit being near
        self.decode_calls = 0  # engine calls while generating (the first token comes from the prefill's logits)

    def release(self) -> None:
        """Forget this conversation's cache (e.g. when a client disconnects)."""
        with self.engine.lock:
            self.engine.slots.release(self)
        self.cached, self.tokens = 0, []

    # -- feeding tokens ------------------------------------------------------------------------------------
    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` tokens."""
        if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
            raise AgentOptError(f"rewind takes a token count of 0 or more, got {length!r}")
        self.tokens = self.tokens[:length]
        if length < self.cached and not self.engine.session.rewindable:
            self.cached = 0  # a ring cache no longer holds the state at ``length``: the next prefill starts over
        self.cached = min(self.cached, length)

    def feed(self, ids: list[int], start: int, picks: int = 1) -> np.ndarray:
        """Feed ``ids`` at positions ``start``... into this conversation's slot; return the logits (1, picks, V) of
        the last ``picks`` of them."""
        engine = self.engine
        with engine.lock:
            slot = engine.slots.acquire(self)
            rows = engine.slots.rows(slot)
            count = engine.session.batch_size if rows is None else 1  # a slot of every row feeds each the same
            logits_index = np.arange(len(ids) - picks, len(ids))[None].repeat(count, axis=0) if picks > 1 else None
            logits = engine.session.run(np.array([ids] * count, dtype=np.int64),
                                        np.arange(start, start + len(ids), dtype=np.int64), logits_index, rows)
        return logits[:1]

    def choose_whole(self, picker) -> list[int]:
        """The tool name or enum value ``picker`` stopped at (``picker.choice``; the cache holds every token so far),
        chosen whole (generation.choose_whole) and appended; its tokens but the last are fed. Returns its tokens."""
        new = picker.take_choice(choose_whole(picker, self._feed_rows, self.cached), self.tokens)
        self.cached += len(new) - 1
        return new

    def _feed_rows(self, ids: list[int], start: int, picks: int) -> np.ndarray:
        """(picks, V) logits after the last ``picks`` of ``ids`` fed at ``start``: one call, or one per token on an
        engine that returns one row per call (each counted in ``decode_calls``)."""
        if picks == 1 or self.engine.session.multi_logits:
            self.decode_calls += 1
            return self.feed(ids, start, picks)[0]
        first = start + len(ids) - picks
        if first > start:
            self.decode_calls += 1
            self.feed(ids[:first - start], start)
        self.decode_calls += picks
        return np.concatenate([self.feed([t], first + i)[0] for i, t in enumerate(ids[-picks:])])

    def begin_turn(self, prompt_ids: list[int]) -> int:
        """Make ``prompt_ids`` the conversation and bind it to a slot; return how many of its first tokens already
        have their KV there (kept from earlier turns, or copied from the prefix cache). The caller feeds the rest."""
        prompt_ids = [int(t) for t in prompt_ids]
        capacity = self.engine.context_length
        if not prompt_ids:
            raise AgentOptError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= capacity:
            raise ContextOverflowError(f"the prompt has {len(prompt_ids)} tokens but the engine's context holds "
                                       f"{capacity} (prompt plus at least one new token); shorten the prompt or "
                                       f"recompile with a larger --context-length")
        with self.engine.lock:
            slot = self.engine.slots.acquire(self)
            keep = common_prefix(self.tokens[:self.cached], prompt_ids)
            keep = min(keep, len(prompt_ids) - 1)  # the last prompt token is always fed: we need its logits
            if keep < self.cached and not self.engine.session.rewindable:
                keep = 0  # a ring cache has overwritten what rewinding needs: recompute (correct, not cheap)
            if self.prefix_cache is not None:
                length, rows = self.prefix_cache.lookup(prompt_ids, max_length=len(prompt_ids) - 1)
                if length > keep:
                    self.engine.session.write_cache({name: r[:, :, :length] for name, r in rows.items()},
                                                    self.engine.slots.row(slot))
                    keep = length
        self.reused_tokens += keep
        self.prefilled_tokens += len(prompt_ids) - keep
        self.tokens, self.cached = prompt_ids, keep
        return keep

    def prefill_to(self, prompt_ids: list[int]) -> np.ndarray:
        """Make the cache hold ``prompt_ids``; return the logits (1, 1, V) after its last token."""
        keep = self.begin_turn(self.engine.encode(prompt_ids))  # ids checked against the vocabulary
        logits = self.feed(self.tokens[keep:], keep)
        self.cached = len(self.tokens)
        return logits

    def remember_prefix(self, length: int, pin: bool = False) -> None:
        """Store the KV of the first ``length`` cached tokens in the shared prefix cache."""
        if self.prefix_cache is None or length <= 0 or length > self.cached:
            return
        if length != self.cached and not self.engine.session.rewindable:
            return  # ring caches hold the state after all cached tokens, not after the first ``length``
        with self.engine.lock:
            slot = self.engine.slots.acquire(self)
            rows = self.engine.session.read_cache(length, self.engine.slots.row(slot))
        self.prefix_cache.insert(self.tokens[:length], rows, pin=pin)

    def generate(self, logits: np.ndarray, config: GenerationConfig) -> Iterator[int]:
        """Sample tokens after ``prefill_to``; each yielded token is appended to the conversation. Returns the
        finish reason: "stop", "length" or "context".

        With ``config.prompt_lookup`` > 0, each call also checks up to that many drafted tokens (prompt_lookup.py)
        and keeps them up to the first the model does not choose: greedy, the same tokens; sampled, the same
        distribution (generation.py). With ``config.grammar``, only tokens the grammar accepts are chosen, and the
        tokens it forces are fed in one call (constraints.py)."""
        _check_generate_inputs(logits, config, self.engine.manifest["model"]["config"]["vocab_size"])
        if config.prompt_lookup:
            check_prompt_lookup(self.engine.session, config.prompt_lookup)
        picker = self.engine.token_picker(config)
        rows, draft = logits[0, -1:], []  # (L, V): the first row gives the next token; the rest check the draft
        try:
            while picker.finish is None:
                new, kept = picker.pick(rows, draft, self.tokens)
                self.cached += kept
                yield from new
                if picker.choice is not None:
                    yield from self.choose_whole(picker)
                if picker.finish is not None:
                    break
                draft = picker.next_draft(self.tokens)
                if picker.ends_at_draft:  # the grammar's last tokens end the sequence: appended, not fed
                    new, _ = picker.pick(rows[:0], draft, self.tokens)
                    yield from new
                    break
                fed = [self.tokens[-1], *draft]
                rows = self.feed(fed, self.cached, picks=len(fed))[0]  # (1 + len(draft), V)
                self.cached += 1
                self.decode_calls += 1
            return picker.finish
        finally:  # also when the caller stops early (a stop string)
            self.drafted_tokens += picker.drafted
            self.accepted_draft_tokens += picker.accepted
            self.forced_tokens += picker.forced
            self.closed_at_limit += picker.closed_at_limit

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write tokens and cached KV rows to exactly ``path`` (npz format, whatever its suffix), tagged with the
        engine's graph hash."""
        if not isinstance(path, (str, Path)) or not str(path):
            raise AgentOptError(f"path must be a file path, got {path!r}")
        if Path(path).is_dir():
            raise AgentOptError(f"cannot save the conversation to '{path}': it is a folder; give a file path")
        with self.engine.lock:
            slots = self.engine.slots
            if self.slot is not None:
                rows = self.engine.session.read_cache(self.cached, slots.row(self.slot)) if self.cached else {}
            else:
                rows = slots.saved_rows(self) or {}
        meta = {"tokens": self.tokens, "cached": self.cached if rows else 0, "engine": _engine_id(self.engine)}
        meta["sha256"] = _saved_digest(meta, rows)
        try:
            with open(path, "wb") as file:  # a file object: np.savez would add ".npz" to a name without it
                np.savez(file, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                         **{f"cache:{k}": v for k, v in rows.items()})
        except OSError as exc:
            raise AgentOptError(f"cannot save the conversation to '{path}': {exc.strerror or exc}") from None

    @classmethod
    def load(cls, engine, path: str | Path, prefix_cache=None) -> "Conversation":
        not_saved = "give a file written by Conversation.save"
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single array, not a saved conversation's archive")
            with data:
                meta = json.loads(bytes(data["__meta__"]).decode())
                foreign = [k for k in data.files if k != "__meta__" and not k.startswith("cache:")]
                if foreign:
                    raise ValueError(f"it holds {foreign[0]!r}, which Conversation.save does not write")
                rows = {k[len("cache:"):]: data[k] for k in data.files if k.startswith("cache:")}
        except FileNotFoundError as exc:
            raise AgentOptError(f"cannot read the conversation '{path}': {exc.strerror or exc}") from None
        except (OSError, ValueError, KeyError, AttributeError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            # truncated, corrupted or not an archive Conversation.save wrote (numpy's word on pickles is advice
            # to load them, which a saved conversation never needs)
            reason = "it holds pickled Python objects" if "pickle" in str(exc) else f"{type(exc).__name__}: {exc}"
            raise AgentOptError(f"'{path}' is not a saved conversation, or is damaged ({reason}); {not_saved}") \
                from None
        if not isinstance(meta, dict) or not {"engine", "tokens", "cached"} <= set(meta):
            raise AgentOptError(f"'{path}' is not a saved conversation (its metadata lacks engine, tokens or "
                                f"cached); {not_saved}")
        if meta["engine"] != _engine_id(engine):
            raise AgentOptError(f"conversation '{path}' was saved from a different engine; it can only be loaded "
                                "into the engine that made it")
        _check_saved(engine, path, meta["tokens"], meta["cached"], rows)
        if "sha256" in meta and meta["sha256"] != _saved_digest(meta, rows):  # (saves from before it: unchecked)
            raise AgentOptError(f"conversation '{path}' is damaged or was edited: its tokens or KV arrays do not "
                                f"match the sha256 it was saved with; {not_saved}")
        conversation = cls(engine, prefix_cache)
        conversation.tokens, conversation.cached = [int(t) for t in meta["tokens"]], int(meta["cached"]) if rows else 0
        if rows:
            with engine.lock:
                engine.slots.keep_saved(conversation, rows)  # restored into a slot when it is next used
        return conversation


def _saved_digest(meta: dict, rows: dict[str, np.ndarray]) -> str:
    """sha256 over a save's tokens, cached count and KV arrays (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256(json.dumps([meta["tokens"], meta["cached"]]).encode())
    for name in sorted(rows):
        row = np.ascontiguousarray(rows[name])
        digest.update(f"{name}:{row.dtype.str}:{row.shape}".encode())
        digest.update(row.tobytes())
    return digest.hexdigest()


def _check_saved(engine, path, tokens, cached, rows: dict[str, np.ndarray]) -> None:
    """A saved conversation's tokens and KV rows as this engine holds them: token ids in its vocabulary, at most
    its context, ``cached`` of them with rows of exactly the names, shapes and dtypes the engine's caches read, and
    finite values. Anything else (an edited or damaged file) would decode from a state that never existed."""
    damaged = f"conversation '{path}' is damaged or was edited:"
    vocab, capacity = engine.manifest["model"]["config"]["vocab_size"], engine.context_length
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in tokens):
        raise AgentOptError(f"{damaged} its tokens are not a list of token ids below {vocab}")
    if len(tokens) > capacity:
        raise AgentOptError(f"{damaged} it holds {len(tokens)} tokens and this engine's context {capacity}")
    if isinstance(cached, bool) or not isinstance(cached, int) or not 0 <= cached <= len(tokens):
        raise AgentOptError(f"{damaged} its cached count {cached!r} is not a number of its {len(tokens)} tokens")
    if not rows:
        return
    with engine.lock:
        expected = engine.session.read_cache(cached, 0)  # names, shapes and dtypes of one row of that length
    if set(rows) != set(expected):
        raise AgentOptError(f"{damaged} its KV arrays ({', '.join(sorted(rows))}) are not this engine's caches "
                            f"({', '.join(sorted(expected))})")
    for name, row in rows.items():
        want = expected[name]
        if row.shape != want.shape or row.dtype != want.dtype:
            raise AgentOptError(f"{damaged} KV array '{name}' is {row.dtype}{list(row.shape)}, where {cached} cached "
                                f"tokens take {want.dtype}{list(want.shape)}")
        if np.issubdtype(row.dtype, np.floating) and not np.isfinite(row).all():
            raise AgentOptError(f"{damaged} KV array '{name}' holds NaN or infinite values")


def _check_generate_inputs(logits, config, vocab_size: int) -> None:
    """``generate``'s arguments as ``prefill_to`` returns them (an AgentOptError naming the argument, not an
    IndexError from inside sampling)."""
    if not isinstance(config, GenerationConfig):
        raise AgentOptError(f"config must be a GenerationConfig, got {type(config).__name__}")
    shape = getattr(logits, "shape", None)
    if not isinstance(logits, np.ndarray) or len(shape) != 3 or shape[0] != 1 or shape[1] < 1 \
            or shape[2] != vocab_size or not np.issubdtype(logits.dtype, np.floating):
        what = f"an array of shape {shape} and dtype {logits.dtype}" if isinstance(logits, np.ndarray) else \
            type(logits).__name__
        raise AgentOptError(f"logits must be what prefill_to returns, float (1, tokens, {vocab_size}), got {what}")


def check_prompt_lookup(session, draft_tokens: int) -> None:
    """Raise why ``session`` cannot decode with prompt-lookup drafts of up to ``draft_tokens``, if it cannot."""
    if not session.multi_logits:
        raise AgentOptError("prompt lookup needs the logits of several tokens per call, and this engine returns "
                            "one (it was compiled before that); recompile it with agentopt compile")
    if not session.row_subsets and session.batch_size > 1 and not session.batched_chunks:
        raise AgentOptError("prompt lookup checks several new tokens per row in one call, which onnxruntime's "
                            "GroupQueryAttention does at batch size 1 only, and this engine runs all its rows in "
                            "every call; recompile it with agentopt compile (engines with dynamic rows run one "
                            "conversation's row alone), or with --attention-impl standard")
    if not session.rewindable and draft_tokens > session.ring_spare_slots:
        spare = session.ring_spare_slots
        raise AgentOptError(f"prompt lookup writes up to {draft_tokens} drafted tokens into the cache and steps back "
                            f"over the rejected ones, but this engine's ring caches (bounded sparse-attention "
                            f"layers) keep {spare} spare slots for that; use a prompt lookup of at most {spare}"
                            + ("" if spare else " (none: recompile the engine to get spare slots)"))


def common_prefix(a: list[int], b: list[int], block: int = 256) -> int:
    """Length of the longest common prefix of two token lists (whole blocks compared as slices, in C: a server
    matches every request against its pool of conversations)."""
    n = min(len(a), len(b))
    start = 0
    while start < n and a[start:start + block] == b[start:start + block]:
        start += block
    for i in range(start, min(start + block, n)):
        if a[i] != b[i]:
            return i
    return n


def _engine_id(engine) -> str:
    files = engine.manifest["files"]
    return files[engine.manifest["engine"]["graph"]]["sha256"]
