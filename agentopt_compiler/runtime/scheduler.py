"""Continuous batching: many sequences share an engine's KV slots, with one batched decode call per step (no torch).

    scheduler = Scheduler(engine, prefill_chunk=64, max_waiting=64)
    scheduler.start()                                    # a background thread runs the steps
    request = scheduler.submit(prompt_ids, config, on_event=print, shared_prefix=n)
    request.cancel()                                     # e.g. the client went away
    scheduler.stop()

or, in the caller's thread, ``scheduler.run([...requests])`` until they finish (``engine.generate_batch``).

Each step, under the engine's lock:
  1. cancelled requests finish, and their conversations are released;
  2. waiting requests are admitted in arrival order while a slot can be had: the request's conversation (given, or
     the idle one that caches the longest prefix of the prompt beyond what sessions share, else a new one) is bound
     to a KV slot and keeps what it caches: earlier turns, or a prefix-cache hit copied into the slot once;
  3. prefill: one chunk of ``prefill_chunk`` prompt tokens beside a decode call (every pending chunk when none
     decodes), each chunk one call on the request's row alone (ONNX Runtime's GroupQueryAttention takes several new
     tokens after cached ones only at batch size 1); a prompt's last token is left for step 4;
  4. decode: one call over the rows [lo, hi) of every request with exactly one token to feed (a sampled token, or a
     prompt's last one), with its prompt-lookup draft where the kernel checks several tokens per row (the standard
     lowering; GroupQueryAttention only when one row decodes); each request then picks its tokens from its rows.

Rows in [lo, hi) that do not decode this step (free, idle or prefilling slots) compute a dummy token at their
conversation's next free position: nothing reads it before that conversation writes there itself. Chunk boundaries
depend on the request alone (never on what else runs), and rows are computed independently, so a greedy request
gets the tokens it would get served alone.

Two requests that share a prefix (``shared_prefix``: a system prompt and tool schemas) do not both prefill it: the
second waits until the first has stored it in the prefix cache, then starts from there.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import AgentOptError
from .conversation import Conversation, check_prompt_lookup, common_prefix
from .generation import GenerationConfig, TextStream, TokenPicker

MIN_SHARED_PREFIX = 16  # tokens: shorter common heads (template markers) do not make two requests one conversation


class QueueFullError(AgentOptError):
    """The scheduler's waiting queue is full: try again later (HTTP 429)."""


@dataclass(eq=False)
class Request:
    """One generation on the scheduler. Events, from the scheduler's thread, to ``on_event``:
    {"token": id, "text": delta} per token, then {"done": finish_reason, "usage": {...}, "text": visible text}
    (finish_reason: stop, length, context or cancelled), or {"error": AgentOptError}."""

    prompt_ids: list[int]
    config: GenerationConfig
    on_event: Callable[[dict], None]
    conversation: Conversation | None = None  # None: the scheduler picks one from its pool
    shared_prefix: int = 0  # first tokens that other requests are likely to share: kept in the prefix cache
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    picker: TokenPicker | None = None
    text: TextStream | None = None
    reused: int = 0  # prompt tokens whose KV was already cached (earlier turns or the prefix cache)

    def cancel(self) -> None:
        self.cancelled = True


class Scheduler:
    def __init__(self, engine, prefill_chunk: int = 64, max_waiting: int = 64, max_conversations: int | None = None,
                 prefix_cache=None):
        if prefill_chunk < 1:
            raise AgentOptError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.engine, self.prefill_chunk, self.max_waiting = engine, prefill_chunk, max_waiting
        self.prefix_cache = prefix_cache
        # conversations kept for requests to continue: idle ones beyond their slots live in host memory, bounded by
        # the slot pool's host budget (which drops the oldest copies); this only bounds the matching work
        self.max_conversations = max_conversations or max(256, 4 * engine.slots.count)
        self.conversations: list[Conversation] = []  # the pool requests continue from, most recently used last
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []  # admitted, in admission order
        self._unfinished = 0  # submitted and not finished: waiting, being admitted, or running
        self._heads_in_flight: dict[tuple[int, ...], Request] = {}  # shared prefixes being prefilled
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"requests": 0, "rejected": 0, "generated_tokens": 0, "prefilled_tokens": 0,
                      "reused_tokens": 0, "decode_steps": 0, "decode_rows": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens generated) of the last minute's steps

    # -- outside the scheduler's thread ---------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], config: GenerationConfig, on_event: Callable[[dict], None],
               conversation: Conversation | None = None, shared_prefix: int = 0,
               picker: TokenPicker | None = None) -> Request:
        """Queue a request; raises QueueFullError when ``max_waiting`` requests already wait. ``picker``: one made
        for ``config`` already (the server checks a grammar's room that way), else it is made on admission."""
        if config.prompt_lookup:
            check_prompt_lookup(self.engine.session, config.prompt_lookup)
        request = Request(list(prompt_ids), config, on_event, conversation, shared_prefix, picker=picker)
        with self._wake:
            if len(self._waiting) >= self.max_waiting:
                self.stats["rejected"] += 1
                waiting = len(self._waiting)
                raise QueueFullError(f"{waiting} request{'s are' if waiting != 1 else ' is'} waiting for a KV slot "
                                     "(the most this server queues); retry shortly")
            self._waiting.append(request)
            self._unfinished += 1
            self.stats["requests"] += 1
            self._wake.notify()
        return request

    def wake(self) -> None:
        """Make the thread look at cancellations now rather than after its current step."""
        with self._wake:
            self._wake.notify()

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="agentopt-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Requests out of the queue and not finished, counted from the moment they leave it: a request being
        admitted (its grammar compiling, its conversation bound) is in neither the queue nor the running list."""
        with self._wake:
            return self._unfinished - len(self._waiting)

    def recent_tokens_per_second(self, window_s: float = 10.0) -> float:
        """Tokens generated per second over the last ``window_s`` seconds."""
        now = time.perf_counter()
        return sum(n for t, n in list(self._recent) if now - t <= window_s) / window_s

    def run(self, requests: list[Request]) -> None:
        """Step in the caller's thread until ``requests`` (already submitted) have finished."""
        while any(r.finished_at is None for r in requests):
            with self.engine.lock:
                self.step()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._running):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                with self.engine.lock:
                    self.step()
            except Exception as exc:  # noqa: BLE001  a bug or a backend failure in a batched call: fail what runs,
                for request in list(self._running):  # keep serving
                    self._fail(request, exc)

    # -- one step (the engine's lock held) ------------------------------------------------------------------------
    def step(self) -> None:
        for request in [r for r in self._running if r.cancelled]:
            request.conversation.release()
            self._forget(request.conversation)
            self._finish(request, "cancelled")
        self._admit()
        self._prefill()
        self._decode()

    def _admit(self) -> None:
        slots = self.engine.slots
        with self._wake:
            queued = list(self._waiting)
        for request in queued:
            if request.cancelled:
                self._dequeue(request)
                self._finish(request, "cancelled")
                continue
            if slots.free_slots() == 0 and all(h.busy for h in slots.holders):
                return  # nothing can be evicted: wait for a request to finish
            head = tuple(request.prompt_ids[:request.shared_prefix]) \
                if request.shared_prefix and self.prefix_cache is not None else None
            if head and head in self._heads_in_flight and not self._prefix_cached(head):
                continue  # another request is prefilling this head: start from the prefix cache once it is there
            self._dequeue(request)
            conversation = request.conversation or self._conversation_for(request)
            request.conversation, conversation.busy = conversation, True
            try:
                request.reused = conversation.begin_turn(request.prompt_ids)
            except AgentOptError as exc:
                conversation.busy = False
                self._finish(request, None, exc)
                continue
            try:
                request.picker = request.picker or self.engine.token_picker(request.config)
            except AgentOptError as exc:  # a grammar llguidance cannot compile
                conversation.busy = False
                self._finish(request, None, exc)
                continue
            if self.engine.tokenizer is not None:
                request.text = TextStream(self.engine.tokenizer, request.config.stop_strings,
                                          request.config.stops_skip_calls)
            self._running.append(request)
            self.stats["reused_tokens"] += request.reused
            self.stats["prefilled_tokens"] += len(request.prompt_ids) - request.reused
            if head and request.reused < len(head):
                self._heads_in_flight.setdefault(head, request)

    def _prefill(self) -> None:
        """Chunks of ``prefill_chunk`` prompt tokens, counted from each turn's first uncached token (so boundaries
        never depend on what else runs): one chunk in all beside a decode call, which keeps the decoding sessions'
        inter-token latency down; every pending chunk when no session decodes."""
        decoding = any(self._decode_ready(r) for r in self._running)
        for request in list(self._running):
            while self._prefill_chunk(request):
                if decoding:
                    return

    def _prefill_chunk(self, request: Request) -> bool:
        """Feed the next chunk of ``request``'s prompt; False when nothing was left to feed. The last prompt token
        is fed by a decode call, which picks the first new token from its logits; a request for no new tokens
        (max_tokens 0) still caches its whole prompt, for the conversation's next turn, and then finishes."""
        conversation, nothing_to_generate = request.conversation, request.picker.finish is not None
        remaining = len(conversation.tokens) - conversation.cached - (0 if nothing_to_generate else 1)
        if remaining > 0:
            start, count = conversation.cached, min(remaining, self.prefill_chunk)
            conversation.feed(conversation.tokens[start:start + count], start)
            conversation.cached += count
            self._remember_head(request)
        if nothing_to_generate and conversation.cached == len(conversation.tokens):
            self._finish(request, request.picker.finish)
        return remaining > 0

    @staticmethod
    def _decode_ready(request: Request) -> bool:
        """Exactly one token to feed (a sampled one, or the prompt's last) and more to generate."""
        return len(request.conversation.tokens) - request.conversation.cached == 1 and request.picker.finish is None

    def _decode(self) -> None:
        ready = [r for r in self._running if self._decode_ready(r)]
        if not ready:
            return
        engine, session, slots = self.engine, self.engine.session, self.engine.slots
        by_slot = {r.conversation.slot: r for r in ready}
        lo, hi = (min(by_slot), max(by_slot) + 1) if session.row_subsets else (0, 1)
        frontier = {}  # slot -> the next free position of a row that does not decode this step
        for slot in range(lo, hi):
            holder = slots.holders[slot]
            if slot not in by_slot and holder is not None and not holder.busy \
                    and holder.cached >= engine.context_length:
                slots.evict(slot)  # a full idle row has no free position for the dummy token
            if slot not in by_slot:
                frontier[slot] = slots.holders[slot].cached if slots.holders[slot] is not None else 0
        # tokens per row this call: 1, plus a draft where the kernel checks several new tokens per row
        room = min([engine.context_length - r.conversation.cached for r in ready]
                   + [engine.context_length - f for f in frontier.values()])
        if not session.rewindable:
            room = min(room, session.ring_spare_slots + 1)  # writes past a row's end land in the ring's spare slots
        several = session.multi_logits and (len(ready) == 1 or session.batched_chunks)
        drafts = {r: r.picker.next_draft(r.conversation.tokens, room - 1) if several else [] for r in ready}
        width = 1 + max(len(d) for d in drafts.values())
        count = hi - lo
        ids = np.zeros((count, width), dtype=np.int64)
        positions = np.zeros((count, width), dtype=np.int64)
        for slot in range(lo, hi):
            request = by_slot.get(slot)
            start = request.conversation.cached if request else frontier[slot]
            if request:
                fed = [request.conversation.tokens[-1], *drafts[request]]
                ids[slot - lo, :len(fed)] = fed
            positions[slot - lo] = np.arange(start, start + width)
        if not session.row_subsets and session.batch_size > 1:  # one slot of every row: each row the same
            ids, positions = np.repeat(ids, session.batch_size, 0), np.repeat(positions, session.batch_size, 0)
        picks = np.broadcast_to(np.arange(width), ids.shape) if width > 1 else None
        logits = session.run(ids, positions, picks, range(lo, hi) if session.row_subsets else None)
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(ready)
        generated_before = self.stats["generated_tokens"]
        for request in ready:
            try:
                self._take_tokens(request, logits[request.conversation.slot - lo if session.row_subsets else 0],
                                  drafts[request], drafts_fit=several)
            except Exception as exc:  # noqa: BLE001  this request's own failure (its grammar, say): it alone ends
                self._fail(request, exc)
        now = time.perf_counter()
        self._recent.append((now, self.stats["generated_tokens"] - generated_before))
        while now - self._recent[0][0] > 60:
            self._recent.popleft()

    def _take_tokens(self, request: Request, rows: np.ndarray, draft: list[int], drafts_fit: bool) -> None:
        conversation = request.conversation
        picker = request.picker
        before = picker.drafted, picker.accepted, picker.forced
        new, kept = picker.pick(rows, draft, conversation.tokens)
        conversation.cached += 1 + kept
        if picker.choice is not None:  # a tool name or enum value, chosen whole by calls on this row alone
            new += conversation.choose_whole(picker)
        if not drafts_fit:  # tokens the grammar forces next: fed as a prefill chunk on the row alone, not a step each
            new += picker.take_forced(conversation.tokens)
        conversation.drafted_tokens += picker.drafted - before[0]
        conversation.accepted_draft_tokens += picker.accepted - before[1]
        conversation.forced_tokens += picker.forced - before[2]
        conversation.closed_at_limit += picker.closed_at_limit  # (set once, with the finish)
        conversation.decode_calls += 1
        request.first_token_at = request.first_token_at or time.perf_counter()
        self.stats["generated_tokens"] += len(new)
        for token in new:
            delta = request.text.push(token) if request.text is not None else ""
            request.on_event({"token": token, "text": delta})
            if request.text is not None and request.text.stop is not None:
                self._finish(request, "stop")
                return
        if request.picker.finish is not None:
            self._finish(request, request.picker.finish)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def _fail(self, request: Request, exc: Exception) -> None:
        """End ``request`` with ``exc`` (an AgentOptError says what the request did wrong; anything else is ours)."""
        request.conversation.release()
        self._finish(request, None, exc if isinstance(exc, AgentOptError) else
                     AgentOptError(f"internal error in the scheduler: {type(exc).__name__}: {exc}"))

    def _finish(self, request: Request, reason: str | None, error: AgentOptError | None = None) -> None:
        with self._wake:
            self._unfinished -= request.finished_at is None
        request.finished_at = time.perf_counter()
        if request in self._running:
            self._running.remove(request)
        for head, owner in list(self._heads_in_flight.items()):
            if owner is request:
                del self._heads_in_flight[head]
        if request.conversation is not None:
            request.conversation.busy = False
        if error is not None:
            request.on_event({"error": error})
            return
        tail = request.text.flush() if request.text is not None and reason != "cancelled" else ""
        if tail:
            request.on_event({"token": None, "text": tail})
        generated = request.picker.generated if request.picker else 0
        request.on_event({"done": reason, "text": request.text.visible if request.text else "", "usage": {
            "prompt_tokens": len(request.prompt_ids), "completion_tokens": generated,
            "cached_tokens": request.reused, "drafted_tokens": request.picker.drafted if request.picker else 0,
            "accepted_draft_tokens": request.picker.accepted if request.picker else 0}})

    def _dequeue(self, request: Request) -> None:
        with self._wake:
            self._waiting.remove(request)

    def _prefix_cached(self, head: tuple[int, ...]) -> bool:
        return self.prefix_cache is not None and self.prefix_cache.lookup(list(head))[0] == len(head)

    def _remember_head(self, request: Request) -> None:
        """Store a shared head in the prefix cache as soon as its rows are computed."""
        head = tuple(request.prompt_ids[:request.shared_prefix])
        if self._heads_in_flight.get(head) is not request or request.conversation.cached < len(head):
            return
        if not self._prefix_cached(head):
            request.conversation.remember_prefix(len(head))
        del self._heads_in_flight[head]

    def _conversation_for(self, request: Request) -> Conversation:
        """The idle pooled conversation that caches the longest prefix of the prompt, when that prefix goes at least
        MIN_SHARED_PREFIX tokens beyond the head other sessions share (so two sessions with the same system prompt
        never take over each other's conversation: they share it through the prefix cache), else a new one."""
        prompt = request.prompt_ids
        floor = request.shared_prefix + MIN_SHARED_PREFIX - 1
        best, best_length = None, floor
        for conversation in self.conversations:
            length = common_prefix(conversation.tokens[:conversation.cached], prompt)
            if not conversation.busy and length > best_length:
                best, best_length = conversation, length
        if best is None:
            best = Conversation(self.engine, self.prefix_cache)
            idle = [c for c in self.conversations if not c.busy]
            if len(self.conversations) >= self.max_conversations and idle:
                idle[0].release()
                self.conversations.remove(idle[0])
        else:
            self.conversations.remove(best)
        self.conversations.append(best)
        return best

    def _forget(self, conversation: Conversation) -> None:
        if conversation in self.conversations:
            self.conversations.remove(conversation)
