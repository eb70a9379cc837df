"""The token inputs of one session call, shaped as every backend's graph takes them (deploy side: numpy only)."""

from __future__ import annotations

import numpy as np

from ..errors import EngineError


def call_inputs(input_ids, positions, logits_index, multi_logits: bool):
    """(input_ids (B, S), positions (B, S), logits_index as the graph takes it, L): int64, contiguous.

    ``positions`` may be (S,) for every row; ``logits_index`` None (the last token of each row), (B,) or (B, L).
    Engines compiled before multi-position logits (``multi_logits`` False) take (B,) and refuse L > 1."""
    input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
    batch, length = input_ids.shape
    positions = np.ascontiguousarray(np.broadcast_to(positions, (batch, length)), dtype=np.int64)
    if logits_index is None:
        logits_index = np.full(batch, length - 1, dtype=np.int64)
    logits_index = np.asarray(logits_index, dtype=np.int64).reshape(batch, -1)  # (B, L)
    picks = logits_index.shape[1]
    if picks != 1 and not multi_logits:
        raise EngineError("this engine returns the logits of one token per row and call (it was compiled before "
                          "multi-position logits); recompile it with agentopt compile")
    return input_ids, positions, np.ascontiguousarray(logits_index if multi_logits else logits_index[:, 0]), picks


def run_in_chunks(run, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray, chunk: int):
    """One call as consecutive calls of at most ``chunk`` tokens, for graphs that are exact only for calls that
    short (ring caches stored before attending, GroupQueryAttention at batch > 1); the logits each row asked for in
    ``logits_index`` (B, L) are gathered from the call that computed them. ``run(ids, positions, logits_index)``
    takes (B, S) inputs and (B, L') picks and returns (B, L', V)."""
    picks = logits_index.reshape(len(input_ids), -1)  # (B, L) indices into the whole call
    found: dict[int, np.ndarray] = {}  # token index -> (B, V) logits
    for start in range(0, input_ids.shape[1], chunk):
        stop = min(start + chunk, input_ids.shape[1])
        wanted = sorted({int(i) for i in picks.ravel() if start <= i < stop}) or [stop - 1]
        logits = run(input_ids[:, start:stop], positions[:, start:stop],
                     np.broadcast_to(np.array(wanted) - start, (len(input_ids), len(wanted))))
        found.update({index: logits[:, j] for j, index in enumerate(wanted)})
    return np.stack([np.stack([found[int(i)][b] for i in row]) for b, row in enumerate(picks)])
