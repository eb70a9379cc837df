"""Grammar-constrained decoding (constraints.py + generation.py) on agent-tiny's engine: outputs always parse and
validate, a grammar that allows everything changes nothing, fast-forwarded tokens are the tokens one-by-one
decoding chooses, in fewer engine calls, and prompt-lookup drafts are cut where the grammar rejects them."""

import json

import numpy as np
import pytest
from dataclasses import replace

import agentopt_compiler as ao
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.runtime.agent import Agent
from agentopt_compiler.runtime.conversation import Conversation
from agentopt_compiler.runtime.constraints import (CALL_SYNTAXES, Grammar, Matcher, call_syntax, check_grammar,
                                                   json_schema_grammar, no_call_grammar, regex_grammar, tool_call_grammar)
from agentopt_compiler.runtime.generation import GenerationConfig
from agentopt_compiler.runtime.tools import parse_tool_calls

jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [  # the kinds of schema tools and answers use: nested objects, enums, numbers, arrays, optional keys
    {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 12}},
     "required": ["expression"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"enum": ["km", "mi", "kg", "lb"]},
                                      "to_unit": {"enum": ["km", "mi", "kg", "lb"]}},
     "required": ["value", "from_unit", "to_unit"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 500},
                                      "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}},
     "required": ["n"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        "required": ["name", "age"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
     "required": ["user", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "maxItems": 5},
    {"enum": ["yes", "no", 3, None]},
]
PROMPT = ("<|im_start|>user\nWhat is 17 * 23 + 5? Then convert 40 km to miles.<|im_end|>\n"
          "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ao.compile("agent-tiny", out=tmp_path_factory.mktemp("engines") / "agent-tiny")


@pytest.fixture(scope="module")
def tools():
    from agentopt_compiler.agent_tiny.tools import calculator, convert_units

    return [calculator, convert_units]


def test_sampled_outputs_always_validate_against_their_schema(engine):
    closed_at_limit = 0
    for index, schema in enumerate(SCHEMAS):
        for seed in range(3):  # sampled at temperature 1.5: the model alone would rarely write these
            for budget in (34, 200):  # 34: more than each schema's shortest value needs (33 tokens at most), less
                # than many outputs
                completion = engine.complete(PROMPT, max_new_tokens=budget, temperature=1.5, seed=seed,
                                             grammar=json_schema_grammar(schema))
                # a value still open near the limit (a JSON number has no length bound) is closed in the tokens left
                assert completion.finish_reason in ("stop", "length"), (index, seed, completion.text)
                jsonschema.validate(json.loads(completion.text), schema)
                closed_at_limit += completion.finish_reason == "length"
    assert closed_at_limit >= 5  # the limit did cut values: the closing was exercised


# references into the schema itself, as pydantic writes them: they must still resolve under the call's root
REF_SCHEMA = {"type": "object", "properties": {"user": {"$ref": "#/$defs/User"}, "again": {"$ref": "#/properties/user"}},
              "$defs": {"User": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}},
                                 "required": ["name"], "additionalProperties": False}},
              "required": ["user"], "additionalProperties": False}


def test_tool_calls_always_parse_and_fit_their_tool(engine):
    tool_schemas = [*SCHEMAS[:4], REF_SCHEMA]
    functions = [{"type": "function", "function": {"name": f"tool_{i}", "parameters": s}}
                 for i, s in enumerate(tool_schemas)]
    syntax = call_syntax(engine.tokenizer.chat_template)
    for choice in ("required", "tool_2", "tool_4"):
        grammar = tool_call_grammar(functions, syntax, engine.tokenizer, choice)
        for seed in range(3):
            completion = engine.complete(PROMPT, max_new_tokens=200, temperature=1.5, seed=seed, grammar=grammar)
            parsed = parse_tool_calls(completion.text)
            assert completion.finish_reason == "stop" and len(parsed.calls) == 1 and not parsed.errors
            call = parsed.calls[0]
            assert choice == "required" or call.name == choice
            jsonschema.validate(call.arguments, tool_schemas[int(call.name.split("_")[1])])


def _anything(engine) -> Grammar:
    """A grammar every output of this model satisfies: any text, and the special tokens it writes."""
    specials = " | ".join(t for t in ("<tool_call>", "</tool_call>", "<|im_start|>")
                          if engine.tokenizer.token_id(t) is not None)
    return Grammar("%llguidance {}\nstart: (TEXT | " + specials + ")*\nTEXT: /(.|\\n)+/\n", "anything")


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 3}, {"temperature": 1.3, "seed": 11,
                                                                           "top_k": 40}])
def test_a_grammar_that_allows_everything_changes_nothing(engine, sampling):
    free = engine.complete(PROMPT, max_new_tokens=60, **sampling)
    constrained = engine.complete(PROMPT, max_new_tokens=60, grammar=_anything(engine), **sampling)
    assert constrained.token_ids == free.token_ids and free.token_ids


def _decode(engine, grammar, **options):
    conversation = engine.conversation()
    try:
        logits = conversation.prefill_to(engine.encode(PROMPT))
        tokens = list(conversation.generate(logits, GenerationConfig(max_new_tokens=120, grammar=grammar,
                                                                     **options)))
        return tokens, conversation.decode_calls, conversation.forced_tokens
    finally:
        conversation.release()


def test_fast_forward_feeds_forced_tokens_in_one_call_and_keeps_the_sequence(engine, tools):
    grammar = tool_call_grammar([ao_tool.schema() for ao_tool in _tools(tools)],
                                call_syntax(engine.tokenizer.chat_template), engine.tokenizer, "required")
    fast, fast_calls, forced = _decode(engine, grammar)
    slow, slow_calls, _ = _decode(engine, grammar, fast_forward=False)  # a forced token per call
    free, free_calls, _ = _decode(engine, None)
    assert fast == slow and forced > 10  # the tags, keys, separators, braces, the tool's name
    assert fast_calls < slow_calls < free_calls
    assert parse_tool_calls(engine.tokenizer.decode(fast, skip_special_tokens=False)).calls


def test_prompt_lookup_drafts_stop_where_the_grammar_rejects_them(engine):
    schema = {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 20}},
              "required": ["expression"], "additionalProperties": False}
    grammar = json_schema_grammar(schema)
    plain, _, _ = _decode(engine, grammar)
    looked_up, _, _ = _decode(engine, grammar, prompt_lookup=4)  # the prompt holds "17 * 23 + 5": drafts
    assert looked_up == plain  # greedy: the same tokens, drafts or not
    jsonschema.validate(json.loads(engine.tokenizer.decode(plain)), schema)


def test_the_scheduler_decodes_constrained_rows_like_a_lone_conversation(engine, tools):
    grammar = json_schema_grammar(SCHEMAS[1])
    alone = engine.complete(PROMPT, max_new_tokens=80, grammar=grammar).token_ids
    slotted = ao.load_engine(engine.folder, slots=3)
    batch = slotted.generate_batch([PROMPT, PROMPT.replace("40", "65"), PROMPT], max_new_tokens=80, grammar=grammar)
    assert batch[0].token_ids == alone == batch[2].token_ids
    for completion in batch:
        jsonschema.validate(json.loads(completion.text), SCHEMAS[1])
    # three rows on GroupQueryAttention check no drafts: forced tokens are fed as a chunk on their row instead
    from agentopt_compiler.runtime.scheduler import Scheduler

    config = GenerationConfig(max_new_tokens=80, grammar=grammar)
    lone = Conversation(engine)
    list(lone.generate(lone.prefill_to(engine.encode(PROMPT)), config))
    assert lone.forced_tokens > 10  # keys, separators, braces
    scheduler = Scheduler(slotted, prefill_chunk=64, max_waiting=3)
    requests = [scheduler.submit(slotted.encode(PROMPT), config, lambda event: None) for _ in range(3)]
    scheduler.run(requests)
    # a step per token the model chooses; none per forced token
    assert scheduler.stats["decode_steps"] <= len(alone) - lone.forced_tokens + 1


def _tools(functions):
    from agentopt_compiler.runtime.tools import Tool

    return [Tool.from_function(f) for f in functions]


def test_constrained_agent_calls_parse_and_take_fewer_engine_calls(engine, tools):
    tasks = ["What is 17 * 23 + 5?", "Convert 40 km to miles.", "what's 348 plus 519"]
    for task in tasks:
        free = Agent(engine, tools=tools, constrained=False, max_steps=3).run(task)
        constrained = Agent(engine, tools=tools, max_steps=3).run(task)  # constrained by default with tools
        for step in constrained.steps:
            assert not parse_tool_calls(step.text + "</tool_call>" * ("<tool_call>" in step.text)).errors
        if free.steps and free.steps[0].calls:  # the same first call, decoded in fewer engine calls
            assert constrained.steps[0].calls == free.steps[0].calls
        assert constrained.usage["forced_tokens"] > 0
        assert constrained.usage["decode_calls"] < free.usage["decode_calls"]


def test_bad_constraints_are_clear_errors(engine):
    matcher_args = (engine.tokenizer, 512, engine.eos_token_ids)
    with pytest.raises(AgentOptError, match="response_format.*minimum"):
        Matcher(json_schema_grammar({"type": "integer", "minimum": 5, "maximum": 1}, "response_format"),
                *matcher_args)
    with pytest.raises(AgentOptError, match="the regex cannot constrain"):
        Matcher(regex_grammar("(unclosed"), *matcher_args)
    with pytest.raises(AgentOptError, match="look-around.*not supported"):  # the reason, not only "parse error:"
        check_grammar(json_schema_grammar({"type": "string", "pattern": "^(?=a)b$"}, "the schema"), *matcher_args)
    with pytest.raises(AgentOptError, match="not among the tools"):
        tool_call_grammar([{"type": "function", "function": {"name": "a"}}], CALL_SYNTAXES["hermes"], None, "b")
    with pytest.raises(AgentOptError, match="has no tools"):
        Agent(engine, tools=[], constrained=True)
    with pytest.raises(AgentOptError, match="must be a JSON schema object"):
        json_schema_grammar(["not", "a", "schema"])


def test_call_syntax_follows_the_chat_template(engine):
    assert call_syntax(None).open == "<tool_call>"
    qwen = call_syntax('{{- "<tool_call>\\n{\\"name\\": " }}...{{- "}\\n</tool_call>" }}'.replace("\\n", "\n"))
    assert (qwen.after_open, qwen.before_close) == ("\n", "\n")
    ours = call_syntax(engine.tokenizer.chat_template)
    assert (ours.open, ours.after_open, ours.before_close) == ("<tool_call>", "", "")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    matcher = Matcher(tool_call_grammar([tool], qwen, engine.tokenizer, "required"), engine.tokenizer, 512,
                      engine.eos_token_ids)
    for token in engine.encode('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'):
        matcher.consume(token)  # raises on a token the grammar rejects
    assert matcher.done
    assert call_syntax("{{ '<|tool_call|>' }}{{ tools | tojson }}").open == "<|tool_call|>"
    assert call_syntax("[TOOL_CALLS]").list_of_calls
    assert call_syntax("<|python_tag|>").arguments_key == "parameters"


def _tokenizer_with(folder, special):
    """The built-in byte-level tokenizer (261 tokens) with ``special`` tokens added after its own."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    from agentopt_compiler.models.builtin_tokenizer import write_builtin_tokenizer
    from agentopt_compiler.runtime.tokenizer import Tokenizer

    write_builtin_tokenizer(folder)
    tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


def test_a_reasoning_block_closed_by_a_special_token_comes_first_only_where_the_prompt_left_it(tmp_path):
    from agentopt_compiler.runtime.constraints import reasoning_left

    tok = _tokenizer_with(tmp_path, ["<think>", "</think>"])  # special tokens, as in Qwen3's tokenizer
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    tags = ("<think>", "</think>")
    think, call = (tok.encode(text, add_special_tokens=False) for text in
                   ("<think>the user wants f</think>\n\n", '<tool_call>{"name": "f", "arguments": {}}</tool_call>'))

    def accepted(prompt, tokens):
        grammar = tool_call_grammar([tool], call_syntax(None), tok, "required", reasoning_left(prompt, tags))
        return Matcher(grammar, tok, tok.size, [tok.token_id("<|im_end|>")]).valid_prefix(tokens)

    assert accepted("<|im_start|>assistant\n", think + call) == len(think + call)  # may reason, then call
    assert accepted("<|im_start|>assistant\n", call) == len(call)
    closed = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3 with enable_thinking=False
    assert accepted(closed, think) == 0 and accepted(closed, call) == len(call)
    opened = "<|im_start|>assistant\n<think>\n"  # a template that opens the block itself: it must be closed first
    assert accepted(opened, call) == 0 and accepted(opened, think[1:] + call) == len(think) - 1 + len(call)


def test_a_tokenizer_with_more_tokens_than_the_model_constrains_and_refuses_them_in_text(tiny_engine_dir, tmp_path):
    engine = ao.load_engine(tiny_engine_dir)
    vocab = engine.manifest["model"]["config"]["vocab_size"]  # 320 rows; the tokenizer's 261 tokens, then ours:
    # <image> one past the embedding (Gemma 3's tokenizer has one token its text model lacks)
    engine.tokenizer = _tokenizer_with(tmp_path, [f"<unused{i}>" for i in range(vocab - 261)] + ["<image>"])
    assert engine.tokenizer.size == vocab + 1
    config = GenerationConfig(max_new_tokens=40, temperature=1.0, seed=0,
                              grammar=json_schema_grammar(SCHEMAS[0], "response_format"))
    jsonschema.validate(json.loads(engine.generate("say it as JSON", config)), SCHEMAS[0])
    with pytest.raises(AgentOptError, match=r"'<image>' \(id 320\), which this model cannot read"):
        engine.encode("look: <image>")


def test_a_token_the_grammar_rejects_is_a_one_line_error(tmp_path):
    tok = _tokenizer_with(tmp_path, [])
    matcher = Matcher(regex_grammar("ab"), tok, tok.size, [tok.token_id("<|im_end|>")])
    with pytest.raises(AgentOptError) as error:
        matcher.consume(tok.encode("x", add_special_tokens=False)[0])
    assert "\n" not in str(error.value) and "the regex failed" in str(error.value) and "fails parse" in str(error.value)


def test_tokens_forced_at_the_end_are_appended_without_an_engine_call(engine):
    """After the first token everything is forced: when the forced tokens complete the grammar, or their text a stop
    string (an agent step's ``</tool_call>``), no call computes the logits after them (nobody would read them)."""
    done, calls, forced = _decode(engine, regex_grammar("hello world"))
    assert engine.tokenizer.decode(done) == "hello world" and forced > 0 and calls == 0
    open_ended = replace(regex_grammar("hello world( again)*"), whole_output=False)  # (a regex refuses stop strings)
    stopped, calls, _ = _decode(engine, open_ended, stop_strings=("world",))
    assert engine.tokenizer.decode(stopped) == "hello world" and calls == 0
    going_on, calls, _ = _decode(engine, regex_grammar("hello world( again)*"))  # the model chooses what follows
    assert engine.tokenizer.decode(going_on).startswith("hello world") and calls >= 1


def test_tool_choice_none_keeps_a_call_out_of_the_text(engine):
    """agent-tiny answers PROMPT with a call; under the no-call grammar it writes text only, in every call syntax."""
    assert "<tool_call>" in engine.complete(PROMPT, max_new_tokens=60).text
    for syntax in CALL_SYNTAXES.values():  # the other families' tags are text to this tokenizer
        text = engine.complete(PROMPT, max_new_tokens=60, temperature=1.0, seed=1,
                               grammar=no_call_grammar(syntax)).text
        assert text and syntax.open not in text, (syntax, text)


def test_tool_choice_none_cuts_a_text_tag_out_of_the_text(tmp_path):
    """Where the opening tag is plain text (a byte tokenizer), the text may hold anything but the tag."""
    tok = _tokenizer_with(tmp_path, [])
    eos = tok.token_id("<|im_end|>")
    for syntax in CALL_SYNTAXES.values():
        for text, allowed in (("hi <tool there [TOOL", True), (f"hi {syntax.open}", False)):
            matcher = Matcher(no_call_grammar(syntax), tok, tok.size, [eos])
            try:
                for token in tok.encode(text, add_special_tokens=False):
                    matcher.consume(token)
                accepted = True
            except AgentOptError:
                accepted = False
            assert accepted == allowed, (syntax.open, text)


def test_stop_strings_do_not_cut_a_tool_call_and_are_refused_with_a_json_answer(engine, tools):
    """A stop string met inside a call (here in the forced tool name and in the arguments) is passed over: the call
    is the one written without stop strings, and it parses; the call's closing tag still ends an agent's step. A
    JSON answer is shaped whole, so stop strings are refused with it (they could only cut it short of parsing)."""
    grammar = tool_call_grammar(_tool_entries(tools), call_syntax(engine.tokenizer.chat_template), engine.tokenizer,
                                "required")
    whole = engine.complete(PROMPT, max_new_tokens=120, grammar=grammar)
    call = parse_tool_calls(whole.text).calls[0]
    stops = (call.name[:3], '"', "{")
    with_stops = engine.complete(PROMPT, max_new_tokens=120, grammar=grammar, stop_strings=stops)
    assert with_stops.text == whole.text and parse_tool_calls(with_stops.text).calls == [call]
    step = engine.complete(PROMPT, max_new_tokens=120, grammar=grammar, stop_strings=stops + ("</tool_call>",))
    assert step.finish_reason == "stop" and whole.text.startswith(step.text) and step.text.endswith("}")
    with pytest.raises(AgentOptError, match="stop strings cannot be combined with the JSON schema"):
        GenerationConfig(grammar=json_schema_grammar({"type": "object"}), stop_strings=("}",))
    with pytest.raises(AgentOptError, match="ignore_eos cannot be combined with the tools' schemas"):
        engine.complete(PROMPT, max_new_tokens=8, grammar=grammar, ignore_eos=True)  # was a ValueError in llguidance


def _greedy_call(engine, tools, limit):
    grammar = tool_call_grammar(_tool_entries(tools), call_syntax(engine.tokenizer.chat_template), engine.tokenizer,
                                "required")
    return engine.complete(PROMPT, max_new_tokens=limit, grammar=grammar)


def _tool_entries(tools):
    return [t.schema() for t in _tools(tools)]


def test_a_call_the_new_token_limit_would_cut_is_closed_in_the_tokens_left(engine, tools):
    whole = _greedy_call(engine, tools, 200)
    calls = parse_tool_calls(whole.text).calls
    assert whole.finish_reason == "stop" and len(calls) == 1
    expression, n = calls[0].arguments["expression"], len(whole.token_ids)
    # room to spare: nothing changes, the tokens are the model's
    assert _greedy_call(engine, tools, n + 10).token_ids == whole.token_ids
    kept = []
    for limit in range(n - 1, n - 7, -1):  # each would leave the call unclosed: closed in the tokens left instead
        cut = _greedy_call(engine, tools, limit)
        parsed = parse_tool_calls(cut.text)
        assert cut.finish_reason == "length" and len(cut.token_ids) == limit, cut.text
        assert len(parsed.calls) == 1 and not parsed.errors and parsed.calls[0].name == calls[0].name
        cut_expression = parsed.calls[0].arguments["expression"]
        assert expression.startswith(cut_expression)  # the model's own string, cut where the closing had to begin
        kept.append(len(cut_expression))
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]  # one token less, one token less of the string


def test_a_call_the_end_of_the_context_would_cut_is_closed_with_reason_context(engine, tools):
    filler = engine.encode("<|im_start|>user\n" + "note this down. " * 400)
    prompt = engine.encode(PROMPT)
    room = len(_greedy_call(engine, tools, 200).token_ids) - 4  # the context leaves fewer tokens than the call takes
    grammar = tool_call_grammar(_tool_entries(tools), call_syntax(engine.tokenizer.chat_template), engine.tokenizer,
                                "required")
    cut = engine.complete(filler[:engine.context_length - room - len(prompt)] + prompt, max_new_tokens=200,
                          grammar=grammar)
    parsed = parse_tool_calls(cut.text)
    assert cut.finish_reason == "context" and len(parsed.calls) == 1 and not parsed.errors


def test_rows_decoded_together_close_their_calls_before_the_limit(engine, tools):
    """Three rows on GroupQueryAttention check no drafts: the closing is appended as forced tokens (take_forced)."""
    slotted = ao.load_engine(engine.folder, slots=3)
    grammar = tool_call_grammar(_tool_entries(tools), call_syntax(engine.tokenizer.chat_template), engine.tokenizer,
                                "required")
    n = len(_greedy_call(engine, tools, 200).token_ids)
    batch = slotted.generate_batch([PROMPT, PROMPT.replace("40", "65"), PROMPT.replace("17", "1234")],
                                   max_new_tokens=n - 4, grammar=grammar, temperature=1.2, seed=5)
    for completion in batch:
        parsed = parse_tool_calls(completion.text)
        assert len(parsed.calls) == 1 and not parsed.errors, completion.text
    assert any(c.finish_reason == "length" for c in batch)


def test_a_call_that_could_not_close_before_the_limit_is_not_begun(engine, tools):
    """Under the lazy grammar (free text, then calls), a limit too near for a whole call ends the text before the
    opening tag rather than leaving a call that cannot be parsed."""
    grammar = tool_call_grammar(_tool_entries(tools), call_syntax(engine.tokenizer.chat_template), engine.tokenizer)
    free = engine.complete(PROMPT, max_new_tokens=200)
    opens = free.text.index("<tool_call>")  # the model writes some text, then a call
    n = len(engine.encode(free.text[:opens], add_special_tokens=False))
    early = engine.complete(PROMPT, max_new_tokens=n + 6, grammar=grammar)  # the call needs far more than 6 tokens
    assert "<tool_call>" not in early.text and early.finish_reason == "length"
    assert early.token_ids == free.token_ids[:len(early.token_ids)]  # the model's text, up to where the call began
    whole = engine.complete(PROMPT, max_new_tokens=200, grammar=grammar, stop_strings=("</tool_call>",))
    assert "<tool_call>" in whole.text and whole.finish_reason == "stop"


@pytest.mark.parametrize("family", sorted(CALL_SYNTAXES))
def test_the_closing_of_a_cut_call_parses_in_each_family_syntax(engine, family):
    """Matcher.closing finishes a call cut anywhere (in a key, in a string, between properties, in a nested list)
    into one that parses and fits its schema, in every call syntax the grammar writes."""
    schema = SCHEMAS[3]  # nested object, enum list, required keys
    tool = {"type": "function", "function": {"name": "profile", "parameters": schema}}
    syntax = CALL_SYNTAXES[family]
    whole = (syntax.open + ("[" if syntax.list_of_calls else "") + json.dumps(
        {"name": "profile", syntax.arguments_key: {"user": {"name": "ada", "age": 36}, "tags": ["a", "c"]}})
        + ("]" if syntax.list_of_calls else "") + syntax.close)
    grammar = tool_call_grammar([tool], syntax, engine.tokenizer, "required")
    ids = engine.tokenizer.encode(whole, add_special_tokens=False)
    for cut in range(len(ids) // 3, len(ids) - 1, 3):
        matcher = Matcher(grammar, engine.tokenizer, 512, engine.eos_token_ids)
        matcher.consume_all(ids[:cut])
        closing = matcher.closing(64)
        assert closing is not None, engine.tokenizer.decode(ids[:cut])
        matcher.consume_all(closing)
        assert not matcher.open
        text = engine.tokenizer.decode(ids[:cut] + closing, skip_special_tokens=False)
        parsed = parse_tool_calls(text)
        assert len(parsed.calls) == 1 and not parsed.errors, text
        jsonschema.validate(parsed.calls[0].arguments, schema)


def test_at_name_finds_a_call_name_start_and_not_an_argument_named_name():
    single = tool_call_grammar([{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}],
                               CALL_SYNTAXES["hermes"])
    listed = tool_call_grammar([{"name": "a", "parameters": {}}, {"name": "b", "parameters": {}}],
                               CALL_SYNTAXES["mistral"])
    assert single.names == ("a", "b") and single.at_name('I will. <tool_call>{"name": "')
    assert single.at_name('<tool_call>{"name": "a", "arguments": {}}</tool_call> then <tool_call>{"name": "')
    assert not single.at_name('<tool_call>{"name": "a", "arguments": {"name": "')  # an argument called name
    assert not single.at_name('<tool_call>{"name": "a", "arguments": {"x": "{\\"name\\": \\"')  # inside a string
    assert not single.at_name('{"name": "')  # no call opened
    assert listed.at_name('[TOOL_CALLS][{"name": "') and listed.at_name('[TOOL_CALLS][{"name": "a", "arguments": '
                                                                        '{"k": [1, {"x": "}"}]}}, {"name": "')
    assert not listed.at_name('[TOOL_CALLS][{"name": "a", "arguments": {"items": [{"name": "')
    one = tool_call_grammar([{"name": "a", "parameters": {}}], CALL_SYNTAXES["hermes"])
    assert one.names == () and not one.at_name('<tool_call>{"name": "')  # one tool: its name is forced


def _scored(engine, head: list[int], candidate: str, follower: str) -> float:
    """The log-probability of ``candidate`` after the tokens ``head``, by a fresh prefill: its tokens are the
    tokenizer's split of ``candidate + follower`` up to the token holding the closing quote."""
    ids, offsets = engine.tokenizer.encode_with_offsets(candidate + follower)
    ids = [t for t, (start, _) in zip(ids, offsets) if start <= len(candidate)]
    logits = Conversation(engine).feed(head + ids, 0, picks=len(ids) + 1)[0, :-1].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return sum(row[t] - np.log(np.exp(row).sum()) for row, t in zip(logits, ids))


WORDED = ("<|im_start|>system\n{tools}<|im_end|>\n<|im_start|>user\n{request}<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_calls_take_the_likeliest_whole_name_and_go_on_as_if_it_were_given(engine):
    """With whole_tool_names and several tools offered, greedy decoding writes the tool name of the highest
    probability over all its tokens (each name scored here by a fresh prefill, no cache reuse), and the rest of the
    output is what the model writes after that name when it is the only choice (tool_choice naming it): the KV the
    scoring wrote is right."""
    from agentopt_compiler.agent_tiny import heldout_tools
    from agentopt_compiler.agent_tiny.tools import system_prompt

    functions = _tools([heldout_tools.add, heldout_tools.multiply, heldout_tools.word_count])
    specs = [{"name": t.name, "description": "", "parameters": t.parameters} for t in functions]
    syntax = call_syntax(engine.tokenizer.chat_template)
    differ = 0
    for request in ("please add 348 and 519 using the tool", "12 boxes, 36 eggs in each box: how many in all",
                    "how many words are in 'the quick brown fox'"):
        prompt = WORDED.format(tools=system_prompt(specs), request=request)
        grammar = tool_call_grammar([t.schema() for t in functions], syntax, engine.tokenizer, "required")
        whole = engine.complete(prompt, max_new_tokens=80, grammar=grammar, whole_tool_names=True)
        by_token = engine.complete(prompt, max_new_tokens=80, grammar=grammar)
        name = parse_tool_calls(whole.text).calls[0].name
        head = engine.encode(prompt + '<tool_call>{"name": "', add_special_tokens=False)
        assert name == max((t.name for t in functions), key=lambda n: _scored(engine, head, n, '", "')), request
        forced = engine.complete(prompt, max_new_tokens=80, grammar=tool_call_grammar(
            [t.schema() for t in functions], syntax, engine.tokenizer, name), whole_tool_names=True)
        assert forced.token_ids == whole.token_ids
        differ += parse_tool_calls(by_token.text).calls[0].name != name
    assert differ  # the whole-name choice changes at least one of these calls


def test_the_scheduler_chooses_names_whole_alone_and_in_a_batch(engine):
    """Served by the scheduler, one request alone or two decoding together, the calls are the engine's own."""
    from agentopt_compiler.agent_tiny import heldout_tools
    from agentopt_compiler.agent_tiny.tools import system_prompt
    from agentopt_compiler.runtime.scheduler import Scheduler

    functions = _tools([heldout_tools.add, heldout_tools.multiply, heldout_tools.word_count])
    specs = [{"name": t.name, "description": "", "parameters": t.parameters} for t in functions]
    grammar = tool_call_grammar([t.schema() for t in functions], call_syntax(engine.tokenizer.chat_template),
                                engine.tokenizer, "required")
    config = GenerationConfig(max_new_tokens=60, grammar=grammar, whole_tool_names=True)
    prompts = [engine.encode(WORDED.format(tools=system_prompt(specs), request=r), add_special_tokens=False)
               for r in ("please add 348 and 519 using the tool", "12 boxes, 36 eggs in each box: how many in all")]
    want = [engine.generate_ids(p, config) for p in prompts]
    assert want != [engine.generate_ids(p, config.with_options(whole_tool_names=False)) for p in prompts]
    slotted = ao.load_engine(engine.folder, slots=2)
    for batch in ([prompts[0]], prompts):
        scheduler = Scheduler(slotted, prefill_chunk=16)
        outputs = [[] for _ in batch]
        requests = [scheduler.submit(p, config, lambda e, i=i: e.get("token") is not None and outputs[i].append(
            e["token"])) for i, p in enumerate(batch)]
        scheduler.run(requests)
        assert outputs == want[:len(batch)]


def test_the_grammar_knows_where_an_enum_value_starts():
    """A string argument whose schema is an enum is found right in its own tool's arguments object: not in another
    tool's argument of the same name, not in a nested object, not inside a string, not in an earlier call of a list."""
    look = {"name": "look", "parameters": {"type": "object", "properties": {
        "key": {"type": "string", "enum": ["door code", "wifi"]}, "note": {"type": "string"},
        "opts": {"type": "object", "properties": {"key": {"type": "string"}}}}}}
    other = {"name": "other", "parameters": {"type": "object", "properties": {"key": {"type": "string"}}}}
    grammar = tool_call_grammar([look, other], CALL_SYNTAXES["hermes"])
    assert grammar.enums == (("look", "key", ("door code", "wifi")),)
    keys = ("door code", "wifi")
    assert grammar.enum_at('So: <tool_call>{"name": "look", "arguments": {"key": "') == keys
    assert grammar.enum_at('<tool_call>{"name": "look", "arguments": {"note": "a {b", "key": "') == keys
    assert grammar.enum_at('<tool_call>{"name": "look", "arguments": {"note": "') == ()  # not an enum
    assert grammar.enum_at('<tool_call>{"name": "other", "arguments": {"key": "') == ()  # another tool's argument
    assert grammar.enum_at('<tool_call>{"name": "look", "arguments": {"opts": {"key": "') == ()  # nested
    assert grammar.enum_at('<tool_call>{"name": "look", "arguments": {"note": "\\"key\\": "') == ()  # in a string
    assert grammar.enum_at('{"name": "look", "arguments": {"key": "') == ()  # no call opened
    listed = tool_call_grammar([look, other], CALL_SYNTAXES["mistral"])
    assert listed.enum_at('[TOOL_CALLS][{"name": "look", "arguments": {"key": "wifi"}}, {"name": "look", '
                          '"arguments": {"key": "') == keys
    assert listed.enum_at('[TOOL_CALLS][{"name": "look", "arguments": {"key": "wifi"}}, {"name": "other", '
                          '"arguments": {"key": "') == ()
    one_value = {"name": "look", "parameters": {"type": "object", "properties": {
        "key": {"type": "string", "enum": ["wifi"]}}}}
    assert tool_call_grammar([one_value], CALL_SYNTAXES["hermes"]).enums == ()  # forced: nothing to choose


def _long_lookups(engine):
    """(task, its tools' schemas, prompt) of the first long-context lookups of the generator's dev seed: the keys
    of many stored facts, among which token-by-token decoding often takes a wrong person's (MODEL_CARD.md)."""
    from agentopt_compiler.agent_tiny.eval import task_set, task_tools
    from agentopt_compiler.runtime.chat import render_chat
    from agentopt_compiler.runtime.tools import Tool

    out = []
    for task in [t for t in task_set("generator", 50, seed=1) if t.kind == "long_lookup"]:
        schemas = [Tool.from_function(f).schema() for f in task_tools(task)]
        messages = [{"role": "system", "content": task.system}] if task.system else []
        messages += [*task.history, {"role": "user", "content": task.request}]
        out.append((task, schemas, render_chat(engine.tokenizer, messages, schemas, add_generation_prompt=True)))
    return out


def test_greedy_calls_take_the_likeliest_whole_enum_value_and_keep_its_kv(engine):
    """With whole_enum_values (the default), a memory key (the enum of a bound memory_lookup) is the stored key of the
    highest probability over all its tokens (each scored here by a fresh prefill), and the conversation's cache then
    holds that output's KV, not a scored candidate's (the next turn's logits equal a fresh prefill's). Token by
    token, some calls name other keys."""
    syntax = call_syntax(engine.tokenizer.chat_template)
    differ = 0
    for task, schemas, prompt in _long_lookups(engine):
        config = GenerationConfig(max_new_tokens=60,
                                  grammar=tool_call_grammar(schemas, syntax, engine.tokenizer, "memory_lookup"))
        conversation = Conversation(engine)
        tokens = list(conversation.generate(conversation.prefill_to(engine.encode(prompt, add_special_tokens=False)),
                                            config))
        key = parse_tool_calls(engine.tokenizer.decode(tokens, skip_special_tokens=False)).calls[0].arguments["key"]
        head = engine.encode(prompt + '<tool_call>{"name": "memory_lookup", "arguments": {"key": "',
                             add_special_tokens=False)
        assert key == max(task.memory, key=lambda k: _scored(engine, head, k, '"}}')), task.request
        next_turn = conversation.tokens + engine.encode("<|im_end|>\n", add_special_tokens=False)
        np.testing.assert_allclose(conversation.prefill_to(next_turn), Conversation(engine).prefill_to(next_turn),
                                   rtol=1e-4, atol=1e-4)
        by_token = engine.complete(prompt, config, whole_enum_values=False)
        differ += parse_tool_calls(by_token.text).calls[0].arguments["key"] != key
    assert differ  # the whole-value choice changes at least one of these calls


def test_enum_values_that_json_escapes_are_chosen_whole_or_left_to_the_grammar(engine):
    """Values with quotes, backslashes, non-ASCII letters or one a prefix of another: the call parses and names one of
    them, chosen whole or token by token alike (a value whose tokens the grammar does not take as written is left to
    token-by-token choice, never refused)."""
    values = ['say "hi"', "back\\slash", "naïve café", "door", "door code", ""]
    tool = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"what": {"type": "string", "enum": values}, "n": {"type": "integer"}},
        "required": ["what", "n"]}}}
    grammar = tool_call_grammar([tool], call_syntax(engine.tokenizer.chat_template), engine.tokenizer, "pick")
    for request in ("which door?", "say hi", "cafe"):
        prompt = WORDED.format(tools='{"name": "pick", "parameters": {"what": "string", "n": "integer"}}',
                               request=request)
        for whole in (True, False):
            text = engine.complete(prompt, max_new_tokens=60, grammar=grammar, whole_enum_values=whole).text
            call = parse_tool_calls(text).calls[0]
            assert call.arguments["what"] in values and isinstance(call.arguments["n"], int), text


def test_the_scheduler_chooses_enum_values_whole_alone_and_in_a_batch(engine):
    """Served by the scheduler, one request alone or two decoding together, the keys are the engine's own."""
    from agentopt_compiler.runtime.scheduler import Scheduler

    syntax = call_syntax(engine.tokenizer.chat_template)
    cases = _long_lookups(engine)[:2]
    configs = [GenerationConfig(max_new_tokens=60, grammar=tool_call_grammar(schemas, syntax, engine.tokenizer,
                                                                             "memory_lookup"))
               for _, schemas, _ in cases]
    prompts = [engine.encode(prompt, add_special_tokens=False) for _, _, prompt in cases]
    want = [engine.generate_ids(p, c) for p, c in zip(prompts, configs)]
    slotted = ao.load_engine(engine.folder, slots=2)
    for count in (1, 2):
        scheduler = Scheduler(slotted, prefill_chunk=16)
        outputs = [[] for _ in range(count)]
        requests = [scheduler.submit(prompts[i], configs[i], lambda e, i=i: e.get("token") is not None and
                                     outputs[i].append(e["token"])) for i in range(count)]
        scheduler.run(requests)
        assert outputs == want[:count]


def test_choose_whole_scores_only_the_names_that_can_still_win():
    """Names are tried by their first token's log-probability, an upper bound of the whole name's: the choice equals
    scoring every name in full, and names the bound rules out cost no call."""
    from types import SimpleNamespace

    from agentopt_compiler.runtime.generation import choose_whole

    def log_probs(row):
        return row - row.max() - np.log(np.exp(row - row.max()).sum())

    rng = np.random.default_rng(0)
    vocab, calls, multi_token_names = 50, 0, 0
    for _ in range(200):
        names = {f"n{i}": [int(t) for t in rng.choice(vocab, size=rng.integers(1, 4), replace=False)]
                 for i in range(12)}
        first_row = rng.normal(0, 3, vocab)
        rows = {tuple(ids[:-1]): rng.normal(0, 3, (len(ids) - 1, vocab)) for ids in names.values() if len(ids) > 1}
        fed = []

        def feed(ids, start, picks):
            fed.append(tuple(ids))
            return rows[tuple(ids)][-picks:]

        best = choose_whole(SimpleNamespace(choice=names, choice_row=first_row), feed, 0)
        whole = {name: log_probs(first_row)[ids[0]] + sum(log_probs(row)[t] for row, t in zip(
            rows.get(tuple(ids[:-1]), []), ids[1:])) for name, ids in names.items()}
        assert best == max(whole, key=whole.get)
        if len(names[best]) > 1:
            assert fed[-1] == tuple(names[best][:-1])  # the cache ends with the chosen name's tokens
        calls += len(fed)
        multi_token_names += sum(len(ids) > 1 for ids in names.values())
    assert calls < multi_token_names / 2  # most names never needed a call
