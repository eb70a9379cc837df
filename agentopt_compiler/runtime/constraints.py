"""Grammar-constrained decoding: tool calls that always parse and fit their schemas, JSON-schema and regex outputs.

    grammar = tool_call_grammar(tools, call_syntax(tokenizer.chat_template))        # free text, then valid calls
    grammar = json_schema_grammar({"type": "object", ...}, what="response_format")  # the whole answer is JSON
    config = GenerationConfig(grammar=grammar)             # TokenPicker masks logits and fast-forwards

The grammars are compiled and matched by llguidance (Microsoft's Rust grammar engine behind guidance, used by vLLM,
SGLang, llama.cpp and onnxruntime-genai; no runtime dependencies, reads our tokenizer.json). It was chosen over
xgrammar (needs torch for its masks: our deploy side is torch-free), outlines-core (JSON schema and regex only: no
lazily activated grammars inside free text) and llama.cpp's GBNF (not a Python library).

A sequence's ``Matcher`` follows the tokens chosen so far and, before each choice, sets the logits of tokens the
grammar cannot accept next to -inf (greedy and sampled decoding alike). Where the grammar leaves one way to go (the
``<tool_call>{"name": "`` of a call, a tool's name once a prefix fixes it, ``", "arguments": {"``, key names,
closing braces), ``forced()`` returns those tokens and the generation loop feeds them in one engine call, the way
prompt-lookup drafts are fed (generation.py), instead of one call per token.

Tool calls are activated lazily: text is free until the model writes the family's opening tag, from which on only
a call to one of the tools, with arguments valid for its JSON schema, can follow:

    Sure, let me compute that. <tool_call>{"name": "calculator", "arguments": {"expression": "17 * 23"}}</tool_call>
    ^ free text                ^ from here on: one of the tools' schemas, keys in schema order, then the closing tag

JSON is written as ``json.dumps`` and the chat templates write it (", " and ": ", no other whitespace), so the
keys, separators and braces are forced. Arguments objects allow no properties beyond the schema's unless the schema
says ``additionalProperties``: a call the tool would refuse (tools.py checks unknown arguments) is not valid.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from ..errors import AgentOptError

_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class CallSyntax:
    """How a model family writes tool calls (tools.py parses the same syntaxes)."""

    open: str
    close: str  # "" where the call ends with the message
    list_of_calls: bool  # the block holds a JSON list of call objects
    arguments_key: str  # "arguments", or Llama's "parameters"
    after_open: str = ""  # what the template writes between the tag and the JSON (Qwen: a newline)
    before_close: str = ""


CALL_SYNTAXES = {
    "hermes": CallSyntax("<tool_call>", "</tool_call>", False, "arguments"),  # Qwen 2.5/3, Hermes, SmolLM3, ours
    "phi4": CallSyntax("<|tool_call|>", "<|/tool_call|>", True, "arguments"),  # Phi-4-mini
    "mistral": CallSyntax("[TOOL_CALLS]", "", True, "arguments"),
    "llama3": CallSyntax("<|python_tag|>", "", False, "parameters"),
}


def call_syntax(chat_template: str | None) -> CallSyntax:
    """The syntax whose opening tag the chat template writes (Hermes-style ``<tool_call>`` when it names none), with
    the newlines it puts around the JSON (Qwen 2.5/3 write ``<tool_call>\n{...}\n</tool_call>``): the grammar asks
    for the layout the model was trained on."""
    template = chat_template or ""
    syntax = next((s for s in CALL_SYNTAXES.values() if s.open in template and s is not CALL_SYNTAXES["hermes"]),
                  CALL_SYNTAXES["hermes"])
    return replace(syntax, after_open="\n" if syntax.open + "\n" in template else "",
                   before_close="\n" if syntax.close and "\n" + syntax.close in template else "")


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar and what it stands for (named in errors)."""

    text: str
    what: str
    whole_output: bool = False  # it shapes the output from its first token to its last (a JSON answer, a regex):
    # a stop string could only cut it, so the two are refused together (GenerationConfig)
    # a tool-call grammar's tool names and where a call starts: greedy decoding picks the name whole (generation.py)
    names: tuple[str, ...] = ()
    call_open: str = ""
    list_of_calls: bool = False
    arguments_key: str = "arguments"  # a call's key for its arguments (where enum values are looked for)
    # (tool, parameter, values) of each string argument whose schema is an enum of two or more: chosen whole
    enums: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    def at_name(self, text: str) -> bool:
        """Whether ``text`` (the output so far) ends where a call's tool name starts: right after ``{"name": "`` in
        the call object itself (JSON depth 1 after the opening tag, 2 in a list of calls), not in its arguments."""
        if not self.names or not text.endswith('{"name": "'):
            return False
        start = text.rfind(self.call_open)
        return start >= 0 and _depth(text[start + len(self.call_open):-1]) == (2 if self.list_of_calls else 1)

    def enum_at(self, text: str) -> tuple[str, ...]:
        """The values of the enum whose string ``text`` (the output so far) has just opened: ``text`` ends with
        ``"param": "`` right in the arguments object of the call it is writing, and that tool's ``param`` is an
        enum; () elsewhere."""
        start = text.rfind(self.call_open)
        if not self.enums or start < 0 or not text.endswith('": "'):
            return ()
        call = text[start + len(self.call_open):]
        param = re.search(r'"([^"\\]+)": "$', call)
        if param is None:
            return ()
        head = r'\{"name": "([^"\\]+)", "' + re.escape(self.arguments_key) + r'": \{'
        for match in reversed(list(re.finditer(head, call))):  # the call being written: the last at call depth
            if _depth(call[:match.start()]) == (1 if self.list_of_calls else 0):
                if _depth(call[match.end():-1]) != 0:  # (up to the value's opening quote) not right in its arguments
                    return ()
                return next((values for tool, name, values in self.enums
                             if tool == match.group(1) and name == param.group(1)), ())
        return ()


def _depth(text: str) -> int | None:
    """How many JSON objects and arrays ``text`` leaves open; None when it ends inside a string."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = ch == "\\", ch != '"'
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
    return None if in_string else depth


def json_schema_grammar(schema: dict[str, Any], what: str = "the JSON schema") -> Grammar:
    """The whole output is one JSON value valid for ``schema``."""
    if not isinstance(schema, dict):
        raise AgentOptError(f"{what} must be a JSON schema object, got {type(schema).__name__}")
    return Grammar(_lark("start: " + _json_rule(schema)), what, whole_output=True)


def regex_grammar(pattern: str, what: str = "the regex") -> Grammar:
    return Grammar(_lark("start: " + _regex_rule(pattern)), what, whole_output=True)


def no_call_grammar(syntax: CallSyntax) -> Grammar:
    """Text without a tool call (OpenAI's tool_choice "none"): the call's opening tag is never written (a tag that is
    an added token lies outside text anyway; a text tag is cut out of the text lexeme)."""
    tag = re.escape(syntax.open).replace("/", "\\/")
    return Grammar(_lark("start: TEXT?", rf"TEXT: /(.|\n)+/ & ~/(.|\n)*{tag}(.|\n)*/"), "tool_choice none")


def tool_call_grammar(tools: Sequence[dict[str, Any]], syntax: CallSyntax, tokenizer=None, choice: str = "auto",
                      reasoning: tuple[str, str] | None = None, parallel: bool = True) -> Grammar:
    """Calls to ``tools`` (OpenAI-style entries, as ``Tool.schema()`` gives) in ``syntax``.

    ``choice``: "auto" (free text, and any number of valid calls from the opening tag on), "required" (a call
    first) or a tool's name (a call to that tool first). ``reasoning`` = (open, close) lets a reasoning block come
    first (Qwen3's ``<think>``...``</think>``; ``reasoning_left`` says what the prompt leaves of it). With
    ``tokenizer``, a tag that is one of its added tokens is matched as that token (the model writes it so);
    otherwise as text."""
    functions = [t.get("function", t) for t in tools]
    if not functions:
        raise AgentOptError("a tool-call grammar needs at least one tool")
    for f in functions:
        check_writable(f.get("parameters"), tokenizer, f"the schema of tool '{f.get('name')}'")
    if choice not in ("auto", "required"):
        functions = [f for f in functions if f["name"] == choice]
        if not functions:
            raise AgentOptError(f"tool_choice names '{choice}', which is not among the tools")
    # a schema with references ("#/$defs/X", "#/properties/a": pydantic writes them) keeps them pointing into itself
    # from under the call's root: it moves to the root's $defs and its references are rebased there
    moved: dict[str, Any] = {}
    arguments = []
    for index, f in enumerate(functions):
        schema = _strict_object(f.get("parameters"))
        if _has_local_ref(schema):
            moved[f"tool{index}"] = _rebased(schema, f"#/$defs/tool{index}")
            schema = {"$ref": f"#/$defs/tool{index}"}
        arguments.append(schema)
    calls = [{"type": "object", "properties": {"name": {"const": f["name"]}, syntax.arguments_key: schema},
              "required": ["name", syntax.arguments_key], "additionalProperties": False}
             for f, schema in zip(functions, arguments)]
    body: dict[str, Any] = {"anyOf": calls} if len(calls) > 1 else calls[0]
    if syntax.list_of_calls:  # (``parallel`` False: OpenAI's parallel_tool_calls=false, one call at most)
        body = {"type": "array", "items": body, "minItems": 1, **({} if parallel else {"maxItems": 1})}
    if moved:
        body = {**body, "$defs": moved}
    open_tag = _literal(syntax.open, tokenizer) + (" " + json.dumps(syntax.after_open) if syntax.after_open else "")
    close = (" " + json.dumps(syntax.before_close) if syntax.before_close else "") + \
        (" " + _literal(syntax.close, tokenizer) if syntax.close else "")
    shape = {"names": tuple(f["name"] for f in functions) if len(functions) > 1 else (),
             "call_open": syntax.open + syntax.after_open, "list_of_calls": syntax.list_of_calls,
             "arguments_key": syntax.arguments_key, "enums": _string_enums(functions)}
    if choice == "auto":  # text up to the opening tag: a special token ends a text lexeme, a text tag lazily
        trigger = (f"call_open: TEXT? {open_tag}" if _added_token(syntax.open, tokenizer) is not None
                   else f"call_open[lazy]: BEFORE_CALL {open_tag}")
        calls = "call*" if parallel else "call?"
        return Grammar(_lark(f"start: {calls} TEXT?", trigger, f"call: call_open {_json_rule(body)}{close}",
                             r"TEXT: /(.|\n)+/", r"BEFORE_CALL: /(.|\n)*/"), "the tools' schemas", **shape)
    # a reasoning block may come first: free text up to its closing tag, then a call; it must be closed first when
    # the prompt opened it (reasoning[0] == "")
    think = "" if not reasoning else "think? " if reasoning[0] else "think "
    rules = [f"start: {think}{open_tag} {_json_rule(body)}{close}"]
    if reasoning:
        think_open, think_close = (_literal(tag, tokenizer) if tag else "" for tag in reasoning)
        if _added_token(reasoning[1], tokenizer) is not None:  # (Qwen3) an added token ends a text lexeme
            rules += [f"think: {think_open} TEXT? {think_close} /[ \n]*/", r"TEXT: /(.|\n)+/"]
        else:  # a text tag ends a lazy match
            rules += [f"think: {think_open} think_body /[ \n]*/", f"think_body[lazy]: /(.|\n)*/ {think_close}"]
    return Grammar(_lark(*rules), "the tools' schemas", **shape)


def _string_enums(functions: Sequence[dict[str, Any]]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(tool, parameter, values) for each top-level argument whose schema is an enum of two or more strings."""
    found = []
    for f in functions:
        for name, schema in ((f.get("parameters") or {}).get("properties") or {}).items():
            values = schema.get("enum") if isinstance(schema, dict) else None
            if isinstance(values, list) and len(values) > 1 and all(isinstance(v, str) for v in values):
                found.append((f["name"], name, tuple(values)))
    return tuple(found)


def reasoning_left(prompt: str, reasoning: tuple[str, str] | None) -> tuple[str, str] | None:
    """The part of a reasoning block (open, close) still to come after ``prompt``: None when the prompt closed one
    (Qwen3 with ``enable_thinking=False`` renders an empty ``<think>\\n\\n</think>``), ("", close) when it opened
    one, else both."""
    tail = prompt.rstrip()
    if reasoning is None or tail.endswith(reasoning[1]):
        return None
    return ("", reasoning[1]) if tail.endswith(reasoning[0]) else reasoning


def _strict_object(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A tool's arguments schema, closed to properties it does not name unless it says otherwise."""
    schema = dict(parameters or {"type": "object", "properties": {}})
    if schema.get("type", "object") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


def _has_local_ref(value: Any) -> bool:
    if isinstance(value, dict):
        return any((k == "$ref" and isinstance(v, str) and v.startswith("#")) or _has_local_ref(v)
                   for k, v in value.items())
    return isinstance(value, list) and any(_has_local_ref(v) for v in value)


def _rebased(value: Any, root: str) -> Any:
    """``value`` with its references into itself ("#...") made references into ``root`` ("#/$defs/tool0...")."""
    if isinstance(value, dict):
        return {k: root + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebased(v, root)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_rebased(v, root) for v in value]
    return value


def _lark(*rules: str) -> str:
    return "%llguidance {}\n" + "\n".join(rules) + "\n"


def _json_rule(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": {**_JSON_STYLE, **schema.get("x-guidance", {})}})


def _regex_rule(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


def check_writable(schema: Any, tokenizer, what: str) -> None:
    """Refuse a schema that names text holding one of the tokenizer's added tokens (``</tool_call>`` in an enum
    value, a const, a property name): the tokenizer writes that text only as the one token, which a JSON string
    cannot hold, so the grammar could never write it (llguidance would fail mid-generation)."""
    added = [t for t in getattr(tokenizer, "added_tokens", {}) if len(t) > 1]
    if not added:
        return

    def texts(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for key, item in value.items():
                if key not in ("description", "title", "$comment"):  # words about the schema are never written
                    yield key
                    yield from texts(item)
        elif isinstance(value, list):
            for item in value:
                yield from texts(item)

    for text in texts(schema):
        token = next((t for t in added if t in text), None)
        if token is not None:
            raise AgentOptError(f"{what} holds the text {text[:80]!r}, and {token!r} in it is a special token of "
                                "this model's tokenizer: a JSON string cannot hold it, so no call or answer could "
                                "write it; choose other text")


def _added_token(text: str, tokenizer) -> int | None:
    """The id of ``text`` when it is one added token of the vocabulary (a tag: ``<tool_call>``, ``</think>``,
    Mistral's ``[TOOL_CALLS]``): the model writes it as that token, and text lexemes never contain it."""
    return tokenizer.added_token_id(text) if tokenizer is not None else None


def _literal(text: str, tokenizer) -> str:
    """A tag as llguidance matches it: the token by id (``<[9]>``) when it is an added token, else its text."""
    token = _added_token(text, tokenizer)
    return f"<[{token}]>" if token is not None else json.dumps(text)


# -- matching ---------------------------------------------------------------------------------------------------------
def _grammar_tokenizer(tokenizer, vocab_size: int, stop_ids: Sequence[int]):
    """llguidance's view of the tokenizer, over the larger of the model's and the tokenizer's vocabularies (Gemma 3's
    tokenizer has one token more than its text model, Qwen3's model 267 rows more than its tokenizer); masks are cut
    to the model's."""
    return _cached_grammar_tokenizer(tokenizer.to_json(), max(vocab_size, tokenizer.size), tuple(sorted(stop_ids)))


@lru_cache(maxsize=8)
def _cached_grammar_tokenizer(tokenizer_json: str, n_vocab: int, stop_ids: tuple[int, ...]):
    from llguidance import LLTokenizer

    return LLTokenizer(tokenizer_json, n_vocab=n_vocab, eos_token=list(stop_ids))


# What a short completion of an open JSON value prefers, in this order: end the string, close the containers, go
# on to the next required property, then the shortest values. One character each: a longer closer such as '"}' would
# open a string where a value starts, and the search would write "}" into it.
_CLOSERS = ('"', '}', ']', ',', '0', 'false', 'null')


@lru_cache(maxsize=8)
def _closing_tables(grammar_tokenizer, vocab_size: int) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(V,) byte length of each token's text (0-byte special tokens: never preferred), the ids of the tokens that
    are exactly one of ``_CLOSERS``, in that order, and the ids of the special tokens: a tag such as ``</think>``
    or ``</tool_call>`` that the grammar accepts ends the part it closes, so a closing prefers it."""
    lengths = np.array([len(grammar_tokenizer.decode_bytes([t])) or 1 << 20 for t in range(vocab_size)])
    closers = []
    for text in _CLOSERS:
        ids = grammar_tokenizer.tokenize_str(text)
        if len(ids) == 1 and ids[0] < vocab_size:
            closers.append(ids[0])
    specials = np.array([t for t in range(vocab_size) if grammar_tokenizer.is_special_token(t)], dtype=np.int64)
    return lengths, closers, specials


def check_grammar(grammar: Grammar, tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> None:
    """Raise an AgentOptError naming ``grammar.what`` when llguidance cannot compile it (malformed, unsupported or
    unsatisfiable: a minimum above its maximum, a required property no value fits, ...)."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(
        grammar.text, _grammar_tokenizer(tokenizer, vocab_size, stop_ids))
    if is_error:  # the first line says what failed, and an "error:" line why (a regex's); the rest is
        # llguidance's listing of the whole grammar
        lines = [line.strip() for line in messages[0].splitlines() if line.strip()] or ["unknown"]
        reason = lines[0].removeprefix("at ").split(": ", 1)[-1]
        why = next((line for line in lines[1:] if line.startswith("error:")), None)
        raise AgentOptError(f"{grammar.what} cannot constrain decoding: {reason}"
                            + (f" {why.removeprefix('error:').strip()}" if why else ""))


class Matcher:
    """One sequence's position in a grammar: the mask for its next token, and the tokens it forces."""

    def __init__(self, grammar: Grammar, tokenizer, vocab_size: int, stop_ids: Sequence[int]):
        from llguidance import LLMatcher

        self.grammar, self.vocab_size = grammar, vocab_size
        self._stops = np.array(sorted(stop_ids), dtype=np.int64)
        self._grammar_tokenizer = _grammar_tokenizer(tokenizer, vocab_size, stop_ids)
        self._matcher = LLMatcher(self._grammar_tokenizer, grammar.text, log_level=0)
        if self._matcher.is_error():  # compiled once here: a grammar llguidance cannot build is this one error
            raise AgentOptError(f"{grammar.what} cannot constrain decoding: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow (a JSON answer's last brace): generation stops."""
        return self._matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the grammar accepts next (stop tokens only where it may end)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
        allowed[self._stops] = self._matcher.is_accepting()
        return allowed

    def masked(self, row: np.ndarray) -> np.ndarray:
        """A copy of the logits ``row`` with every token the grammar rejects at -inf."""
        return np.where(self.allowed(), row, np.float32(-np.inf))

    def consume(self, token: int) -> None:
        self._matcher.consume_token(int(token))
        self._raise_on_error()

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the grammar forces next, consumed: the caller appends them."""
        tokens = self._matcher.compute_ff_tokens()[:max(limit, 0)]
        if any(t >= self.vocab_size for t in tokens):
            raise AgentOptError(f"{self.grammar.what} forces a token the model cannot write (ids {tokens}; its "
                                f"vocabulary ends at {self.vocab_size - 1}); write that text differently")
        if tokens:
            self._matcher.consume_tokens(tokens)
            self._raise_on_error()
        return tokens

    @property
    def open(self) -> bool:
        """Something the grammar started must still be finished (a call, a JSON value) before it may end here."""
        return not self._matcher.is_accepting() and not self._matcher.is_stopped()

    def closing(self, limit: int, after: int | Sequence[int] | None = None, hint: Sequence[int] = ()
                ) -> list[int] | None:
        """A short way to finish what is open (after ``after``, a token or tokens, if given), not consumed: the tokens
        that end the string being written, close the arguments and the call with its tag, giving each required
        property still missing its shortest value (greedily: forced tokens, then a special token such as
        ``</think>``, then ``_CLOSERS`` in order, else the shortest token the grammar accepts). [] when nothing is
        open, None when no way was found within ``limit`` tokens (a text tag that ends free text, such as a
        ``</think>`` that is not one token, is not found: the walk never writes it).

        ``hint``: a closing found before (one token ago, say); when it still closes from here within ``limit`` it is
        the answer, without the walk (a token inside a string leaves the closing as it was)."""
        probe, path = self._matcher.deep_copy(), []
        if after is not None:
            after = [int(after)] if isinstance(after, (int, np.integer)) else [int(t) for t in after]
        if after and (probe.try_consume_tokens(after) != len(after) or probe.is_error()):
            return None
        if probe.is_accepting() or probe.is_stopped():
            return []
        if hint and len(hint) <= limit:
            trial = probe.deep_copy()
            if trial.try_consume_tokens(list(hint)) == len(hint) and not trial.is_error() and \
                    (trial.is_accepting() or trial.is_stopped()):
                return list(hint)
        lengths, closers, specials = _closing_tables(self._grammar_tokenizer, self.vocab_size)
        while len(path) < limit:
            forced = probe.compute_ff_tokens()[:limit - len(path)]
            if not forced:
                bits = np.frombuffer(probe.compute_bitmask(), dtype=np.uint8)
                allowed = np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)
                allowed[self._stops] = False
                if not allowed.any():
                    return None
                preferred = [*specials[allowed[specials]].tolist(), *(t for t in closers if allowed[t])]
                forced = [preferred[0] if preferred else int(np.argmin(np.where(allowed, lengths, 1 << 30)))]
            if probe.try_consume_tokens(forced) != len(forced) or probe.is_error():
                return None
            path += forced
            if probe.is_accepting() or probe.is_stopped():
                return path
        return None

    def consume_all(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.consume(token)

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` (a prompt-lookup draft) the grammar accepts from here, not consuming them."""
        return self._matcher.validate_tokens([int(t) for t in tokens]) if len(tokens) else 0

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():  # llguidance's report ends with its whole parser state and grammar: the
            # line that says what failed is enough
            lines = self._matcher.get_error().splitlines() or [""]
            reason = next((line for line in lines if line.startswith("Error:")), lines[0])
            raise AgentOptError(f"constrained decoding with {self.grammar.what} failed: {reason.strip()}")
