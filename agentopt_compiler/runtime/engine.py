"""A loaded engine folder and text generation over it (deploy side: no torch).

    load_engine(folder) -> Engine
    engine.generate("Hello", max_new_tokens=32)            -> str
    engine.stream("Hello")                                 -> iterator of text pieces
    engine.generate_ids([1, 2, 3], max_new_tokens=32)      -> list[int]
    engine.complete(...)                                   -> Completion (text, ids, finish reason, timings)

Generation = one prefill call over the prompt, then one decode call per new token (generation.py); the session holds
the KV caches of the engine's slots (slots.py): one per conversation in use; ``generate_batch`` and ``agentopt serve``
decode many of them in one call (scheduler.py).
"""

from __future__ import annotations

import threading
import time
from functools import cached_property
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..backends import get_backend
from ..errors import AgentOptError, EngineError
from .conversation import Conversation
from .generation import Completion, GenerationConfig, TextStream, TokenPicker
from .manifest import read_manifest
from .slots import SlotPool
from .tokenizer import Tokenizer

__all__ = ["Completion", "Engine", "GenerationConfig", "load_engine"]


class Engine:
    def __init__(self, folder: Path, manifest: dict, session, tokenizer: Tokenizer | None):
        self.folder, self.manifest, self.session, self.tokenizer = folder, manifest, session, tokenizer
        self.compile_report = None  # set by compile()
        self.lock = threading.RLock()  # one call at a time on the session (a scheduler thread, or the caller)

    @cached_property
    def slots(self) -> SlotPool:
        """The KV slots: rows of the session's caches, one per conversation in use (slots.py)."""
        return SlotPool(self.session)

    @property
    def context_length(self) -> int:
        return self.session.capacity

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        ids = list(self.manifest["model"]["config"].get("eos_token_ids") or [])
        if self.tokenizer is not None:
            ids += [i for i in self.tokenizer.eos_token_ids if i not in ids]
        return tuple(ids)

    def token_picker(self, config: GenerationConfig) -> TokenPicker:
        """The token choices of one sequence generated with ``config`` on this engine (generation.py)."""
        vocab = self.manifest["model"]["config"]["vocab_size"]
        outside = [t for t in config.stop_token_ids or () if not 0 <= t < vocab]
        if outside:  # they could never be generated: the sequence would run on past where it was meant to stop
            raise AgentOptError(f"stop_token_ids {outside} are not token ids of this model (0 to {vocab - 1})")
        if (config.whole_tool_names or config.whole_enum_values) and not self.session.rewindable:
            # scoring names (values) writes past a ring cache's end
            config = config.with_options(whole_tool_names=False, whole_enum_values=False)
        return TokenPicker(config, self.eos_token_ids, self.context_length, self.tokenizer, vocab)

    def encode(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text (``add_special_tokens=False`` for a rendered chat, whose template wrote them) or the
        ids given, checked against the model's vocabulary."""
        vocab = self.manifest["model"]["config"]["vocab_size"]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError(f"engine '{self.folder}' has no tokenizer (its checkpoint had no tokenizer.json), "
                                  "so it takes token ids, not text: put the checkpoint's tokenizer.json (and "
                                  "tokenizer_config.json) in its folder and recompile, or pass ids from Python "
                                  "(engine.complete([ids...]))")
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:  # e.g. Gemma 3's <image_soft_token> (262144) beside a 262144-row text embedding
                raise AgentOptError(f"the text holds the token {self.tokenizer.decode([bad], False)!r} (id {bad}), "
                                    f"which this model cannot read: its vocabulary ends at id {vocab - 1} (the "
                                    "tokenizer knows more tokens than the model); remove it from the text")
            return ids
        if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, (list, tuple, range, np.ndarray)) \
                or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise AgentOptError(f"a prompt is text (str) or a list of token ids (ints), got {_shown(prompt)}")
        ids = [int(t) for t in prompt]
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise AgentOptError(f"token id {bad} is outside this model's vocabulary (0 to {vocab - 1})")
        return ids

    # -- generation -------------------------------------------------------------------------------------------
    def conversation(self, prefix_cache=None) -> Conversation:
        """A conversation that keeps its KV cache between turns (see conversation.py)."""
        return Conversation(self, prefix_cache)

    def stream_ids(self, prompt_ids: Sequence[int], config: GenerationConfig) -> Iterator[int]:
        """One-shot generation in a fresh conversation: yield new token ids; the return value is the finish reason."""
        conversation = Conversation(self)
        try:
            logits = conversation.prefill_to(list(prompt_ids))
            return (yield from conversation.generate(logits, config))
        finally:
            conversation.release()

    def stream_events(self, prompt_ids: Sequence[int], config: GenerationConfig
                      ) -> Iterator[tuple[int | None, str]]:
        """Yield (token id, text delta) pairs, the text cut at the first stop string (text held back because it might
        have begun one comes last, with token None); returns the finish reason."""
        text = (TextStream(self.tokenizer, config.stop_strings, config.stops_skip_calls)
                if self.tokenizer is not None else None)
        tokens = self.stream_ids(prompt_ids, config)
        while True:
            try:
                token = next(tokens)
            except StopIteration as stop:
                tail = text.flush() if text is not None else ""
                if tail:
                    yield None, tail
                return stop.value
            yield token, text.push(token) if text is not None else ""
            if text is not None and text.stop is not None:
                tokens.close()
                return "stop"

    def complete(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                 on_text=None, **overrides) -> Completion:
        """Generate and return everything about it. ``on_text(delta)`` receives text as it is produced."""
        if on_text is not None and not callable(on_text):
            raise AgentOptError(f"on_text must be a function taking a text delta, got {on_text!r}")
        config = _config(config, overrides)
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
            if token is not None:
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
        """Generate for several prompts at once: each gets a KV slot (engines have ``batch_size`` of them, or the
        ``slots`` given to load_engine) and all decode together, one call per step (scheduler.py); prompts beyond
        the slots wait for one. Each prompt has its own length and sampling stream (seed + its index)."""
        from .scheduler import Scheduler

        config = _config(config, overrides)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise AgentOptError(f"generate_batch takes a list of prompts, got {_shown(prompts)}")
        rows = [self.encode(p) for p in prompts]
        if not rows:
            raise AgentOptError("generate_batch needs at least one prompt")
        empty = next((index for index, row in enumerate(rows) if not row), None)
        if empty is not None:
            raise AgentOptError(f"prompt {empty} is empty; give at least one token")
        scheduler = Scheduler(self, prefill_chunk=max(map(len, rows)), max_waiting=len(rows))
        outputs: list[list[int]] = [[] for _ in rows]
        results: list[dict] = [{} for _ in rows]

        def collect(index: int):
            def on_event(event: dict) -> None:
                if event.get("token") is not None:
                    outputs[index].append(event["token"])
                if "done" in event or "error" in event:  # "done" carries the whole text
                    results[index] = event
            return on_event

        start = time.perf_counter()
        conversations = [Conversation(self) for _ in rows]
        requests = [scheduler.submit(row, config.with_options(seed=None if config.seed is None else config.seed + b),
                                     collect(b), conversation=conversations[b]) for b, row in enumerate(rows)]
        try:
            scheduler.run(requests)
        finally:
            for conversation in conversations:
                conversation.release()
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise errors[0]
        completions = []
        for b, request in enumerate(requests):
            ttft = (request.first_token_at or request.finished_at) - start
            decode_s = request.finished_at - (request.first_token_at or request.finished_at)
            rate = (len(outputs[b]) - 1) / decode_s if len(outputs[b]) > 1 and decode_s > 0 else 0.0
            completions.append(Completion(results[b]["text"], outputs[b], len(rows[b]), results[b]["done"], ttft,
                                          rate))
        return completions

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
        config = _config(config, overrides)
        for _token, delta in self.stream_events(self.encode(prompt), config):
            if delta:
                yield delta


def _config(config, overrides: dict) -> GenerationConfig:
    if config is not None and not isinstance(config, GenerationConfig):
        raise AgentOptError(f"config must be a GenerationConfig (or None, with options as keywords), got "
                            f"{_shown(config)}")
    return (config or GenerationConfig()).with_options(**overrides)


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


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
                verify_hashes: bool = True, slots: int | None = None) -> Engine:
    """Open an engine folder written by ``compile``. ``device`` overrides the one it was compiled for; ``slots``
    the number of KV slots (cache rows; default the compiled batch size), for engines with dynamic rows."""
    for name, value in (("slots", slots), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise AgentOptError(f"{name} must be a whole number of at least 1 (or None), got {value!r}")
    if not isinstance(folder, (str, Path)) or not str(folder):
        raise AgentOptError(f"folder must be the path of an engine folder, got {folder!r}")
    folder = Path(folder)
    manifest = read_manifest(folder, verify_hashes=verify_hashes)
    engine_section = manifest["engine"]
    backend = get_backend(engine_section.get("backend", "?"), device or engine_section.get("device", "cpu"))
    device = device or engine_section.get("device", "cpu")
    options = {"slots": slots} if slots is not None else {}
    try:
        session = backend.load("session")(folder, engine_section, device, threads, **options)
    except MemoryError:
        raise EngineError(f"not enough memory to open '{folder}' with {slots or engine_section['batch_size']} KV "
                          "slot(s): give fewer slots (--slots), or recompile with a smaller --context-length") from None
    tokenizer = Tokenizer(folder) if (folder / "tokenizer.json").is_file() else None
    return Engine(folder, manifest, session, tokenizer)
