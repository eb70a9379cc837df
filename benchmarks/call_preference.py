#!/usr/bin/env python
"""Would a better search have found the right call? agent-tiny's log-probability of the expected first call against
the call it made, on the requests it got wrong.

    python -m agentopt_compiler.agent_tiny.eval agentopt_compiler/models/agent_tiny --set handwritten \\
        --set unseen_tools --json report.json
    python benchmarks/call_preference.py report.json [--model agentopt_compiler/models/agent_tiny]

For each failed task whose first call differs from the expected one, both calls are scored teacher-forced by the
PyTorch model (the same weights the engine runs) after the same prompt the agent saw (the tool prompt of the task's
tools and the request): log p(call text + ``</tool_call>``). If the model gives the expected call the higher score,
decoding missed it and a wider search (beam, whole-value choice) could find it; if it gives its own call the higher
score, no search over the model's probabilities can, and only other weights can. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentopt_compiler.agent_tiny.eval import HANDWRITTEN, UNSEEN_TOOLS, AgentTask, task_tools  # noqa: E402
from agentopt_compiler.agent_tiny.tasks import render_chat  # noqa: E402
from agentopt_compiler.agent_tiny.tools import format_tool_call, system_prompt  # noqa: E402
from agentopt_compiler.agent_tiny.train import load_trained  # noqa: E402
from agentopt_compiler.runtime.tools import Tool  # noqa: E402

SETS = {"handwritten": HANDWRITTEN, "unseen_tools": UNSEEN_TOOLS}


def task_prompt(task: dict) -> str:
    """The text the agent's first turn continues: the tool prompt of the task's tools, the request."""
    agent_task = AgentTask(task["id"], task["kind"], task["kind"], task["request"], task["calls"], task["answer"],
                           memory=task.get("memory", {}),
                           **({"tools": tuple(task["tools"])} if "tools" in task else {}))
    tools = [t if isinstance(t, Tool) else Tool.from_function(t) for t in task_tools(agent_task)]
    specs = [{"name": t.name, "parameters": t.parameters} for t in tools]
    messages = [{"role": "system", "content": system_prompt(specs)}, {"role": "user", "content": task["request"]}]
    return render_chat(messages, add_generation_prompt=True)


def call_logprob(model, tok, prompt: str, name: str, arguments: dict) -> float:
    """log p(the call's text | prompt), summed over its tokens (the prompt's tokens are a prefix of the whole's:
    the prompt ends with a newline the tokenizer never merges across)."""
    import torch

    head = tok.encode(prompt).ids
    ids = tok.encode(prompt + format_tool_call(name, arguments)).ids
    assert ids[:len(head)] == head, "the call's tokens merge with the prompt's"
    with torch.no_grad():
        logp = model(torch.tensor([ids])).log_softmax(-1)[0]
    return sum(float(logp[i - 1, ids[i]]) for i in range(len(head), len(ids)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", help="the JSON that agent_tiny.eval --json wrote")
    p.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "agentopt_compiler/models/agent_tiny"),
                   help="the folder the engine was compiled from (a folder train.py wrote)")
    args = p.parse_args(argv)
    model, tok = load_trained(args.model)
    report = json.loads(Path(args.report).read_text())
    summary = {}
    for set_name, path in SETS.items():
        if set_name not in report:
            continue
        tasks = {t["id"]: t for t in map(json.loads, path.read_text().splitlines())}
        own = expected = likely = 0
        for result in report[set_name]["results"]:
            task = tasks[result["id"]]
            if result["success"] or not result["calls"] or list(result["calls"][0]) == list(task["calls"][0]):
                continue
            prompt = task_prompt(task)
            got = call_logprob(model, tok, prompt, *result["calls"][0])
            want = call_logprob(model, tok, prompt, *task["calls"][0])
            expected += want > got
            own += want <= got
            likely += got > math.log(0.5)
            print(f"{set_name} {task['id']}: {'expected' if want > got else 'own':8s} log p own {got:7.2f} "
                  f"expected {want:7.2f} | {json.dumps(result['calls'][0][1])} vs {json.dumps(task['calls'][0][1])}")
        summary[set_name] = {"first_call_wrong": own + expected, "model_prefers_expected": expected,
                             "model_prefers_own": own, "own_call_above_half": likely}
        print(f"{set_name}: {own + expected} failed tasks with a wrong first call; the model scores the expected "
              f"call higher in {expected}, its own in {own} (its own above probability 0.5 in {likely})")
    return summary


if __name__ == "__main__":
    main()
