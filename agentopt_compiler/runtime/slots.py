"""KV slots: the rows of an engine's cache, each holding one conversation's keys and values (no torch).

    pool = SlotPool(session, host_bytes=1 << 30)
    row = pool.acquire(conversation)     # its row; nothing moves if it already has one
    pool.release(conversation)           # the row is free again, its contents forgotten

A conversation keeps its row while it is active, so switching between conversations copies nothing: a decode step
runs the rows of every decoding conversation together (scheduler.py). When every row is taken and another
conversation needs one, the least recently used idle holder is evicted: its cached rows are copied to host memory
and come back exactly when it is used again, or, once the host copies exceed ``host_bytes``, the oldest copies are
dropped and those conversations recompute their tokens when they return (correct, not cheap).

A session that runs all its rows in every call (``row_subsets`` False: TensorRT plans, engines compiled before
dynamic rows) has one slot, covering every row; conversations feed the same tokens to each row, and take turns on it
the same way.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import AgentOptError


class SlotsBusyError(AgentOptError):
    """Every slot holds a conversation that is generating: none can be evicted now."""


class SlotPool:
    def __init__(self, session, host_bytes: int = 1 << 30):
        self.session = session
        self.count = session.batch_size if session.row_subsets else 1
        self.host_bytes = host_bytes
        self.holders: list = [None] * self.count  # slot -> conversation
        self._recent: OrderedDict[int, None] = OrderedDict()  # slots by last use, oldest first
        self._evicted: OrderedDict = OrderedDict()  # conversations whose rows are on the host, oldest first
        self.evictions = self.drops = 0  # counts, for /metrics and tests

    def row(self, slot: int) -> int | None:
        """The cache row of ``slot``; None when the slot is every row of a session that runs them together."""
        return slot if self.session.row_subsets else None

    def rows(self, slot: int) -> range | None:
        return None if not self.session.row_subsets else range(slot, slot + 1)

    def free_slots(self) -> int:
        return sum(holder is None for holder in self.holders)

    def acquire(self, conversation) -> int:
        """Bind ``conversation`` to a slot (the lowest free one, else the least recently used idle holder's) and
        restore its evicted rows there. Raises SlotsBusyError when every holder is busy."""
        if conversation.slot is not None:
            self._recent.move_to_end(conversation.slot)
            return conversation.slot
        slot = next((s for s, holder in enumerate(self.holders) if holder is None), None)
        if slot is None:
            slot = next((s for s in self._recent if not self.holders[s].busy), None)
            if slot is None:
                raise SlotsBusyError(f"all {self.count} KV slots hold conversations that are generating")
            self.evict(slot)
        self.holders[slot] = conversation
        conversation.slot = slot
        self._recent[slot] = None
        self._recent.move_to_end(slot)
        saved = self._evicted.pop(conversation, None)
        if saved is not None and conversation.cached:
            self.session.write_cache(saved, self.row(slot))
        return slot

    def evict(self, slot: int) -> None:
        """Move the holder of ``slot`` out: its cached rows to host memory (dropping the oldest host copies beyond
        ``host_bytes``), the slot free."""
        holder = self.holders[slot]
        if holder is None:
            return
        if holder.cached:
            self._evicted[holder] = self.session.read_cache(holder.cached, self.row(slot))
            self.evictions += 1
            self._drop_over_budget()
        self._free(slot)

    def release(self, conversation) -> None:
        """Forget ``conversation``'s cache, wherever it is."""
        self._evicted.pop(conversation, None)
        if conversation.slot is not None:
            self._free(conversation.slot)

    def saved_rows(self, conversation) -> dict | None:
        """The host copy of an evicted conversation's rows (None when it has a slot or nothing is saved)."""
        return self._evicted.get(conversation)

    def keep_saved(self, conversation, rows: dict) -> None:
        """Hold ``rows`` as ``conversation``'s host copy (a conversation loaded from a file), as if evicted."""
        self._evicted[conversation] = rows
        self._drop_over_budget()

    @property
    def host_bytes_used(self) -> int:
        return sum(a.nbytes for rows in self._evicted.values() for a in rows.values())

    def _drop_over_budget(self) -> None:
        while self._evicted and self.host_bytes_used > self.host_bytes:
            dropped, _ = self._evicted.popitem(last=False)
            dropped.cached = 0  # it recomputes its tokens when it returns
            self.drops += 1

    def _free(self, slot: int) -> None:
        self.holders[slot].slot = None
        self.holders[slot] = None
        self._recent.pop(slot, None)
