"""Prompt-lookup decoding: drafts from the context, checked in one call, and the same greedy tokens."""

import numpy as np
import pytest
import torch

from agentopt_compiler.errors import AgentOptError, EngineError
from agentopt_compiler.runtime.engine import GenerationConfig
from agentopt_compiler.runtime.prompt_lookup import MAX_NGRAM, MIN_NGRAM, DraftIndex, draft_tokens

# random weights loop quickly, so greedy continuations repeat earlier tokens and drafts get accepted
PROMPTS = ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3], list(range(10, 40)), [7] * 5)


def _generate(engine, prompt, **options):
    conversation = engine.conversation()
    logits = conversation.prefill_to(prompt)
    tokens = conversation.generate(logits, GenerationConfig(**options))
    out = []
    while True:
        try:
            out.append(next(tokens))
        except StopIteration as stop:
            return out, stop.value, conversation


def test_draft_is_what_followed_the_latest_occurrence_of_the_longest_suffix():
    assert draft_tokens([5, 6, 7, 8, 9, 1, 6, 7, 2, 6, 7], 3) == [2, 6, 7]  # "6 7" last seen before "2 6 7"
    assert draft_tokens([1, 2, 3, 9, 2, 3, 8, 0, 1, 2, 3], 2) == [9, 2]  # 3-token suffix wins over the later "2 3"
    assert draft_tokens([4, 5, 6, 7, 4, 5], 10) == [6, 7, 4, 5]  # the continuation runs up to the end
    assert draft_tokens([4, 5, 6, 7, 5], 3) == []  # one matching token is too weak a match (MIN_NGRAM = 2)
    assert draft_tokens([1, 2, 3, 4], 4) == []  # the last token never occurred before
    assert draft_tokens([1, 2, 1], 0) == [] and draft_tokens([3], 4) == []


def _scan(tokens, max_tokens):
    """The definition, by brute force: the latest earlier occurrence of the longest suffix that has one."""
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        if len(tokens) <= n:
            continue
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[-n:]:
                return tokens[start + n:start + n + max_tokens]
    return []


def test_the_incremental_index_equals_a_scan_as_lists_grow_and_are_replaced():
    rng = np.random.default_rng(0)
    index, tokens = DraftIndex(), []
    for step in range(600):
        if step % 97 == 96:  # a new turn: a new list with the same start
            tokens = tokens + [int(t) for t in rng.integers(0, 6, 5)]
        elif step % 151 == 150:  # a rewind: a new, shorter list
            tokens = tokens[:len(tokens) // 2]
        elif step % 211 == 210:  # a different history altogether
            tokens = [int(t) for t in rng.integers(0, 6, 40)]
        else:  # decoding appends to the same list
            tokens.append(int(rng.integers(0, 6)))
        assert index.draft(tokens, 5) == _scan(tokens, 5), step


def test_tokens_equal_plain_greedy_and_drafts_are_accepted(tiny_engine):
    accepted = 0
    for prompt in PROMPTS:
        plain = tiny_engine.generate_ids(prompt, GenerationConfig(max_new_tokens=40, ignore_eos=True))
        looked_up, reason, conversation = _generate(tiny_engine, prompt, max_new_tokens=40, ignore_eos=True,
                                                    prompt_lookup=5)
        assert looked_up == plain and reason == "length"
        assert conversation.accepted_draft_tokens <= conversation.drafted_tokens
        accepted += conversation.accepted_draft_tokens
    assert accepted >= 20  # each accepted token is one call fewer: the feature really ran


def test_stop_tokens_and_token_budgets_inside_accepted_drafts(tiny_engine):
    prompt = PROMPTS[0]
    plain = tiny_engine.generate_ids(prompt, GenerationConfig(max_new_tokens=40, ignore_eos=True))
    for stop in sorted(set(plain))[:6]:  # stops met at many places, some inside a drafted run
        expected = tiny_engine.complete(prompt, max_new_tokens=40, stop_token_ids=[stop])
        got, reason, _ = _generate(tiny_engine, prompt, max_new_tokens=40, stop_token_ids=(stop,), prompt_lookup=6)
        assert (got, reason) == (expected.token_ids, expected.finish_reason)
    for budget in (1, 2, 7, 13):
        got, reason, _ = _generate(tiny_engine, prompt, max_new_tokens=budget, ignore_eos=True, prompt_lookup=6)
        assert (got, reason) == (plain[:budget], "length")
    assert _generate(tiny_engine, prompt, max_new_tokens=0, prompt_lookup=6)[:2] == ([], "length")


def test_the_context_limit_is_kept(tiny_engine):
    prompt = PROMPTS[1] * 3  # 90 of the engine's 96 slots
    plain = tiny_engine.complete(prompt, max_new_tokens=40, ignore_eos=True)
    got, reason, _ = _generate(tiny_engine, prompt, max_new_tokens=40, ignore_eos=True, prompt_lookup=8)
    assert plain.finish_reason == "context"
    assert (got, reason) == (plain.token_ids, "context")


def test_next_turn_after_accepted_and_rejected_drafts_equals_a_full_recompute(tiny_engine):
    """Rejected drafts leave rows past the conversation's end; the next turn must not see them."""
    config = dict(max_new_tokens=25, ignore_eos=True)
    history = list(PROMPTS[0])
    conversation = tiny_engine.conversation()
    for turn in range(3):
        logits = conversation.prefill_to(history)
        reply = list(conversation.generate(logits, GenerationConfig(**config, prompt_lookup=4)))
        assert reply == tiny_engine.generate_ids(history, GenerationConfig(**config))
        history = history + reply + [60 + turn, 2, 3]  # an observation that repeats earlier tokens
    assert conversation.accepted_draft_tokens > 0 and conversation.drafted_tokens > conversation.accepted_draft_tokens


def test_conversations_taking_the_cache_between_tokens(tiny_engine):
    """Accepted draft rows are counted before a token is yielded, so a switch of owner saves them."""
    config = GenerationConfig(max_new_tokens=30, ignore_eos=True, prompt_lookup=5)
    expected = [tiny_engine.generate_ids(p, GenerationConfig(max_new_tokens=30, ignore_eos=True)) for p in PROMPTS[:2]]
    streams, outputs = [], [[], []]
    for prompt in PROMPTS[:2]:
        conversation = tiny_engine.conversation()
        streams.append(conversation.generate(conversation.prefill_to(prompt), config))
    for _ in range(30):  # alternate token by token: each resumes on a cache the other used
        for index, stream in enumerate(streams):
            outputs[index].append(next(stream))
    assert outputs == expected


def test_sampling_with_drafts(tiny_engine):
    prompt = PROMPTS[0]
    greedy = tiny_engine.generate_ids(prompt, GenerationConfig(max_new_tokens=30, ignore_eos=True))
    # top_k=1 samples the argmax: drafts are kept exactly when greedy decoding would have chosen them
    got, _, conversation = _generate(tiny_engine, prompt, max_new_tokens=30, ignore_eos=True, temperature=1.0,
                                     top_k=1, seed=3, prompt_lookup=4)
    assert got == greedy and conversation.accepted_draft_tokens > 0
    # random weights give flat logits; at a low temperature sampled text loops too, so drafts match and get kept
    sampled = [_generate(tiny_engine, prompt, max_new_tokens=30, ignore_eos=True, temperature=0.05, seed=seed,
                         prompt_lookup=4) for seed in (5, 5, 6)]
    assert sampled[0][0] == sampled[1][0] and len(sampled[0][0]) == 30  # seeded: reproducible
    assert sum(c.accepted_draft_tokens for _, _, c in sampled) > 0
    # and the same tokens as plain sampling with that seed, drafts kept or rejected
    checked = kept = 0
    for seed in range(5, 12):
        plain = tiny_engine.generate_ids(prompt, GenerationConfig(max_new_tokens=30, ignore_eos=True,
                                                                  temperature=0.05, seed=seed))
        drafted, _, conversation = _generate(tiny_engine, prompt, max_new_tokens=30, ignore_eos=True,
                                             temperature=0.05, seed=seed, prompt_lookup=4)
        assert drafted == plain, seed
        checked, kept = checked + conversation.drafted_tokens, kept + conversation.accepted_draft_tokens
    assert 0 < kept < checked


def test_batch_rows_draft_on_their_own_and_keep_their_tokens(tmp_path, monkeypatch):
    import agentopt_compiler as ao

    # ORT's GroupQueryAttention takes several new tokens per row after cached ones only at batch 1: a batch engine
    # with it checks drafts when one row decodes (run alone), and one with the standard lowering drafts per row
    gqa = ao.compile("tiny-random", out=tmp_path / "gqa", context_length=64, batch_size=3)
    lone = gqa.generate_batch([PROMPTS[0]], prompt_lookup=4, max_new_tokens=40, ignore_eos=True)[0]
    assert lone.token_ids == gqa.generate_ids(PROMPTS[0], max_new_tokens=40, ignore_eos=True)
    engine = ao.compile("tiny-random", out=tmp_path / "batch", context_length=64, batch_size=3,
                        attention_impl="standard")
    prompts = [PROMPTS[0], PROMPTS[1][:7], [9, 8, 9, 8]]  # different lengths: rows at different positions
    calls = []
    run = engine.session.run
    monkeypatch.setattr(engine.session, "run", lambda *a: calls.append(a[0].shape[1]) or run(*a))

    def both(rows=prompts, **options):
        calls.clear()
        plain = [(c.token_ids, c.finish_reason) for c in engine.generate_batch(rows, **options)]
        plain_calls = len(calls)
        calls.clear()
        looked_up = [(c.token_ids, c.finish_reason) for c in engine.generate_batch(rows, prompt_lookup=4, **options)]
        return plain, looked_up, plain_calls, len(calls)

    plain, looked_up, _, _ = both(max_new_tokens=55, ignore_eos=True)
    assert looked_up == plain and [r for _, r in plain] == ["context", "length", "length"]  # 13 + 55 > 64 slots
    assert max(calls) > 1  # drafts were checked, several tokens per row and call
    # a call serves every row, so calls drop as far as the row that accepts the fewest drafts lets them
    _, _, plain_calls, lookup_calls = both([PROMPTS[0]], max_new_tokens=40, ignore_eos=True)
    assert lookup_calls < plain_calls
    stop = plain[1][0][5]
    plain, looked_up, _, _ = both(max_new_tokens=30, stop_token_ids=[stop])
    assert looked_up == plain and "stop" in [r for _, r in plain]
    plain, looked_up, _, _ = both(max_new_tokens=30, ignore_eos=True, temperature=1.0, top_k=1, seed=2)
    assert looked_up == plain  # top_k=1 sampling keeps exactly the drafts greedy would


def test_engine_logits_of_several_tokens_equal_eager(tiny_engine_dir, tiny_model):
    import agentopt_compiler as ao

    session = ao.load_engine(tiny_engine_dir).session
    assert session.multi_logits
    ids = np.random.default_rng(2).integers(0, 300, size=(1, 12))
    session.reset()
    session.run(ids[:, :8], np.arange(8))
    got = session.run(ids[:, 8:], np.arange(8, 12), np.array([[0, 1, 2, 3]]))  # a pending token and 3 drafts
    tiny_model.setup_cache(1, 96)
    with torch.no_grad():
        expected = tiny_model(torch.from_numpy(ids), torch.arange(12))[:, 8:].numpy()
    assert got.shape == (1, 4, expected.shape[-1])
    assert np.abs(got - expected).max() <= 1e-4
    assert session.run(ids[:, :1], np.array([12])).shape == (1, 1, expected.shape[-1])  # decode buffer put back


def test_clear_errors(tiny_engine, tiny_engine_dir, tmp_path):
    import agentopt_compiler as ao

    with pytest.raises(AgentOptError, match="prompt_lookup must be >= 0"):
        GenerationConfig(prompt_lookup=-1)
    ring = ao.compile("tiny-random", out=tmp_path / "ring", context_length=256, sparse_attention="window=16")
    with pytest.raises(AgentOptError, match="ring caches .* keep 64 spare slots"):
        _generate(ring, [1, 2, 3], max_new_tokens=4, prompt_lookup=65)
    ring.session.ring_spare_slots = 0  # what a ring engine compiled before spare slots reports
    with pytest.raises(AgentOptError, match="none: recompile the engine"):
        _generate(ring, [1, 2, 3], max_new_tokens=4, prompt_lookup=1)
    old = ao.load_engine(tiny_engine_dir)
    conversation = old.conversation()
    logits = conversation.prefill_to([1, 2, 3])
    old.session.multi_logits = False  # what an engine compiled before multi-position logits reports
    with pytest.raises(AgentOptError, match="recompile it"):
        next(conversation.generate(logits, GenerationConfig(max_new_tokens=4, prompt_lookup=4)))
    with pytest.raises(EngineError, match="recompile it"):
        old.session.run(np.array([[1, 2]]), np.arange(2), np.array([[0, 1]]))
