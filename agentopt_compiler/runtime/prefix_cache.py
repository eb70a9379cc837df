"""A prefix cache shared across conversations: KV rows of common token prefixes (system prompt + tool schemas),
keyed on token ids in a trie, so a new conversation starts without prefilling them again.

    cache = PrefixCache(max_bytes=256 << 20)
    cache.insert(tokens, rows)           # rows: {cache name: (B, Hkv, len(tokens), D)} from session.read_cache
    length, rows = cache.lookup(prompt)  # longest stored prefix of ``prompt`` (rows cut to that length)
    cache.pin(tokens)                    # never evicted

Memory is bounded: least recently used, unpinned entries are evicted first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..errors import AgentOptError


@dataclass
class _Node:
    children: dict[int, "_Node"] = field(default_factory=dict)
    key: tuple[int, ...] | None = None  # set where an entry ends


class PrefixCache:
    def __init__(self, max_bytes: int = 256 << 20):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise AgentOptError(f"max_bytes must be a whole number of bytes, 0 or more, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._root = _Node()
        self._entries: OrderedDict[tuple[int, ...], dict[str, np.ndarray]] = OrderedDict()  # LRU order
        self._pinned: set[tuple[int, ...]] = set()
        self.hits = self.misses = 0

    @property
    def bytes_used(self) -> int:
        return sum(a.nbytes for rows in self._entries.values() for a in rows.values())

    def __len__(self) -> int:
        return len(self._entries)

    def insert(self, tokens: list[int], rows: dict[str, np.ndarray], pin: bool = False) -> None:
        key = tuple(tokens)
        if not key:
            return
        node = self._root
        for token in key:
            node = node.children.setdefault(token, _Node())
        node.key = key
        self._entries[key] = rows
        self._entries.move_to_end(key)
        if pin:
            self._pinned.add(key)
        self._evict()

    def pin(self, tokens: list[int]) -> bool:
        key = tuple(tokens)
        if key in self._entries:
            self._pinned.add(key)
            return True
        return False

    def lookup(self, tokens: list[int], max_length: int | None = None) -> tuple[int, dict[str, np.ndarray] | None]:
        """The longest stored prefix of ``tokens`` (at most ``max_length`` tokens) and its rows."""
        limit = len(tokens) if max_length is None else min(max_length, len(tokens))
        node, best = self._root, None
        for token in tokens[:limit]:
            node = node.children.get(token)
            if node is None:
                break
            if node.key is not None:
                best = node.key
        if best is None:
            self.misses += 1
            return 0, None
        self.hits += 1
        self._entries.move_to_end(best)
        return len(best), self._entries[best]

    def _evict(self) -> None:
        while self.bytes_used > self.max_bytes:
            victim = next((k for k in self._entries if k not in self._pinned), None)
            if victim is None:
                return  # only pinned entries left: keep them
            del self._entries[victim]
            node = self._root
            for token in victim:
                node = node.children[token]
            node.key = None
