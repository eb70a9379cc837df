"""Continuous batching over KV slots (runtime/scheduler.py, runtime/slots.py) against sequences served alone."""

import numpy as np
import pytest

import agentopt_compiler as ao
from agentopt_compiler.runtime.engine import GenerationConfig
from agentopt_compiler.runtime.prefix_cache import PrefixCache
from agentopt_compiler.runtime.scheduler import QueueFullError, Scheduler

PROMPTS = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [7, 8], list(range(40, 61)), [9, 9, 8, 9, 9, 8, 9, 9], [11] * 5]
GREEDY = GenerationConfig(max_new_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=["gqa", "standard"])
def slotted(request, tmp_path_factory):
    """tiny-random with dynamic rows, loaded with 3 slots (compiled at batch 1)."""
    folder = tmp_path_factory.mktemp("slots") / request.param
    ao.compile("tiny-random", out=folder, context_length=96, attention_impl=request.param)
    return ao.load_engine(folder, slots=3)


def _serve(engine, prompts, config, prefill_chunk=4, **options):
    scheduler = Scheduler(engine, prefill_chunk=prefill_chunk, **options)
    outputs = [[] for _ in prompts]
    done = [None] * len(prompts)

    def collect(index):
        def on_event(event):
            if event.get("token") is not None:
                outputs[index].append(event["token"])
            if "done" in event:
                done[index] = event
        return on_event

    requests = [scheduler.submit(p, config, collect(i)) for i, p in enumerate(prompts)]
    scheduler.run(requests)
    return outputs, done, scheduler


def test_sessions_decoded_together_equal_each_served_alone(slotted):
    alone = [_serve(slotted, [p], GREEDY)[0][0] for p in PROMPTS]
    together, done, scheduler = _serve(slotted, PROMPTS, GREEDY)  # 5 requests on 3 slots: two wait
    assert together == alone and all(d["done"] == "length" for d in done)
    assert scheduler.stats["decode_rows"] > scheduler.stats["decode_steps"]  # steps ran several rows at once
    # the engine's own one-shot generation (one prefill call, row alone) gives the same greedy tokens
    assert alone == [slotted.generate_ids(p, GREEDY) for p in PROMPTS]


def test_rows_of_a_batched_step_round_like_the_row_alone(slotted):
    """Rows are computed independently: a row's logits in a 3-row call equal the row run alone, bit for bit
    (CPU MatMul and attention kernels, fp32)."""
    session = slotted.session
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=(3, 1))
    positions = np.array([[0], [0], [0]])
    together = session.run(ids, positions, None, range(0, 3))
    for row in range(3):
        alone = session.run(ids[row:row + 1], positions[row:row + 1], None, range(row, row + 1))
        np.testing.assert_array_equal(alone[0], together[row])


def test_prompt_lookup_per_slot_keeps_the_tokens(slotted):
    repetitive = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 8, 9, 8, 9, 8], [1, 2, 1, 2, 1, 2, 1]]
    config = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    plain = _serve(slotted, repetitive, config)[0]
    drafted, done, _ = _serve(slotted, repetitive, GenerationConfig(max_new_tokens=24, ignore_eos=True,
                                                                    prompt_lookup=4))
    assert drafted == plain
    if slotted.session.batched_chunks:  # the standard lowering checks drafts on several rows at once
        assert sum(d["usage"]["accepted_draft_tokens"] for d in done) > 0


def test_stop_tokens_and_limits_per_request(slotted):
    first = _serve(slotted, [PROMPTS[0]], GREEDY)[0][0]
    configs = [GenerationConfig(max_new_tokens=16, stop_token_ids=(first[3],)),
               GenerationConfig(max_new_tokens=2, ignore_eos=True)]
    scheduler = Scheduler(slotted, prefill_chunk=4)
    results = {}
    requests = [scheduler.submit(PROMPTS[0], c, lambda e, i=i: results.setdefault(i, []).append(e))
                for i, c in enumerate(configs)]
    scheduler.run(requests)
    assert results[0][-1]["done"] == "stop" and [e["token"] for e in results[0][:-1]] == first[:3]
    assert results[1][-1]["done"] == "length" and results[1][-1]["usage"]["completion_tokens"] == 2


def test_idle_sessions_are_evicted_to_host_and_come_back_exactly(slotted):
    """Four conversations on three slots, taking turns: each turn continues a conversation whose KV may have been
    moved to host memory; with no host memory at all, evicted conversations recompute. Both equal a fresh run."""
    for host_bytes in (1 << 30, 0):
        slotted.slots.host_bytes = host_bytes
        conversations = [slotted.conversation() for _ in range(4)]
        histories = [list(p) for p in PROMPTS[:4]]
        for _turn in range(2):
            for conversation, history in zip(conversations, histories):
                logits = conversation.prefill_to(history)
                reply = list(conversation.generate(logits, GenerationConfig(max_new_tokens=5, ignore_eos=True)))
                history += reply + [70, 71]
        for conversation, history in zip(conversations, histories):
            expected = slotted.generate_ids(history, GREEDY)
            assert list(conversation.generate(conversation.prefill_to(history), GREEDY)) == expected
            conversation.release()
        assert (slotted.slots.drops > 0) == (host_bytes == 0)
    slotted.slots.host_bytes = 1 << 30
    assert slotted.slots.evictions > 0


def test_cancelled_requests_free_their_slot_and_a_full_queue_refuses(slotted):
    scheduler = Scheduler(slotted, prefill_chunk=4, max_waiting=2)
    events = []
    first = scheduler.submit(PROMPTS[0], GenerationConfig(max_new_tokens=50, ignore_eos=True), events.append)
    second = scheduler.submit(PROMPTS[1], GREEDY, events.append)
    with pytest.raises(QueueFullError, match="waiting"):
        scheduler.submit(PROMPTS[2], GREEDY, events.append)
    scheduler.step()
    scheduler.step()
    first.cancel()
    scheduler.run([first, second])
    assert [e["done"] for e in events if "done" in e] == ["cancelled", "length"]
    assert first.conversation.slot is None and scheduler.stats["rejected"] == 1


def test_a_shared_head_is_prefilled_once(slotted):
    """Requests sharing a head (system prompt + tools) arriving together: the first prefills it and stores it in
    the prefix cache, the others wait for that and start from it, with the tokens each would get alone."""
    head = list(range(100, 140))
    prompts = [head + [1, 2, 3], head + [4, 5], head + [6, 7, 8, 9]]
    scheduler = Scheduler(slotted, prefill_chunk=8, prefix_cache=PrefixCache())
    outputs = [[] for _ in prompts]
    requests = [scheduler.submit(p, GREEDY, lambda e, i=i: e.get("token") is not None and outputs[i].append(
        e["token"]), shared_prefix=len(head)) for i, p in enumerate(prompts)]
    scheduler.run(requests)
    assert [r.reused for r in requests] == [0, len(head), len(head)]
    assert scheduler.stats["prefilled_tokens"] == len(head) + 3 + 2 + 4
    assert outputs == [_serve(slotted, [p], GREEDY)[0][0] for p in prompts]


def test_a_request_that_fails_on_its_own_ends_alone(slotted, monkeypatch):
    """One request's failure while its tokens are picked (its grammar, say) ends that request with its error; the
    others decoding in the same steps go on to the same tokens as alone."""
    from agentopt_compiler.errors import AgentOptError
    from agentopt_compiler.runtime.generation import TokenPicker

    alone = [_serve(slotted, [p], GREEDY)[0][0] for p in PROMPTS[:3]]
    pick = TokenPicker.pick

    def failing_pick(self, rows, draft, tokens):
        if tokens[:len(PROMPTS[1])] == PROMPTS[1] and len(tokens) > len(PROMPTS[1]) + 2:
            raise AgentOptError("this request's grammar failed")
        return pick(self, rows, draft, tokens)

    monkeypatch.setattr(TokenPicker, "pick", failing_pick)
    scheduler = Scheduler(slotted, prefill_chunk=4)
    outputs, events = [[], [], []], [None, None, None]

    def collect(index):
        def on_event(event):
            if event.get("token") is not None:
                outputs[index].append(event["token"])
            if "done" in event or "error" in event:
                events[index] = event
        return on_event

    scheduler.run([scheduler.submit(p, GREEDY, collect(i)) for i, p in enumerate(PROMPTS[:3])])
    assert "grammar failed" in str(events[1]["error"]) and not str(events[1]["error"]).startswith("internal")
    assert [outputs[0], outputs[2]] == [alone[0], alone[2]] and events[0]["done"] == events[2]["done"] == "length"
    assert not any(h is not None and h.busy for h in slotted.slots.holders)  # no slot stays taken
