"""The agent loop over a real engine (prefill, KV reuse, template, tools), with the *model's text* scripted: a model
with random weights never writes a tool call, so these tests script what the model says and check what the loop does
with it. End-to-end behaviour with a trained model is measured by ``agentopt eval``."""

import pytest

from agentopt_compiler.errors import AgentOptError, ContextOverflowError
from agentopt_compiler.runtime.agent import Agent, describe_event
from agentopt_compiler.runtime.prefix_cache import PrefixCache


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first
        b: second
    """
    return a + b


def explode() -> str:
    """Fails."""
    raise RuntimeError("kaboom")


@pytest.fixture()
def scripted(monkeypatch):
    def script(agent, outputs):
        replies = iter(outputs)
        seen_prompts = []

        def fake_generate(logits, config, emit):
            seen_prompts.append(list(agent.conversation.tokens))
            # one real decode step, so the cache bookkeeping is exercised; then the scripted text
            Agent._generate(agent, logits, config.__class__(**{**config.__dict__, "max_new_tokens": 1}), emit)
            text = next(replies)
            return text, "</tool_call>" if text.endswith("}") else "stop", 1

        monkeypatch.setattr(agent, "_generate", fake_generate)
        return seen_prompts
    return script


def test_tool_call_observation_answer(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[add, explode], system="You add numbers.")
    prompts = scripted(agent, ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 40}}', "The sum is 42."])
    events = []
    result = agent.run("What is 2 + 40?", on_event=events.append)
    assert result.answer == "The sum is 42." and result.finish_reason == "answer"
    assert [e["type"] for e in events if e["type"] != "token"] == ["tool_call", "tool_result", "final"]
    assert result.steps[0].observations == ["42"]
    assert agent.messages[-2] == {"role": "tool", "content": "42"}
    # the second step prefilled only the new tokens: the call's end, the observation and turn markers
    assert result.usage["reused_tokens"] >= len(prompts[0]) - 1
    assert result.usage["prefilled_tokens"] < len(prompts[0]) + len(prompts[1]) // 2


def test_errors_become_observations_and_the_loop_goes_on(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[add, explode], max_steps=5)
    scripted(agent, ['<tool_call>{"name": "add", "arguments": {"a": 2,}',
                     '<tool_call>{"name": "subtract", "arguments": {}}',
                     '<tool_call>{"name": "explode", "arguments": {}}',
                     '<tool_call>{"name": "add", "arguments": {"a": 1}}',
                     "I could not do it."])
    result = agent.run("Try things")
    observations = [o for step in result.steps for o in step.observations]
    assert "invalid JSON" in observations[0]
    assert "unknown tool 'subtract'" in observations[1]
    assert "raised RuntimeError: kaboom" in observations[2]
    assert "missing required argument(s): b" in observations[3]
    assert result.answer == "I could not do it."


def test_an_option_of_the_agent_given_to_run_says_where_it_belongs(chat_engine):
    with pytest.raises(AgentOptError, match="max_steps is an option of Agent"):
        Agent(chat_engine, tools=[]).run("hi", max_steps=1)


def test_step_limit(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[add], max_steps=2)
    scripted(agent, ['<tool_call>{"name": "add", "arguments": {"a": 1, "b": 1}}'] * 2)
    result = agent.run("loop forever")
    assert result.answer is None and result.finish_reason == "step_limit" and len(result.steps) == 2


def test_second_agent_starts_from_the_shared_system_prefix(chat_engine, scripted):
    cache = PrefixCache()
    first = Agent(chat_engine, tools=[add], system="You add numbers.", prefix_cache=cache)
    scripted(first, ["42."])
    first.run("What is 40 + 2?")
    second = Agent(chat_engine, tools=[add], system="You add numbers.", prefix_cache=cache)
    scripted(second, ["7."])
    result = second.run("And 3 + 4?")
    assert cache.hits == 1 and result.usage["reused_tokens"] > 100  # the system turn with the tool schema


@pytest.mark.parametrize("call, event", [('<tool_call>{"name": "add", "arguments": {"a": 1}}', "tool_result"),
                                         ('<tool_call>{"name": "add", "arguments": {"a": 2,}', "tool_error")])
def test_a_repeated_failing_call_gets_another_observation_then_stops_the_loop(chat_engine, scripted, call, event):
    """A call that fails the same way twice (bad arguments, or malformed) is told so; a third time ends the task."""
    agent = Agent(chat_engine, tools=[add], max_steps=6)
    scripted(agent, [call] * 6)
    events = []
    result = agent.run("add one", on_event=events.append)
    observations = [o for step in result.steps for o in step.observations]
    assert len(observations) == 3 and observations[0] != observations[1]
    assert "already failed" in observations[1] and observations[1].startswith(observations[0])
    assert result.answer is None and result.finish_reason == "repeated_failure"
    assert any(e["type"] == "stopped" and "three times" in e["reason"] for e in events)
    # the CLI shows what the model saw (a malformed call's on its own line after the streamed call)
    shown = [describe_event(e) for e in events if e["type"] == event]
    assert shown[1] == ("\n← " if event == "tool_error" else "← ") + observations[1]


def test_a_repeated_call_that_succeeds_is_not_a_repeated_failure(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[add], max_steps=4)
    scripted(agent, ['<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}'] * 3 + ["3."])
    result = agent.run("add")
    assert result.finish_reason == "answer" and [o for s in result.steps for o in s.observations] == ["3"] * 3


def test_a_stray_closing_tag_is_a_parse_error_not_the_answer(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[add], max_steps=3)
    scripted(agent, ['The answer is 5</tool_call>', "The answer is 5."])
    result = agent.run("add")
    assert result.answer == "The answer is 5." and len(result.steps) == 2
    assert "without an opening <tool_call>" in result.steps[0].observations[0]


def test_an_answer_cut_at_the_token_limit_is_not_a_finished_answer(chat_engine, scripted, monkeypatch):
    agent = Agent(chat_engine, tools=[add], max_steps=2)
    scripted(agent, ["The answer is 4"])
    generate = agent._generate
    monkeypatch.setattr(agent, "_generate", lambda *a: (generate(*a)[0], "length", 1))
    result = agent.run("add")
    assert result.answer == "The answer is 4" and result.finish_reason == "length"


def test_a_call_cut_by_the_token_limit_ends_the_task_with_length(chat_engine, scripted, monkeypatch):
    agent = Agent(chat_engine, tools=[add], max_steps=3, constrained=False)
    scripted(agent, ['<tool_call>{"name": "add", "argum'])
    generate = agent._generate
    monkeypatch.setattr(agent, "_generate", lambda *a: (generate(*a)[0], "length", 1))
    events = []
    result = agent.run("add", on_event=events.append)
    assert result.finish_reason == "length" and len(result.steps) == 1 and result.steps[0].observations == []
    assert any(e["type"] == "stopped" and "cut at the step's limit" in e["reason"] for e in events)


def succeeds_with_error_null() -> str:
    """Reports success the way many APIs do."""
    return '{"result": 7, "error": null}'


def test_a_result_with_error_null_is_a_success(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[succeeds_with_error_null], max_steps=4)
    scripted(agent, ['<tool_call>{"name": "succeeds_with_error_null", "arguments": {}}'] * 3 + ["7."])
    result = agent.run("go")
    assert result.finish_reason == "answer" and "already failed" not in " ".join(result.steps[1].observations)


def huge() -> str:
    """Returns far more text than a context holds."""
    return "word " * 50_000


def test_a_tool_result_longer_than_a_quarter_of_the_context_is_cut_and_marked(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[huge], max_steps=2)
    scripted(agent, ['<tool_call>{"name": "huge", "arguments": {}}', "Done."])
    result = agent.run("call it")
    observation = result.steps[0].observations[0]
    limit = chat_engine.context_length // 4
    assert observation.startswith("word word") and "[cut: the result has" in observation
    assert len(chat_engine.encode(observation, add_special_tokens=False)) <= limit < 50_000
    assert result.answer == "Done."


def test_a_conversation_that_outgrows_the_context_ends_the_task_saying_at_which_step(chat_engine, scripted):
    agent = Agent(chat_engine, tools=[huge], max_steps=8)
    scripted(agent, ['<tool_call>{"name": "huge", "arguments": {}}'] * 8)
    events = []
    result = agent.run("call it until it overflows", on_event=events.append)
    assert result.finish_reason == "context" and result.answer is None and 1 < len(result.steps) < 8
    stopped = [e["reason"] for e in events if e["type"] == "stopped"]
    assert len(stopped) == 1 and f"outgrew the engine's context at step {len(result.steps) + 1}" in stopped[0]
    with pytest.raises(ContextOverflowError):  # a task whose own prompt does not fit is still an error
        Agent(chat_engine).run("word " * chat_engine.context_length)


def test_a_step_limit_too_small_for_any_call_is_refused(chat_engine):
    agent = Agent(chat_engine, tools=[add])
    with pytest.raises(AgentOptError, match="too small for a call of the tools: the shortest call takes"):
        agent.run("add 2 and 3", max_new_tokens=5)
    Agent(chat_engine, tools=[add], constrained=False).run("add 2 and 3", max_new_tokens=5)  # free: not checked


def test_agent_options_of_the_wrong_kind_are_refused(chat_engine):
    for options, says in [({"max_steps": 0}, "max_steps"), ({"max_steps": "3"}, "max_steps"),
                          ({"tool_timeout_s": 0}, "tool_timeout_s"), ({"tool_timeout_s": 1e10}, "at most"),
                          ({"system": 123}, "system must be text"),
                          ({"tools": add}, "tools must be a list"), ({"tools": [add, add]}, "its own name"),
                          ({"generation": {"max_new_tokens": 4}}, "generation must be")]:
        with pytest.raises(AgentOptError, match=says):
            Agent(chat_engine, **options)
    with pytest.raises(AgentOptError, match="engine must be an Engine"):
        Agent("engine-folder")
    with pytest.raises(AgentOptError, match="a task is non-empty text"):
        Agent(chat_engine).run(None)
    with pytest.raises(AgentOptError, match="on_event must be a function"):
        Agent(chat_engine).run("hi", on_event=5)  # before any generation
