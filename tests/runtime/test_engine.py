import numpy as np
import pytest

import agentopt_compiler as ao
from agentopt_compiler.runtime.prefix_cache import PrefixCache
from agentopt_compiler.errors import AgentOptError, ContextOverflowError
from tests.conftest import TINY_CONTEXT, eager_greedy

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]


def test_greedy_tokens_equal_eager_for_40_steps(tiny_engine, tiny_model):
    ours = tiny_engine.generate_ids(PROMPT, max_new_tokens=40, ignore_eos=True)
    assert ours == eager_greedy(tiny_model, PROMPT, 40, TINY_CONTEXT)


@pytest.mark.slow
def test_ref_60m_greedy_tokens_equal_eager_for_32_steps(tmp_path):
    from agentopt_compiler.models.registry import load_model

    engine = ao.compile("ref-60m", out=tmp_path / "ref", context_length=128)
    prompt = list(np.random.default_rng(0).integers(0, 32000, size=20))
    ours = engine.generate_ids(prompt, max_new_tokens=32, ignore_eos=True)
    assert ours == eager_greedy(load_model("ref-60m").model, [int(t) for t in prompt], 32, 128)


def test_each_generation_starts_from_a_clean_cache(tiny_engine):
    first = tiny_engine.generate_ids(PROMPT, max_new_tokens=8, ignore_eos=True)
    tiny_engine.generate_ids([5, 6, 7], max_new_tokens=8, ignore_eos=True)
    assert tiny_engine.generate_ids(PROMPT, max_new_tokens=8, ignore_eos=True) == first


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(tiny_engine):
    options = dict(max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.95, ignore_eos=True)
    a = tiny_engine.generate_ids(PROMPT, seed=1, **options)
    assert a == tiny_engine.generate_ids(PROMPT, seed=1, **options)
    assert a != tiny_engine.generate_ids(PROMPT, seed=2, **options)
    assert a != tiny_engine.generate_ids(PROMPT, max_new_tokens=20, ignore_eos=True)


def test_stop_tokens_end_generation_before_the_stop_token(tiny_engine):
    greedy = tiny_engine.generate_ids(PROMPT, max_new_tokens=20, ignore_eos=True)
    stop = greedy[5]
    cut = greedy.index(stop)
    completion = tiny_engine.complete(PROMPT, max_new_tokens=20, stop_token_ids=[stop])
    assert completion.token_ids == greedy[:cut] and completion.finish_reason == "stop"
    assert tiny_engine.complete(PROMPT, max_new_tokens=7, ignore_eos=True).finish_reason == "length"
    vocab = tiny_engine.manifest["model"]["config"]["vocab_size"]
    for outside in (vocab, -1):  # a stop id no token has would never stop anything: refused
        with pytest.raises(AgentOptError, match=rf"stop_token_ids \[{outside}\] are not token ids"):
            tiny_engine.complete(PROMPT, max_new_tokens=3, stop_token_ids=[stop, outside])


def test_stop_strings_cut_the_text_and_streaming_matches(tiny_engine):
    full = tiny_engine.generate("Hi", max_new_tokens=30, ignore_eos=True)
    visible = [c for c in full if c.isprintable() and c not in "\ufffd"]
    assert visible, "expected some printable output from the random model"
    stop = visible[len(visible) // 2]
    completion = tiny_engine.complete("Hi", max_new_tokens=30, ignore_eos=True, stop_strings=[stop])
    assert completion.text == full[:full.index(stop)] and completion.finish_reason == "stop"
    assert "".join(tiny_engine.stream("Hi", max_new_tokens=30, ignore_eos=True, stop_strings=[stop])) == \
        completion.text
    assert "".join(tiny_engine.stream("Hi", max_new_tokens=30, ignore_eos=True)) == full


def test_generation_stops_when_the_context_is_full(tiny_engine):
    prompt = list(range(1, TINY_CONTEXT - 3))
    completion = tiny_engine.complete(prompt, max_new_tokens=50, ignore_eos=True)
    assert completion.finish_reason == "context"
    assert len(prompt) + len(completion.token_ids) == TINY_CONTEXT + 1  # the last token needs no cache slot


def test_prompt_longer_than_the_context_is_refused(tiny_engine):
    with pytest.raises(ContextOverflowError, match=f"holds {TINY_CONTEXT}.*--context-length"):
        tiny_engine.generate(list(range(TINY_CONTEXT)), max_new_tokens=1)


def test_bad_generation_options_are_named(tiny_engine):
    with pytest.raises(AgentOptError, match="unknown generation option.*max_tokens"):
        tiny_engine.generate("x", max_tokens=3)
    with pytest.raises(AgentOptError, match="top_p"):
        tiny_engine.generate("x", top_p=0.0)
    with pytest.raises(AgentOptError, match="on_text must be a function"):
        tiny_engine.complete([1, 2], on_text=5, max_new_tokens=2)


@pytest.mark.parametrize("impl", ["gqa", "standard"])
def test_batch_rows_of_different_lengths_equal_single_row_eager(impl, tmp_path):
    from agentopt_compiler.models.registry import load_model

    engine = ao.compile("tiny-random", out=tmp_path / "batch", context_length=TINY_CONTEXT, batch_size=3,
                        attention_impl=impl)
    prompts = [PROMPT, [7, 8], list(range(40, 61))]  # 12, 2 and 21 tokens
    completions = engine.generate_batch(prompts, max_new_tokens=24, ignore_eos=True)
    model = load_model("tiny-random").model
    for prompt, completion in zip(prompts, completions):
        assert completion.token_ids == eager_greedy(model, prompt, 24, TINY_CONTEXT)
    # fewer prompts than rows, sampling with a stream per row, and stop tokens per row
    sampled = engine.generate_batch([PROMPT, PROMPT], max_new_tokens=10, temperature=1.0, seed=3, ignore_eos=True)
    assert sampled[0].token_ids != sampled[1].token_ids
    stop = completions[0].token_ids[4]
    stopped = engine.generate_batch(prompts, max_new_tokens=24, stop_token_ids=[stop])
    assert stopped[0].finish_reason == "stop" and stopped[0].token_ids == completions[0].token_ids[:4]
    # more prompts than slots: the fourth waits for a slot, then decodes beside the others
    assert engine.manifest["engine"]["rows"] == "dynamic" and engine.slots.count == 3
    four = engine.generate_batch(prompts + [[5, 6, 7]], max_new_tokens=8, ignore_eos=True)
    assert [c.token_ids for c in four] == [eager_greedy(model, p, 8, TINY_CONTEXT) for p in prompts + [[5, 6, 7]]]


def test_python_api_misuse_is_one_clear_error(tiny_engine, tiny_engine_dir):
    """Wrong types are AgentOptErrors naming the argument (not a TypeError deep in sampling, nor silently taken:
    bytes read as ids, 2.5 new tokens running to the context, a string of prompts split into characters)."""
    import agentopt_compiler as ao
    from agentopt_compiler.errors import AgentOptError

    cases = [(lambda: tiny_engine.complete(b"hi"), "a prompt is text"),
             (lambda: tiny_engine.complete([1.5]), "a prompt is text"),
             (lambda: tiny_engine.complete("hi", max_new_tokens=2.5), "max_new_tokens must be an integer"),
             (lambda: tiny_engine.complete("hi", max_new_tokens=True), "max_new_tokens must be an integer"),
             (lambda: tiny_engine.complete("hi", temperature="x"), "temperature must be a number"),
             (lambda: tiny_engine.complete("hi", seed=1.5), "seed must be an integer"),
             (lambda: tiny_engine.complete("hi", whole_enum_values="no"), "whole_enum_values must be True or False"),
             (lambda: tiny_engine.complete("hi", stop_token_ids=5), "stop_token_ids must be"),
             (lambda: tiny_engine.complete("hi", config={"max_new_tokens": 2}), "config must be a GenerationConfig"),
             (lambda: tiny_engine.generate_batch("abc"), "a list of prompts"),
             (lambda: tiny_engine.generate_batch([[]]), "prompt 0 is empty"),
             (lambda: ao.load_engine(tiny_engine_dir, slots="2"), "slots must be"),
             (lambda: ao.load_engine(tiny_engine_dir, threads=0), "threads must be"),
             (lambda: ao.load_engine(None), "folder must be the path"),
             (lambda: ao.compile(out=5), "out must be a folder path"),
             (lambda: ao.compile(out=tiny_engine_dir, progress=5), "progress must be a function"),
             (lambda: tiny_engine.conversation(PrefixCache(max_bytes=-1)), "max_bytes must be"),
             (lambda: tiny_engine.conversation("cache"), "prefix_cache must be a PrefixCache"),
             (lambda: tiny_engine.conversation().rewind("3"), "rewind takes a token count"),
             (lambda: tiny_engine.conversation().rewind(True), "rewind takes a token count")]
    for call, says in cases:
        with pytest.raises(AgentOptError, match=says):
            call()
    engine = ao.load_engine(tiny_engine_dir)
    if engine.session.row_subsets:  # more slots than memory holds: one clear error, not a MemoryError
        with pytest.raises(AgentOptError, match="not enough memory"):
            ao.load_engine(tiny_engine_dir, slots=10 ** 9)
    # one stop string is one stop string, not its characters
    assert tiny_engine.complete("Hi", max_new_tokens=2, stop_strings="ab").finish_reason in ("length", "stop")
    from agentopt_compiler.runtime.generation import GenerationConfig

    assert GenerationConfig(stop_strings="ab").stop_strings == ("ab",)
