"""A loaded engine folder and text generation over it (deploy side: no torch).

    load_engine(folder) -> Engine
    engine.generate("Hello", max_new_tokens=32)            -> str
    engine.stream("Hello")                                 -> iterator of text pieces
    engine.generate_ids([1, 2, 3], max_new_tokens=32)      -> list[int]
    engine.complete(...)                                   -> Completion (text, ids, finish reason, timings)

Generation = one prefill call over the prompt, then one decode call per new token; the session holds the KV cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..backends import get_backend
from ..errors import AgentOptError, ContextOverflowError, EngineError
from .conversation import Conversation, check_prompt_lookup
from .manifest import read_manifest
from .prompt_lookup import DraftIndex
from .sampling import check_draft, sample
from .tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's end-of-sequence tokens
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False  # decode exactly max_new_tokens (benchmarks, parity tests)
    prompt_lookup: int = 0  # > 0: check up to this many tokens drafted from the context per call (same tokens
    # when greedy, the same distribution when sampling)

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise AgentOptError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise AgentOptError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.prompt_lookup < 0:
            raise AgentOptError(f"prompt_lookup must be >= 0 (0: off), got {self.prompt_lookup}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (eos / stop string), "length" (max_new_tokens) or "context" (engine full)
    time_to_first_token_s: float
    decode_tokens_per_s: float


class Engine:
    def __init__(self, folder: Path, manifest: dict, session, tokenizer: Tokenizer | None):
        self.folder, self.manifest, self.session, self.tokenizer = folder, manifest, session, tokenizer
        self.compile_report = None  # set by compile()
        self._kv_owner = None  # the Conversation whose tokens are in the session's cache

    @property
    def context_length(self) -> int:
        return self.session.capacity

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.manifest["model"]["config"].get("eos_token_ids") or [])
        if self.tokenizer is not None:
            ids += [i for i in self.tokenizer.eos_token_ids if i not in ids]
        return tuple(ids)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError(f"engine '{self.folder}' has no tokenizer (its checkpoint had no tokenizer.json); "
                                  "pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    # -- generation -------------------------------------------------------------------------------------------
    def conversation(self, prefix_cache=None) -> Conversation:
        """A conversation that keeps its KV cache between turns (see conversation.py)."""
        return Conversation(self, prefix_cache)

    def stream_ids(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[int]:
        """One-shot generation from a clean cache: yield new token ids; the return value is the finish reason."""
        conversation = Conversation(self)
        conversation._activate()  # saves the cache of any conversation that owned it
        self.session.reset()
        logits = conversation.prefill_to(list(prompt_ids))
        return (yield from conversation.generate(logits, config))

    def stream_events(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[tuple[int, str]]:
        """Yield (token id, text delta) pairs, cutting the text at the first stop string; returns the finish reason."""
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        emitted = 0
        tokens = self.stream_ids(prompt_ids, config)
        while True:
            try:
                token = next(tokens)
            except StopIteration as stop:
                return stop.value
            if decoder is None:
                yield token, ""
                continue
            decoder.push(token)
            hit = _first_stop_string(decoder.text, config.stop_strings)
            end = len(decoder.text) if hit is None else hit
            yield token, decoder.text[emitted:end] if end > emitted else ""
            emitted = max(emitted, end)
            if hit is not None:
                tokens.close()
                return "stop"

    def complete(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                 on_text=None, **overrides) -> Completion:
        """Generate and return everything about it. ``on_text(delta)`` receives text as it is produced."""
        config = _merge(config, overrides)
        prompt_ids = self.encode(prompt)
        new_ids, pieces = [], []
        start = time.perf_counter()
        first_token_at = None
        events = self.stream_events(prompt_ids, config)
        while True:
            try:
                token, delta = next(events)
            except StopIteration as stop:
                reason = stop.value or "length"
                break
            first_token_at = first_token_at or time.perf_counter()
            new_ids.append(token)
            if delta:
                pieces.append(delta)
                if on_text:
                    on_text(delta)
        end = time.perf_counter()
        decode_s = end - (first_token_at or end)
        return Completion("".join(pieces), new_ids, len(prompt_ids), reason, (first_token_at or end) - start,
                          (len(new_ids) - 1) / decode_s if len(new_ids) > 1 and decode_s > 0 else 0.0)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], config: GenerationConfig | None = None,
                       **overrides) -> list[Completion]:
        """Generate for up to ``batch_size`` prompts at once (engines compiled with ``batch_size`` > 1); rows have
        their own lengths and sampling streams (seed + row index). Stop strings cut each row's text afterwards."""
        return generate_batch(self, prompts, _merge(config, overrides))

    def generate(self, prompt: str | Sequence[int], config: GenerationConfig | None = None, **overrides) -> str:
        return self.complete(prompt, config, **overrides).text

    def generate_ids(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                     **overrides) -> list[int]:
        return self.complete(prompt, config, **overrides).token_ids

    def stream(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
               **overrides) -> Iterator[str]:
        """Yield text pieces as tokens are generated."""
        if self.tokenizer is None:
            raise EngineError(f"engine '{self.folder}' has no tokenizer; use stream_ids with token ids")
        for _token, delta in self.stream_events(self.encode(prompt), _merge(config, overrides)):
            if delta:
                yield delta


def generate_batch(engine: "Engine", prompts: Sequence[str | Sequence[int]], config: GenerationConfig) -> list:
    """Rows of one batch, each with its own prompt length, position and sampling stream (seed + row). With
    ``config.prompt_lookup``, each row drafts from its own tokens and every call checks all rows' drafts at once."""
    session = engine.session
    rows = [engine.encode(p) for p in prompts]
    batch, capacity = session.batch_size, engine.context_length
    if not rows or len(rows) > batch:
        raise AgentOptError(f"{len(rows)} prompts for an engine compiled for batch {batch}; give 1 to {batch} "
                            f"prompts or recompile with --batch-size {len(rows)}")
    for row in rows:
        if not row or len(row) >= capacity:
            raise ContextOverflowError(f"a prompt has {len(row)} tokens; each must have 1 to {capacity - 1} "
                                       f"(the engine's context is {capacity})")
    shortest, longest = min(map(len, rows)), max(map(len, rows))
    spare = getattr(session, "ring_spare_slots", 0)
    if not getattr(session, "rewindable", True) and longest - shortest > spare:
        raise AgentOptError(f"prompts of {shortest} to {longest} tokens need right padding in one batch, and this "
                            f"engine's ring caches (bounded sparse-attention layers) can take {spare} pads at most: "
                            f"more would overwrite slots their row still reads; give prompts whose lengths differ by "
                            f"at most {spare}, or generate them one at a time")
    if config.prompt_lookup:
        check_prompt_lookup(session, config.prompt_lookup)
    Conversation(engine)._activate()  # saves the cache of any conversation that owned it
    engine._kv_owner = None
    session.reset()
    lengths = [len(r) for r in rows] + [1] * (batch - len(rows))  # unused rows run a 1-token dummy prompt
    width = max(lengths)
    ids = np.zeros((batch, width), dtype=np.int64)  # right padding: pads land past each row's end, never read
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
    start = time.perf_counter()
    logits = session.run(ids, np.broadcast_to(np.arange(width), (batch, width)), np.array(lengths) - 1)
    stops = set() if config.ignore_eos else set(
        config.stop_token_ids if config.stop_token_ids is not None else engine.eos_token_ids)
    rngs = [np.random.default_rng(None if config.seed is None else config.seed + b) for b in range(len(rows))]
    sampling = (config.temperature, config.top_k, config.top_p)
    histories = [list(r) for r in rows]  # prompt + output per row: what its drafts come from
    drafters = [DraftIndex() for _ in rows]
    drafts: list[list[int]] = [[] for _ in range(batch)]
    outputs: list[list[int]] = [[] for _ in rows]
    reasons: list[str | None] = [None if config.max_new_tokens else "length"] * len(rows)
    first_token_at = None
    while any(r is None for r in reasons):
        pending = np.zeros(batch, dtype=np.int64)
        for b in range(len(rows)):
            if reasons[b] is not None:
                continue
            for index in range(1 + len(drafts[b])):  # row 0: after the fed token; then one per draft token
                row_logits = logits[b, index]
                token = check_draft(row_logits, drafts[b][index], rngs[b], *sampling) \
                    if index < len(drafts[b]) else sample(row_logits, rngs[b], *sampling)
                if token in stops:
                    reasons[b] = "stop"
                    break
                outputs[b].append(token)
                histories[b].append(token)
                drafted = index < len(drafts[b]) and token == drafts[b][index]
                if drafted:
                    lengths[b] += 1  # its KV was written by the call that checked it
                if len(outputs[b]) == config.max_new_tokens:
                    reasons[b] = "length"
                elif not drafted and lengths[b] >= capacity:  # no slot left to feed it in
                    reasons[b] = "context"
                if reasons[b] is not None or not drafted:
                    pending[b] = token
                    break
        first_token_at = first_token_at or time.perf_counter()
        if all(r is not None for r in reasons):
            break
        # every row feeds the same number of tokens: its pending token, its draft, then padding past its end
        # (written where nothing reads it before the row's own tokens overwrite it)
        room = min(capacity - lengths[b] for b in range(len(rows)) if reasons[b] is None)
        for b in range(batch):
            active = b < len(rows) and reasons[b] is None
            drafts[b] = drafters[b].draft(histories[b], min(config.prompt_lookup, room - 1,
                                                            config.max_new_tokens - len(outputs[b]) - 1)) \
                if active and config.prompt_lookup else []
        width = 1 + max(len(d) for d in drafts)
        ids = np.zeros((batch, width), dtype=np.int64)
        for b in range(batch):
            ids[b, :1 + len(drafts[b])] = [pending[b], *drafts[b]]
        # active rows write at their own next positions; finished rows rewrite slots at their end (never read)
        positions = np.array([[min(n + i, capacity - 1) for i in range(width)] for n in lengths], dtype=np.int64)
        logits = session.run(ids, positions, np.broadcast_to(np.arange(width), (batch, width)))
        lengths = [n + 1 if b < len(rows) and reasons[b] is None else n for b, n in enumerate(lengths)]
    end = time.perf_counter()
    decoded = sum(len(o) for o in outputs)
    rate = (decoded - len(rows)) / (end - first_token_at) if first_token_at and end > first_token_at else 0.0
    texts = [engine.tokenizer.decode(o) if engine.tokenizer is not None else "" for o in outputs]
    return [Completion(_cut_at_stop(t, config.stop_strings), o, len(r), reasons[b] or "length",
                       (first_token_at or end) - start, rate) for b, (t, o, r) in enumerate(zip(texts, outputs, rows))]


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    hit = _first_stop_string(text, stops)
    return text if hit is None else text[:hit]


def _merge(config: GenerationConfig | None, overrides: dict) -> GenerationConfig:
    config = config or GenerationConfig()
    if not overrides:
        return config
    fields = set(GenerationConfig.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        raise AgentOptError(f"unknown generation option(s): {', '.join(sorted(unknown))}; "
                            f"options: {', '.join(sorted(fields))}")
    values = {**config.__dict__, **overrides}
    for key in ("stop_token_ids", "stop_strings"):
        if values[key] is not None:
            values[key] = tuple(values[key])
    return GenerationConfig(**values)


def _first_stop_string(text: str, stops: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


class _UnavailableSession:
    """Stands in for the session of an engine compiled for a device this machine lacks: any use raises why."""

    def __init__(self, error: Exception):
        self._error = error

    def __getattr__(self, name):
        raise self._error


def unloaded_engine(folder: str | Path, error: Exception) -> Engine:
    """The engine at ``folder`` (manifest and tokenizer read) without a session: generating with it raises
    ``error``. What ``compile`` returns for an engine built for a device this machine does not have."""
    folder = Path(folder)
    tokenizer = Tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    return Engine(folder, read_manifest(folder), _UnavailableSession(error), tokenizer)


def load_engine(folder: str | Path, device: str | None = None, threads: int | None = None,
                verify_hashes: bool = True) -> Engine:
    """Open an engine folder written by ``compile``. ``device`` overrides the one it was compiled for."""
    folder = Path(folder)
    manifest = read_manifest(folder, verify_hashes=verify_hashes)
    engine_section = manifest["engine"]
    backend = get_backend(engine_section.get("backend", "?"), device or engine_section.get("device", "cpu"))
    session = backend.load("session")(folder, engine_section, device or engine_section.get("device", "cpu"), threads)
    tokenizer = Tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    return Engine(folder, manifest, session, tokenizer)
