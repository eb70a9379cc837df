"""What the runtime needs from a backend's session (deploy side: no torch). Every backend's session implements it;
the runtime reads these attributes directly, never by probing.

A session holds the KV caches of ``batch_size`` rows, each with ``capacity`` positions, between calls. A call feeds
new tokens to some rows at their positions, writes their keys and values into those rows, and returns the logits of
the tokens asked for:

    logits = session.run(input_ids (R, S), positions (R, S) or (S,), logits_index (R,) or (R, L), rows=range(a, b))
             # -> (R, L, V); R = b - a rows, default all of them

Rows are independent: a server keeps one agent session per row (runtime/slots.py) and runs the rows of every
decoding session in one call. Sessions whose graph cannot run a subset of rows (``row_subsets`` False: TensorRT
plans, engines compiled before dynamic rows) run all rows in every call.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Session(Protocol):
    capacity: int  # cache positions per row (prompt plus generated tokens)
    batch_size: int  # cache rows held
    multi_logits: bool  # a call can return the logits of several tokens per row (prompt-lookup drafts)
    row_subsets: bool  # ``run`` accepts ``rows``: a contiguous range of rows, run alone
    batched_chunks: bool  # a call may add several tokens per row after cached ones with more than one row
    rewindable: bool  # False for ring caches (bounded sparse layers): old positions are overwritten
    ring_spare_slots: int  # ring slots beyond sinks + window: how far past a row's end a call may write, then undo
    max_call_tokens: int | None  # longer calls are split (ring caches stored before attending)

    def run(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray | None = None,
            rows: range | None = None) -> np.ndarray: ...

    def reset(self) -> None:
        """Zero every row (stale rows are never read, since positions mask them; zeros keep runs reproducible)."""

    def read_cache(self, length: int, row: int | None = None) -> dict[str, np.ndarray]:
        """Host copies of positions [0, length) of one row (1, Hkv, length, D), or of all rows."""

    def write_cache(self, cached: dict[str, np.ndarray], row: int | None = None) -> None:
        """Put rows saved by ``read_cache`` back at positions [0, length) of ``row`` (or of all rows)."""

    def cache_addresses(self) -> dict[str, int]: ...
