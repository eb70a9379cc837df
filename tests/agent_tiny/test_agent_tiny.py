"""The shipped agent-tiny model through its engine and the runtime Agent: the README's tasks, and ``agentopt eval``
giving the transcript ``agentopt run --task`` gives."""

import json

import pytest

import agentopt_compiler as ao
from agentopt_compiler.models.registry import BUILTIN_MODELS, SHIPPED_MODELS
from agentopt_compiler.runtime.agent import Agent, describe_event
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


def _printed(events) -> str:
    """What agentopt run prints on standard output for these agent events."""
    out = []
    for e in events:
        if e["type"] == "token":
            out.append(e["text"])
        elif e["type"] not in ("final", "stopped"):  # why a task stopped goes to standard error
            out.append(describe_event(e) + "\n")
    return "".join(out) + "\n"  # the answer's line ends


def test_eval_and_run_give_the_same_transcript(engine, tmp_path, capsys):
    from agentopt_compiler.agent_tiny.eval import run_task, task_set
    from agentopt_compiler.cli.main import main

    hand, unseen = task_set("handwritten"), task_set("unseen_tools")
    picks = [hand[0], next(t for t in hand if t.kind == "lookup"), next(t for t in hand if t.kind == "lookup>calc"),
             unseen[0]]
    for task in picks:
        evaluated = run_task(engine, task)
        argv = ["run", str(engine.folder), "--task", task.request, "--tools", *task.tools]
        if task.memory:
            (tmp_path / "memory.json").write_text(json.dumps(task.memory))
            argv += ["--memory", str(tmp_path / "memory.json")]
        if task.system:
            argv += ["--system", task.system]
        capsys.readouterr()
        assert main(argv) == 0
        assert capsys.readouterr().out == _printed(evaluated["events"]), task.id


def test_memory_lookups_name_a_stored_key(engine):
    """With a memory, the key is one of its keys (the schema's enum under constrained decoding), where decoding freely
    the model invents keys ("my fish number" for an employee ID) and reads nothing."""
    from agentopt_compiler.agent_tiny.eval import run_task, task_set

    lookups = [t for t in task_set("handwritten") if t.kind == "lookup"][:12]
    keys = [(t, c[1]["key"]) for t in lookups for c in run_task(engine, t)["calls"] if c[0] == "memory_lookup"]
    assert keys and all(key in task.memory for task, key in keys)
    free = [(t, c[1]["key"]) for t in lookups for c in run_task(engine, t, constrained=False)["calls"]
            if c[0] == "memory_lookup"]
    assert any(key not in task.memory for task, key in free)


def test_prompt_lookup_gives_the_same_transcripts(engine):
    from agentopt_compiler.agent_tiny.eval import run_task, task_set

    for task in task_set("generator", 4, seed=3):
        assert run_task(engine, task, prompt_lookup=4)["messages"] == run_task(engine, task)["messages"]


def test_eval_says_what_error_ended_tasks(tmp_path):
    """A context too small for the tasks' prompts: the summary names the error, not only 0% success."""
    from agentopt_compiler.agent_tiny.eval import evaluate, format_report, task_set

    small = ao.compile("agent-tiny", out=tmp_path / "small", context_length=64)
    report = evaluate(small, task_set("generator", 2, seed=3))
    text = format_report(report)
    assert report["success"] == 0 and sum(n for _, n in report["errors"]) == 2
    assert "task(s): the prompt has" in text and "context holds 64" in text, text
