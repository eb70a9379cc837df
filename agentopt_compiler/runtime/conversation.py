"""A conversation's tokens and their KV cache on an engine, kept between turns.

    conv = Conversation(engine, prefix_cache)
    logits = conv.prefill_to(prompt_ids)      # computes KV only for tokens not already cached
    for token in conv.generate(logits, config): ...
    conv.rewind(n); conv.save(path); Conversation.load(engine, path)

``prefill_to`` compares the new prompt with the tokens whose KV is cached and keeps their longest common prefix
(a re-rendered conversation often differs from what was generated, e.g. templates that strip reasoning): it rewinds
to that point and prefills only the rest. A generated token's KV is computed when the next call feeds it, so tokens
appended right after generation see exactly the cache a full recompute would build.

Engines with ring caches (bounded sparse-attention layers) keep only the last window of tokens, so going back
(a shorter common prefix than what is cached) recomputes the conversation from its start, and only the whole
cached state can be shared as a prefix. Drafts the model rejects are stepped back over all the same: they were
written into the ring's spare slots, which hold only positions already out of the window.

The engine has one cache buffer (per batch row); conversations take turns owning it. Switching owners saves the
outgoing conversation's rows and restores the incoming one's (a copy of the used rows only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import AgentOptError, ContextOverflowError
from . import prompt_lookup
from .sampling import check_draft, sample


class Conversation:
    def __init__(self, engine, prefix_cache=None):
        self.engine = engine
        self.prefix_cache = prefix_cache
        self.tokens: list[int] = []  # the conversation so far
        self.cached = 0  # tokens[:cached] have their KV in the cache (or in _saved)
        self._saved: dict[str, np.ndarray] | None = None
        self._drafted_until = 0  # rows [cached, this) hold the KV of drafted tokens being checked
        self._drafts = prompt_lookup.DraftIndex()
        self.prefilled_tokens = 0  # totals over the conversation's life, for reports and benchmarks
        self.reused_tokens = 0
        self.drafted_tokens = 0  # prompt-lookup draft tokens checked, and those the model agreed with
        self.accepted_draft_tokens = 0

    # -- cache ownership ---------------------------------------------------------------------------------
    def _activate(self) -> None:
        owner = getattr(self.engine, "_kv_owner", None)
        if owner is self:
            return
        if owner is not None:
            # drafted rows not yet accepted or rejected are kept too: the owner may still accept them
            rows = max(owner.cached, owner._drafted_until)
            owner._saved = self.engine.session.read_cache(rows) if rows else None
        if self._saved is not None and self.cached:
            self.engine.session.write_cache(self._saved)
        self._saved = None
        self.engine._kv_owner = self

    def release(self) -> None:
        """Forget this conversation's cache (e.g. when a client disconnects)."""
        if getattr(self.engine, "_kv_owner", None) is self:
            self.engine._kv_owner = None
        self._saved, self.cached, self.tokens, self._drafted_until = None, 0, [], 0

    # -- feeding tokens ------------------------------------------------------------------------------------
    def rewind(self, length: int) -> None:
        """Keep only the first ``length`` tokens."""
        if length < 0:
            raise AgentOptError(f"cannot rewind to {length} tokens")
        self.tokens = self.tokens[:length]
        if length < self.cached and not getattr(self.engine.session, "rewindable", True):
            self.cached = 0  # a ring cache no longer holds the state at ``length``: the next prefill starts over
        self.cached = min(self.cached, length)

    def _feed(self, ids: list[int], start: int, picks: int = 1) -> np.ndarray:
        """Feed ``ids`` at positions ``start``...; return the logits (B, picks, V) of the last ``picks`` of them."""
        session = self.engine.session
        batch = session.batch_size
        logits_index = np.arange(len(ids) - picks, len(ids))[None].repeat(batch, axis=0) if picks > 1 else None
        return session.run(np.array([ids] * batch, dtype=np.int64), np.arange(start, start + len(ids), dtype=np.int64),
                           logits_index)

    def prefill_to(self, prompt_ids: list[int]) -> np.ndarray:
        """Make the cache hold ``prompt_ids``; return the logits (B, 1, V) after its last token."""
        prompt_ids = [int(t) for t in prompt_ids]
        capacity = self.engine.context_length
        if not prompt_ids:
            raise AgentOptError("the prompt is empty; give at least one token")
        if len(prompt_ids) >= capacity:
            raise ContextOverflowError(f"the prompt has {len(prompt_ids)} tokens but the engine's context holds "
                                       f"{capacity} (prompt plus at least one new token); shorten the prompt or "
                                       f"recompile with a larger --context-length")
        self._activate()
        keep = _common_prefix(self.tokens[:self.cached], prompt_ids)
        keep = min(keep, len(prompt_ids) - 1)  # the last prompt token is always fed: we need its logits
        if keep < self.cached and not getattr(self.engine.session, "rewindable", True):
            keep = 0  # a ring cache has overwritten what rewinding needs: recompute (correct, not cheap)
        if self.prefix_cache is not None:
            length, rows = self.prefix_cache.lookup(prompt_ids, max_length=len(prompt_ids) - 1)
            if length > keep:
                self.engine.session.write_cache({name: r[:, :, :length] for name, r in rows.items()})
                keep = length
        self.reused_tokens += keep
        self.prefilled_tokens += len(prompt_ids) - keep
        logits = self._feed(prompt_ids[keep:], keep)
        self.tokens, self.cached, self._drafted_until = list(prompt_ids), len(prompt_ids), 0
        return logits

    def remember_prefix(self, length: int, pin: bool = False) -> None:
        """Store the KV of the first ``length`` cached tokens in the shared prefix cache."""
        if self.prefix_cache is None or length <= 0 or length > self.cached:
            return
        if length != self.cached and not getattr(self.engine.session, "rewindable", True):
            return  # ring caches hold the state after all cached tokens, not after the first ``length``
        self._activate()
        self.prefix_cache.insert(self.tokens[:length], self.engine.session.read_cache(length), pin=pin)

    def generate(self, logits: np.ndarray, config) -> Iterator[int]:
        """Sample tokens after ``prefill_to``; each yielded token is appended to the conversation. Returns the
        finish reason: "stop", "length" or "context".

        With ``config.prompt_lookup`` > 0, each call also checks up to that many drafted tokens (prompt_lookup.py)
        and keeps them up to the first the model does not choose (``check_draft``): greedy, the same tokens; sampled,
        the same distribution."""
        stops = set() if config.ignore_eos else set(
            config.stop_token_ids if config.stop_token_ids is not None else self.engine.eos_token_ids)
        rng = np.random.default_rng(config.seed)
        sampling = (config.temperature, config.top_k, config.top_p)
        capacity = self.engine.context_length
        if config.prompt_lookup:
            check_prompt_lookup(self.engine.session, config.prompt_lookup)
        if config.max_new_tokens == 0:
            return "length"
        rows = logits[0, -1:]  # (L, V): the first row gives the next token; the rest check the draft fed with it
        draft: list[int] = []
        generated = 0
        while True:
            for index, row in enumerate(rows):
                token = check_draft(row, draft[index], rng, *sampling) if index < len(draft) else \
                    sample(row, rng, *sampling)
                if token in stops:
                    return "stop"
                self.tokens.append(token)
                generated += 1
                drafted = index < len(draft) and token == draft[index]  # its KV is already in the cache
                if drafted:
                    self.cached += 1
                    self.accepted_draft_tokens += 1
                yield token
                if generated == config.max_new_tokens:
                    return "length"
                if len(self.tokens) > capacity:
                    return "context"
                if not drafted:
                    break  # the next call feeds this token (its KV is computed there)
            draft = self._drafts.draft(self.tokens, min(config.prompt_lookup, config.max_new_tokens - generated - 1,
                                                        capacity - len(self.tokens))) if config.prompt_lookup else []
            self._activate()
            fed = [self.tokens[-1], *draft]
            logits = self._feed(fed, self.cached, picks=len(fed))  # (B, 1 + len(draft), V)
            self.cached += 1
            self._drafted_until = self.cached + len(draft)
            self.drafted_tokens += len(draft)
            rows = logits[0]

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write tokens and cached KV rows to ``path`` (.npz), tagged with the engine's graph hash."""
        rows = self.engine.session.read_cache(self.cached) if self.engine._kv_owner is self else (self._saved or {})
        meta = {"tokens": self.tokens, "cached": self.cached, "engine": _engine_id(self.engine)}
        np.savez(path, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                 **{f"cache:{k}": v for k, v in rows.items()})

    @classmethod
    def load(cls, engine, path: str | Path, prefix_cache=None) -> "Conversation":
        with np.load(path) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            rows = {k[len("cache:"):]: data[k] for k in data.files if k.startswith("cache:")}
        if meta["engine"] != _engine_id(engine):
            raise AgentOptError(f"conversation '{path}' was saved from a different engine; it can only be loaded "
                                "into the engine that made it")
        conversation = cls(engine, prefix_cache)
        conversation.tokens, conversation.cached = meta["tokens"], meta["cached"]
        conversation._saved = rows or None
        return conversation


def check_prompt_lookup(session, draft_tokens: int) -> None:
    """Raise why ``session`` cannot decode with prompt-lookup drafts of up to ``draft_tokens``, if it cannot."""
    if not getattr(session, "multi_logits", False):
        raise AgentOptError("prompt lookup needs the logits of several tokens per call, and this engine returns "
                            "one (it was compiled before that); recompile it with agentopt compile")
    if not getattr(session, "batched_chunks", True):
        raise AgentOptError("prompt lookup checks several new tokens per row in one call, which onnxruntime's "
                            "GroupQueryAttention does at batch size 1 only; for prompt lookup on this batch engine, "
                            "compile it with --attention-impl standard")
    spare = getattr(session, "ring_spare_slots", 0)
    if not getattr(session, "rewindable", True) and draft_tokens > spare:
        raise AgentOptError(f"prompt lookup writes up to {draft_tokens} drafted tokens into the cache and steps back "
                            f"over the rejected ones, but this engine's ring caches (bounded sparse-attention "
                            f"layers) keep {spare} spare slots for that; use a prompt lookup of at most {spare}"
                            + ("" if spare else " (none: recompile the engine to get spare slots)"))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _engine_id(engine) -> str:
    files = engine.manifest["files"]
    return files[engine.manifest["engine"]["graph"]]["sha256"]
