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

    from agentopt_compiler.models.agent_eval import EngineGenerator, eager_generator, eval_tasks, run_agent

    loaded = load_model("agent-tiny")
    tokenizer = Tokenizer.from_file(str(loaded.tokenizer_dir / "tokenizer.json"))
    eager, ours = eager_generator(loaded.model, tokenizer), EngineGenerator(engine)
    for task in eval_tasks(6, seed=3):
        assert run_agent(task, ours)["messages"] == run_agent(task, eager)["messages"]
