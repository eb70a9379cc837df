"""The shipped agent-tiny model: it loads, compiles, and its engine does what its eager reference does."""

import pytest

import agentopt_compiler as ao
from agentopt_compiler.models.registry import BUILTIN_MODELS, SHIPPED_MODELS, load_model
from agentopt_compiler.runtime.agent import Agent
from agentopt_compiler.tools import calculator, convert_units, memory_lookup

if not (SHIPPED_MODELS / BUILTIN_MODELS["agent-tiny"].shipped / "model.safetensors").is_file():
    pytest.skip("agent-tiny weights are not in this checkout", allow_module_level=True)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return ao.compile("agent-tiny", out=tmp_path_factory.mktemp("agent") / "eng")


def test_the_readme_task_calls_the_calculator_and_answers(engine):
    events = []
    result = Agent(engine, tools=[calculator, convert_units, memory_lookup]).run(
        "Could you figure out (372 + 386) * 36?", on_event=events.append)
    calls = [e for e in events if e["type"] == "tool_call"]
    assert calls and calls[0]["name"] == "calculator" and calls[0]["arguments"] == {"expression": "(372 + 386) * 36"}
    assert "27288" in result.answer


def test_the_fused_engine_solves_the_same_tasks_as_eager(engine):
    from tokenizers import Tokenizer

    from agentopt_compiler.agent_tiny.eval import EngineGenerator, eager_generator, eval_tasks, run_agent

    loaded = load_model("agent-tiny")
    tokenizer = Tokenizer.from_file(str(loaded.tokenizer_dir / "tokenizer.json"))
    eager, ours = eager_generator(loaded.model, tokenizer), EngineGenerator(engine)
    for task in eval_tasks(6, seed=3):
        assert run_agent(task, ours)["messages"] == run_agent(task, eager)["messages"]


def test_prompt_lookup_gives_the_same_transcripts_and_accepts_copied_tokens(engine):
    """The trained model copies arguments and results from its context: drafts from the conversation get accepted,
    and the transcripts stay those of plain greedy decoding."""
    from agentopt_compiler.agent_tiny.eval import EngineGenerator, eval_tasks, run_agent

    plain, looked_up = EngineGenerator(engine), EngineGenerator(engine, prompt_lookup=4)
    for task in eval_tasks(6, seed=3):
        assert run_agent(task, looked_up)["messages"] == run_agent(task, plain)["messages"]
    drafts = looked_up.conversation
    assert drafts.accepted_draft_tokens >= 0.2 * looked_up.generated  # measured: about half of the tokens
    assert plain.conversation.drafted_tokens == 0
