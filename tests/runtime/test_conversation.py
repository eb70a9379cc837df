import numpy as np
import pytest

from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.runtime.engine import GenerationConfig
from agentopt_compiler.runtime.prefix_cache import PrefixCache

GREEDY = GenerationConfig(max_new_tokens=6, ignore_eos=True)


def _turn(conversation, prompt):
    logits = conversation.prefill_to(prompt)
    return list(conversation.generate(logits, GREEDY))


def test_multi_turn_reuse_prefills_only_new_tokens_and_equals_full_recompute(tiny_engine):
    conversation = tiny_engine.conversation()
    history = [10, 20, 30, 40, 50, 60]
    for turn in range(3):
        before = conversation.prefilled_tokens
        reply = _turn(conversation, history)
        assert reply == tiny_engine.generate_ids(history, GREEDY)  # what a stateless full recompute gives
        if turn:  # the last reply token (its KV is computed when fed) plus the 3-token observation
            assert conversation.prefilled_tokens - before == 1 + 3
        history = history + reply + [70 + turn, 80 + turn, 90 + turn]  # reply and observation fed back
    assert conversation.prefilled_tokens == 6 + 2 * (1 + 3)


def test_a_rerendered_history_rewinds_to_the_common_prefix(tiny_engine):
    conversation = tiny_engine.conversation()
    reply = _turn(conversation, [1, 2, 3, 4, 5, 6, 7, 8])
    edited = [1, 2, 3, 4, 99, 100]  # differs from token 4 on: only that part is recomputed
    before = conversation.prefilled_tokens
    assert _turn(conversation, edited) == tiny_engine.generate_ids(edited, GREEDY)
    assert conversation.prefilled_tokens - before == 2
    assert reply  # the first turn produced something


def test_rewind_and_conversations_taking_turns(tiny_engine):
    a, b = tiny_engine.conversation(), tiny_engine.conversation()
    first = _turn(a, [5, 6, 7, 8, 9])
    _turn(b, [40, 41, 42])  # b takes the cache; a's rows are saved
    a.rewind(5)
    assert _turn(a, [5, 6, 7, 8, 9]) == first  # a's restored rows still give the same continuation
    assert a.prefilled_tokens == 5 + 1  # only the last prompt token was fed again
    with pytest.raises(AgentOptError):
        a.rewind(-1)


def test_save_and_load(tiny_engine, tmp_path):
    conversation = tiny_engine.conversation()
    _turn(conversation, [3, 4, 5, 6])
    path = tmp_path / "conv.npz"
    conversation.save(path)
    tiny_engine.generate_ids([9, 9, 9], GREEDY)  # clobbers the cache
    loaded = type(conversation).load(tiny_engine, path)
    history = conversation.tokens + [11, 12]
    assert _turn(loaded, history) == tiny_engine.generate_ids(history, GREEDY)
    assert loaded.reused_tokens == conversation.cached
    # files that are not a saved conversation, and places that cannot be written: one AgentOptError each
    (tmp_path / "garbage.npz").write_bytes(b"not a numpy archive")
    for missing_or_bad, says in ((tmp_path / "none.npz", "cannot read"), (tmp_path / "garbage.npz", "is not a saved")):
        with pytest.raises(AgentOptError, match=says):
            type(conversation).load(tiny_engine, missing_or_bad)
    with pytest.raises(AgentOptError, match="cannot save"):
        conversation.save(tmp_path / "no-such-folder" / "c.npz")
    with pytest.raises(AgentOptError, match="it is a folder"):
        conversation.save(tmp_path)
    conversation.save(tmp_path / "chat.state")  # exactly that name (numpy alone would write chat.state.npz)
    assert type(conversation).load(tiny_engine, tmp_path / "chat.state").tokens == conversation.tokens
    np.savez(tmp_path / "other.npz", __meta__=np.frombuffer(b'{"tokens": []}', dtype=np.uint8))
    with pytest.raises(AgentOptError, match="lacks engine, tokens or cached"):
        type(conversation).load(tiny_engine, tmp_path / "other.npz")


def _edited(path, out, meta=None, rows=None):
    """A copy of the saved conversation at ``path`` with its metadata and KV arrays changed."""
    import json

    with np.load(path) as data:
        saved = {k: data[k] for k in data.files}
    info = {**json.loads(bytes(saved.pop("__meta__")).decode()), **(meta or {})}
    arrays = rows(saved) if rows else saved
    np.savez(out, __meta__=np.frombuffer(json.dumps(info).encode(), dtype=np.uint8), **arrays)
    return out


def test_a_damaged_or_edited_save_is_refused_and_leaves_the_engine_usable(tiny_engine, tmp_path):
    conversation = tiny_engine.conversation()
    _turn(conversation, [3, 4, 5, 6])
    path = tmp_path / "conv.npz"
    conversation.save(path)
    first = sorted(k for k in np.load(path).files if k.startswith("cache:"))[0]
    whole = path.read_bytes()
    (tmp_path / "half.npz").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "last_byte.npz").write_bytes(whole[:-1])
    np.save(tmp_path / "array.npy", np.zeros(3))
    cases = {
        tmp_path / "half.npz": "is not a saved conversation, or is damaged",
        tmp_path / "last_byte.npz": "is not a saved conversation, or is damaged",
        tmp_path / "array.npy": "is not a saved conversation, or is damaged",
        _edited(path, tmp_path / "cached.npz", {"cached": "7"}): "cached count '7'",
        _edited(path, tmp_path / "tokens.npz", {"tokens": None}): "tokens are not a list of token ids",
        _edited(path, tmp_path / "vocab.npz", {"tokens": [3, 4, 10**6, 6]}): "tokens are not a list of token ids",
        _edited(path, tmp_path / "missing.npz", rows=lambda a: {k: v for k, v in a.items() if k != first}):
            "are not this engine's caches",
        _edited(path, tmp_path / "short.npz", rows=lambda a: {k: v[:, :, :3] for k, v in a.items()}):
            "where .* cached tokens take",
        _edited(path, tmp_path / "two_rows.npz", rows=lambda a: {k: np.concatenate([v, v]) for k, v in a.items()}):
            "where .* cached tokens take",
        _edited(path, tmp_path / "nan.npz", rows=lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()}):
            "NaN or infinite",
        _edited(path, tmp_path / "token.npz", {"tokens": [3, 4, 9, 6, *conversation.tokens[4:]]}):
            "do not match the sha256",  # a valid id, but not the token the KV was computed for
        _edited(path, tmp_path / "value.npz", rows=lambda a: {k: v + (k == first) * 1e3 for k, v in a.items()}):
            "do not match the sha256",
        _edited(path, tmp_path / "foreign.npz", rows=lambda a: {**a, "foreign": np.zeros(2)}):
            "'foreign', which Conversation.save does not write",
        _edited(path, tmp_path / "pickled.npz", rows=lambda a: {k: np.array([{}], dtype=object) for k in a}):
            r"\(it holds pickled Python objects\); give a file",
    }
    for bad, says in cases.items():
        with pytest.raises(AgentOptError, match=says):
            type(conversation).load(tiny_engine, bad)
    history = conversation.tokens + [11, 12]
    assert _turn(type(conversation).load(tiny_engine, path), history) == tiny_engine.generate_ids(history, GREEDY)


def test_prefix_cache_shares_a_common_prefix_across_conversations(tiny_engine):
    cache = PrefixCache()
    system = list(range(100, 140))
    first = tiny_engine.conversation(cache)
    first.prefill_to(system + [1])
    first.remember_prefix(len(system))
    second = tiny_engine.conversation(cache)
    reply = _turn(second, system + [2, 3])
    assert second.reused_tokens == len(system) and second.prefilled_tokens == 2
    assert reply == tiny_engine.generate_ids(system + [2, 3], GREEDY)
    assert cache.hits == 1


def test_prefix_cache_evicts_lru_but_keeps_pinned():
    rows = lambda n: {"past.0.key": np.zeros((1, 1, n, 256), np.float32)}  # 1 KiB per token
    cache = PrefixCache(max_bytes=10 * 1024)
    cache.insert([1, 2, 3, 4], rows(4), pin=True)
    cache.insert([5, 6, 7, 8], rows(4))
    cache.lookup([5, 6, 7, 8, 9])
    cache.insert([9, 9, 9, 9], rows(4))  # 12 KiB > 10 KiB: the least recently used unpinned entry goes
    assert cache.lookup([5, 6, 7, 8])[0] == 0
    assert cache.lookup([1, 2, 3, 4, 0])[0] == 4  # pinned, and older than [5..8], but kept
    assert cache.lookup([9, 9, 9, 9])[0] == 4
    assert cache.bytes_used <= 10 * 1024


def test_a_gqa_batch_engine_continues_conversations(tmp_path, tiny_engine):
    """ORT's GroupQueryAttention refuses several new tokens per row after cached ones at batch > 1; a conversation
    on a batch engine runs on its own row (dynamic rows), so its turns equal a batch-1 engine's."""
    import agentopt_compiler as ao

    engine = ao.compile("tiny-random", out=tmp_path / "b3", context_length=96, batch_size=3)
    assert not engine.session.batched_chunks and engine.session.row_subsets and engine.slots.count == 3
    history = [10, 20, 30, 40, 50, 60]
    ours, reference = engine.conversation(), tiny_engine.conversation()
    for turn in range(2):
        assert _turn(ours, history) == _turn(reference, history)
        history = history + ours.tokens[len(history):] + [70 + turn, 80, 90]  # reply and a 3-token observation


@pytest.mark.parametrize("bad", ["config", "list", "wrong_vocab", "no_rows", "integers"])
def test_generate_refuses_logits_or_a_config_it_was_not_given_by_prefill_to(tiny_engine, bad):
    conversation = tiny_engine.conversation()
    logits = conversation.prefill_to([1, 2, 3])
    config, message = GREEDY, "logits must be what prefill_to returns"
    if bad == "config":
        config, message = {"max_new_tokens": 4}, "config must be a GenerationConfig, got dict"
    else:
        logits = {"list": logits.tolist(), "wrong_vocab": logits[..., :-1], "no_rows": logits[:, :0],
                  "integers": logits.astype(np.int64)}[bad]
    with pytest.raises(AgentOptError, match=message):
        next(conversation.generate(logits, config))
    assert list(conversation.generate(conversation.prefill_to([1, 2, 3]), GREEDY))  # still usable
