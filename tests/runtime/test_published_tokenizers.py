"""Real published tokenizers (Qwen3, Gemma 3, Llama 3, Mistral Nemo; tests/published_tokenizers.py) with
random-weight models of their family: the published chat templates render and tokenize as transformers does, calls
they write parse back, and Qwen3 / Gemma 3 / Mistral engines compiled with their tokenizers chat, call tools in their
own syntax and answer JSON through `agentopt serve` and the openai client."""

import json
import shutil

import pytest

from agentopt_compiler.runtime.chat import ChatTemplateError, render_chat
from agentopt_compiler.runtime.tokenizer import Tokenizer
from agentopt_compiler.runtime.tools import parse_tool_calls
from tests.published_tokenizers import published_tokenizer

transformers = pytest.importorskip("transformers")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("openai")
pytest.importorskip("fastapi")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city for the next days.",
    "parameters": {"type": "object", "required": ["city", "days"], "properties": {
        "city": {"type": "string", "maxLength": 16}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}}}
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}}
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Cold, 4 °C."}, {"role": "user", "content": "And in Zürich, 明天?"}]
# Qwen3: tools, an assistant turn that reasoned and called, the tool's result, a follow-up question
QWEN3_TOOLS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": "<think>\nThe user wants weather.\n</think>\n\n", "tool_calls": [CALL]},
               {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": 4}"},
               {"role": "assistant", "content": "4 °C."}, {"role": "user", "content": "And in °F?"}]
# Mistral Nemo: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] with 9-character call ids, [TOOL_RESULTS]
MISTRAL_CALL = {**CALL, "id": "call00001"}
MISTRAL_TOOLS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Weather in Oslo?"},
                 {"role": "assistant", "tool_calls": [MISTRAL_CALL]},
                 {"role": "tool", "tool_call_id": "call00001", "content": "{\"celsius\": 4}"},
                 {"role": "assistant", "content": "4 °C."}, {"role": "user", "content": "And in °F?"}]
CASES = [("qwen3", QWEN3_TOOLS, [WEATHER], {}), ("qwen3", QWEN3_TOOLS, [WEATHER], {"enable_thinking": False}),
         ("qwen3", CHAT, None, {}), ("gemma3", CHAT, None, {}), ("llama3", CHAT, None, {}),
         ("mistral_nemo", MISTRAL_TOOLS, [WEATHER], {})]


def _hf_tokenizer(family):
    return transformers.AutoTokenizer.from_pretrained(published_tokenizer(family))


@pytest.mark.parametrize("family,messages,tools,variables", CASES,
                         ids=["qwen3-tools", "qwen3-no-thinking", "qwen3-chat", "gemma3-chat", "llama3-chat",
                              "mistral-nemo-tools"])
def test_published_templates_render_and_tokenize_as_transformers_does(family, messages, tools, variables):
    ours = Tokenizer(published_tokenizer(family))
    hf = _hf_tokenizer(family)
    text = render_chat(ours, messages, tools, **variables)
    assert text == hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                          **variables)
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("family,messages,turn", [("qwen3", QWEN3_TOOLS, "<|im_start|>assistant\n"),
                                                  ("mistral_nemo", MISTRAL_TOOLS, "[/INST]")])
def test_a_call_written_in_a_published_template_s_syntax_parses_back(family, messages, turn):
    """What the template writes for an assistant's call (after the user turn's end) is what a model of that family
    writes: it must parse into the same OpenAI-style call."""
    text = render_chat(Tokenizer(published_tokenizer(family)), messages[:3], [WEATHER], add_generation_prompt=False)
    parsed = parse_tool_calls(text[text.rindex(turn) + len(turn):])
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", CALL["function"]["arguments"])]
    assert not parsed.errors


def test_a_published_template_that_refuses_a_conversation_is_a_clear_error():
    with pytest.raises(ChatTemplateError, match="roles must alternate"):  # Gemma 3's own raise_exception
        render_chat(Tokenizer(published_tokenizer("gemma3")), [{"role": "user", "content": "a"},
                                                                {"role": "user", "content": "b"}])


def _checkpoint(family, folder):
    """A small random-weight model of ``family`` with the published tokenizer (its full vocabulary) beside it."""
    import torch

    tokenizer = published_tokenizer(family)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True)
    if family == "qwen3":  # Qwen3-0.6B's vocabulary size and special ids
        config = transformers.Qwen3Config(vocab_size=151936, bos_token_id=151643, eos_token_id=151645, **small)
    elif family == "mistral_nemo":  # Mistral Nemo's (<s> 1, </s> 2); our reference module captures it
        config = transformers.MistralConfig(vocab_size=131072, bos_token_id=1, eos_token_id=2, **small)
    else:  # Gemma 3 1B's: <bos> 2, <eos> 1 and <end_of_turn> 106 end a turn
        config = transformers.Gemma3TextConfig(vocab_size=262144, bos_token_id=2, eos_token_id=[1, 106],
                                               pad_token_id=0, query_pre_attn_scalar=16, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"], **small)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Qwen3, Gemma 3 and Mistral Nemo engines compiled from checkpoints with their published tokenizers, each behind
    a server."""
    import agentopt_compiler as ao
    from tests.helpers import Running

    running = {}
    for family in ("qwen3", "gemma3", "mistral_nemo"):
        folder = tmp_path_factory.mktemp(family)
        model = _checkpoint(family, folder / "ckpt")
        engine = ao.load_engine(ao.compile(folder / "ckpt", out=folder / "engine", context_length=512).folder,
                                slots=2)
        running[family] = (model, engine, Running(engine))
    yield running
    for _model, _engine, server in running.values():
        server.http.stop()


@pytest.mark.parametrize("family", ["qwen3", "gemma3", "mistral_nemo"])
def test_the_engine_gives_transformers_greedy_tokens_on_a_chat_prompt(served, family):
    import torch

    model, engine, _server = served[family]
    prompt = render_chat(engine.tokenizer, CHAT)
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)  # the template wrote the BOS token
    assert ids == _hf_tokenizer(family)(prompt, add_special_tokens=False)["input_ids"]
    tokens = engine.generate_ids(ids, max_new_tokens=8, ignore_eos=True)
    expected = list(ids)
    with torch.no_grad():
        for _ in range(8):
            expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
    assert tokens == expected[len(ids):]


@pytest.mark.parametrize("thinking", [False, True])
def test_qwen3_calls_a_tool_in_its_own_syntax_and_reads_the_result(served, thinking):
    _model, engine, server = served["qwen3"]
    client = server.client()
    messages = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]
    # a reasoning block may come before the call unless the prompt closed it (enable_thinking=False)
    answer = client.chat.completions.create(
        model=engine.manifest["model"]["name"], messages=messages, tools=[WEATHER], tool_choice="required",
        max_tokens=200, seed=1, extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    choice = answer.choices[0]
    if thinking and choice.finish_reason == "length":  # random weights may reason past the limit: still no bad call
        assert not choice.message.tool_calls and choice.message.content.startswith("<think>")
        return
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "{\"celsius\": 4}"}]
    follow_up = client.chat.completions.create(model=engine.manifest["model"]["name"], messages=messages,
                                               tools=[WEATHER], max_tokens=6, stream=True,
                                               stream_options={"include_usage": True})
    chunks = list(follow_up)
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the first turn's KV is reused


def test_gemma3_answers_json_that_fits_the_schema_with_its_byte_fallback_vocabulary(served):
    _model, engine, server = served["gemma3"]
    schema = WEATHER["function"]["parameters"]
    answer = server.client().chat.completions.create(
        model=engine.manifest["model"]["name"], messages=[{"role": "user", "content": "Oslo, 3 days, as JSON"}],
        max_tokens=120, temperature=1.0, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_mistral_calls_in_its_list_syntax_with_the_call_ids_its_template_accepts(served):
    _model, engine, server = served["mistral_nemo"]
    client, name = server.client(), engine.manifest["model"]["name"]
    messages = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]
    # random weights would write calls into the list until the token limit: one call, as OpenAI's field asks
    answer = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=100, seed=1)
    assert answer.choices[0].finish_reason == "tool_calls"
    (call,) = calls = answer.choices[0].message.tool_calls
    for call in calls:
        assert len(call.id) == 9 and call.id.isalnum()  # else the template refuses the next turn
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [answer.choices[0].message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": call.id, "content": "{\"celsius\": 4}"} for call in calls]
    follow_up = client.chat.completions.create(model=name, messages=messages, tools=[WEATHER], max_tokens=4)
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")
