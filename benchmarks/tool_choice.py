#!/usr/bin/env python
"""Which tool agent-tiny calls first, names chosen whole or token by token (``GenerationConfig.whole_tool_names``).

    python benchmarks/tool_choice.py                      # the shipped weights
    python benchmarks/tool_choice.py --model RUN --tasks 150

Two sets, each request decoded greedily under the offered tools' grammar with a call required (the runtime's
constrained decoding, an fp32 engine compiled here): ``new_tool`` episodes of the training generator (everyday.py)
from a seed no training run uses (the training distribution: does the decoding find the tool the model learned?),
and the 32 requests of the unseen-tool set (tools no training episode had). Reported: how often the first call names
the expected tool, for each way of choosing the name. Not a test: run it by hand.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import agentopt_compiler as ao  # noqa: E402
from agentopt_compiler.agent_tiny import heldout_tools  # noqa: E402
from agentopt_compiler.agent_tiny.eval import UNSEEN_TOOLS  # noqa: E402
from agentopt_compiler.agent_tiny.everyday import make_everyday_task  # noqa: E402
from agentopt_compiler.agent_tiny.tasks import render_chat  # noqa: E402
from agentopt_compiler.agent_tiny.tools import system_prompt  # noqa: E402
from agentopt_compiler.runtime.constraints import call_syntax, tool_call_grammar  # noqa: E402
from agentopt_compiler.runtime.tools import Tool, parse_tool_calls  # noqa: E402


def generated_requests(n: int) -> list[tuple[str, list[dict], str]]:
    """(prompt, offered tools, expected tool) of ``n`` new_tool episodes of an unused seed."""
    out = []
    for i in range(n):
        task = make_everyday_task("new_tool", random.Random(f"tool-choice-bench/{i}"))
        offered = [json.loads(line) for line in task.messages[0]["content"].splitlines()
                   if line.startswith('{"name"')]
        tools = [{"name": t["name"], "parameters": {"type": "object", "properties": {
            p: {"type": jtype} for p, jtype in t["parameters"].items()}, "required": list(t["parameters"])}}
            for t in offered]
        out.append((render_chat(task.messages, add_generation_prompt=True), tools, task.calls[0][0]))
    return out


def unseen_requests() -> list[tuple[str, list[dict], str]]:
    out = []
    for line in UNSEEN_TOOLS.read_text().splitlines():
        task = json.loads(line)
        tools = [Tool.from_function(getattr(heldout_tools, spec.split(":")[1])) for spec in task["tools"]]
        specs = [{"name": t.name, "description": "", "parameters": t.parameters} for t in tools]
        messages = [{"role": "system", "content": system_prompt(specs)}, {"role": "user", "content": task["request"]}]
        out.append((render_chat(messages, add_generation_prompt=True), [t.schema() for t in tools],
                    task["calls"][0][0]))
    return out


def right_first(engine, requests, whole: bool) -> int:
    syntax = call_syntax(engine.tokenizer.chat_template)
    right = 0
    for prompt, tools, want in requests:
        grammar = tool_call_grammar(tools, syntax, engine.tokenizer, "required")
        text = engine.complete(prompt, max_new_tokens=120, grammar=grammar, whole_tool_names=whole).text
        calls = parse_tool_calls(text).calls
        right += bool(calls) and calls[0].name == want
    return right


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="agent-tiny", help="agent-tiny, or a folder agent_tiny.train wrote")
    p.add_argument("--tasks", type=int, default=150, help="generated new_tool requests")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tool-choice-") as tmp:
        ao.compile(args.model, out=Path(tmp) / "engine")
        engine = ao.load_engine(Path(tmp) / "engine", threads=args.threads)
        print(f"first call names the expected tool ({args.model}, greedy, call required)\n")
        print("| set | requests | names chosen whole | token by token |\n|---|---|---|---|")
        for name, requests in (("generated new_tool (unused seed)", generated_requests(args.tasks)),
                               ("unseen tools", unseen_requests())):
            print(f"| {name} | {len(requests)} | {right_first(engine, requests, True)} | "
                  f"{right_first(engine, requests, False)} |", flush=True)


if __name__ == "__main__":
    main()
