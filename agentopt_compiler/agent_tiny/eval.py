"""Evaluate agent-tiny with the runtime ``Agent`` that ``agentopt run`` and the server use, on three task sets.

    generator      held-out tasks of the procedural generator (tasks.py: held-out seeds and phrasings), by kind
    handwritten    requests written by hand in free phrasing (data/heldout_handwritten.jsonl): calc, convert,
                   lookup and two-step, never trained on (tests/agent_tiny check that no training request matches)
    unseen_tools   requests for tools that appear in no training episode (data/heldout_unseen_tools.jsonl, tools in
                   heldout_tools.py, e.g. the README's ``add``)

One task = one ``Agent`` built by ``agent_for_task`` exactly as ``agentopt run --task REQUEST --tools ... --memory
FILE [--system S]`` builds it (same tools, same parsing, same error observations), the task's earlier turns (the
notes of a generator lookup) as history. A task succeeds when the agent's successful tool calls include the expected
ones, in order, with equivalent arguments (an expression of the same value, the same units, the same memory entry),
and the final answer states the expected value: a right number reached without the expected tool use fails.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .tasks import TRANSIENT_ERROR, Task, answer_matches, generate_tasks
from .tools import ToolError, calculator, canonical_unit, normalize_key, runtime_tools

DATA = Path(__file__).parent / "data"
HANDWRITTEN = DATA / "heldout_handwritten.jsonl"
UNSEEN_TOOLS = DATA / "heldout_unseen_tools.jsonl"
BUILTIN_TOOL_SPECS = ("agentopt_compiler.tools:calculator", "agentopt_compiler.tools:convert_units",
                      "agentopt_compiler.tools:memory_lookup")
MAX_STEPS, MAX_NEW_TOKENS = 6, 256  # agentopt run's defaults

# default held-out mix of the generator set: kind -> share of the tasks
EVAL_MIX = {"calc": 0.12, "convert": 0.12, "lookup": 0.12, "calc>convert": 0.09, "lookup>calc": 0.09,
            "lookup>convert": 0.09, "lookup>calc>convert": 0.09, "long_lookup": 0.08, "long_lookup>calc": 0.06,
            "retry": 0.08, "bad_expr": 0.06}


@dataclass
class AgentTask:
    """One evaluation task in the form the runtime Agent takes: a request, the tools (``module:function`` specs, as
    ``agentopt run --tools`` takes them), an optional system message and memory, earlier turns, the expected calls
    and answer."""

    id: str
    kind: str
    category: str
    request: str
    calls: list[tuple[str, dict]]
    answer: str
    tools: tuple[str, ...] = BUILTIN_TOOL_SPECS
    memory: dict[str, str] = field(default_factory=dict)
    system: str | None = None
    history: list[dict] = field(default_factory=list)
    fail_first: int = 0


def from_generator(task: Task, index: int = 0) -> AgentTask:
    """A generator task: the system message is the tool prompt the template writes for the three tools, the turns
    between it and the request are history."""
    return AgentTask(f"gen-{index}", task.kind, task.category, task.messages[-1]["content"], task.calls,
                     task.answer, memory=task.memory, history=[dict(m) for m in task.messages[1:-1]],
                     fail_first=task.fail_first)


def eval_tasks(n: int = 100, seed: int = 0, mix: dict[str, float] | None = None) -> list[Task]:
    """``n`` held-out generator tasks (held-out seeds and phrasings) spread over the kinds of ``mix``."""
    mix = mix or EVAL_MIX
    total = sum(mix.values())
    counts = {k: max(1, round(n * w / total)) for k, w in mix.items()}
    while sum(counts.values()) > n:
        counts[max(counts, key=counts.get)] -= 1
    while sum(counts.values()) < n:
        counts[min(counts, key=counts.get)] += 1
    tasks = []
    for i, (kind, c) in enumerate(counts.items()):
        tasks += generate_tasks(c, "heldout", seed, mix={kind: 1.0}, start=100_000 * (i + 1))
    return tasks


def load_task_file(path: Path) -> list[AgentTask]:
    """Tasks of a JSONL file: {"id", "kind", "request", "calls": [[name, args], ...], "answer"} and optionally
    "tools" (specs), "memory", "system"."""
    out = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        d = json.loads(line)
        kind = d["kind"]
        category = "two_step" if len(d["calls"]) > 1 else "unseen_tool" if kind == "unseen_tool" else "single"
        out.append(AgentTask(d["id"], kind, category, d["request"], [tuple(c) for c in d["calls"]], str(d["answer"]),
                             tuple(d.get("tools", BUILTIN_TOOL_SPECS)), d.get("memory", {}), d.get("system")))
    return out


def task_set(name: str, n: int = 100, seed: int = 0) -> list[AgentTask]:
    if name == "generator":
        return [from_generator(t, i) for i, t in enumerate(_interleave(eval_tasks(n, seed)))]
    if name == "handwritten":
        return load_task_file(HANDWRITTEN)
    if name == "unseen_tools":
        return load_task_file(UNSEEN_TOOLS)
    raise ValueError(f"unknown task set {name!r}; sets: generator, handwritten, unseen_tools")


# ----------------------------------------------------------------------------------------------------------------------
# One task through the runtime Agent

def task_tools(task: AgentTask) -> list:
    """The task's tools as ``agentopt run`` loads them: builtin specs bound to the task's memory (``--memory``)."""
    from ..runtime.tools import load_tool

    tools, memory_tools = [], dict(zip(BUILTIN_TOOL_SPECS, runtime_tools(task.memory)))
    for spec in task.tools:
        tools.append(memory_tools[spec] if spec in memory_tools else load_tool(spec))
    if task.fail_first:
        tools = [_failing_first(t, task.fail_first) for t in tools]
    return tools


def _failing_first(function, n: int):
    """The tool, answering its first ``n`` calls with the transient error of the ``retry`` kind."""
    import functools

    left = [n]

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        if left[0]:
            left[0] -= 1
            return TRANSIENT_ERROR
        return function(*args, **kwargs)

    return wrapper


def agent_for_task(engine, task: AgentTask, max_steps: int = MAX_STEPS, tools: list | None = None,
                   constrained: bool | None = None):
    """The Agent ``agentopt run --task`` builds for this task (tool calls constrained by the tools' grammar unless
    ``constrained=False``, as ``--no-constrain``)."""
    from ..runtime.agent import Agent

    agent = Agent(engine, tools=tools if tools is not None else task_tools(task), system=task.system,
                  max_steps=max_steps, constrained=constrained)
    agent.messages += [dict(m) for m in task.history]
    return agent


def run_task(engine, task: AgentTask, max_steps: int = MAX_STEPS, max_new_tokens: int = MAX_NEW_TOKENS,
             on_event: Callable[[dict], None] | None = None, prompt_lookup: int = 0, temperature: float = 0.0,
             constrained: bool | None = None, whole_tool_names: bool = False,
             whole_enum_values: bool = True) -> dict:
    """Run one task to its end; returns success, the failure kind, the calls, the events and the transcript."""
    from ..errors import AgentOptError

    agent = agent_for_task(engine, task, max_steps, constrained=constrained)
    events: list[dict] = []

    def record(event: dict) -> None:
        events.append(event)
        if on_event is not None:
            on_event(event)

    try:
        result = agent.run(task.request, on_event=record, max_new_tokens=max_new_tokens, temperature=temperature,
                           prompt_lookup=prompt_lookup, whole_tool_names=whole_tool_names,
                           whole_enum_values=whole_enum_values, **({"seed": 0} if temperature else {}))
        answer, finish, usage, steps = result.answer, result.finish_reason, result.usage, result.steps
    except AgentOptError as exc:  # e.g. the conversation outgrew the context
        answer, finish, usage, steps = None, f"error: {exc}", {}, []
    agent.conversation.release()
    calls = []  # (name, arguments, output or None when the call failed)
    pending = None
    for e in events:
        if e["type"] == "tool_call":
            pending = (e["name"], e["arguments"])
        elif e["type"] == "tool_result" and pending is not None:
            calls.append((*pending, None if e["error"] or _is_error(e["output"]) else e["output"]))
            pending = None
    attempts = sum(1 for e in events if e["type"] in ("tool_call", "tool_error"))
    valid = sum(1 for e in events if e["type"] == "tool_call")
    used, failure = check_tool_use(task, calls)
    answered = answer is not None and answer_matches(task.answer, answer)
    success = used and answered
    if not success:
        if answer is None:
            failure = "no_final_answer:" + finish.split(":")[0]
        elif failure is None:
            failure = "wrong_final_answer"
    return {"id": task.id, "kind": task.kind, "category": task.category, "success": success,
            "failure": None if success else failure, "tool_call_attempts": attempts, "tool_call_valid": valid,
            "calls": [[n, a] for n, a, _ in calls], "final": answer, "finish_reason": finish, "events": events,
            "messages": agent.messages, "usage": usage, "steps": steps}


def _is_error(output: str) -> bool:
    try:
        value = json.loads(output)
    except (TypeError, ValueError):
        return False
    return isinstance(value, dict) and "error" in value


def check_tool_use(task: AgentTask, calls: list[tuple[str, dict, Any]]) -> tuple[bool, str | None]:
    """Whether the successful calls include the expected ones in order (other successful calls may come between);
    else (False, the first mismatch)."""
    ok_calls = [(n, a) for n, a, out in calls if out is not None]
    i = 0
    for step, (name, want) in enumerate(task.calls):
        while i < len(ok_calls) and not (ok_calls[i][0] == name and same_arguments(name, ok_calls[i][1], want,
                                                                                      task.memory)):
            i += 1
        if i == len(ok_calls):
            if not calls:
                return False, "no_tool_call"
            names = [n for n, _, _ in calls]
            return False, (f"wrong_arg:{name}" if name in names else f"missing_call:{name}")
        i += 1
    return True, None


def same_arguments(name: str, got: dict, want: dict, memory: dict[str, str]) -> bool:
    if set(got) != set(want):
        return False
    for param, w in want.items():
        g = got[param]
        if name == "calculator" and param == "expression":
            try:
                if abs(float(calculator(g)) - float(calculator(w))) > 1e-6:
                    return False
            except (ToolError, TypeError, ValueError):
                return False
        elif param in ("from_unit", "to_unit"):
            try:
                if canonical_unit(g) != canonical_unit(w):
                    return False
            except ToolError:
                return False
        elif name == "memory_lookup" and param == "key":
            if not isinstance(g, str) or normalize_key(g) != normalize_key(w):
                return False
        elif isinstance(w, (int, float)) and not isinstance(w, bool):
            if isinstance(g, bool) or not isinstance(g, (int, float)) or abs(g - w) > 1e-6:
                return False
        elif isinstance(w, str):
            if not isinstance(g, str) or g.strip().lower() != w.strip().lower():
                return False
        elif g != w:
            return False
    return True


# ----------------------------------------------------------------------------------------------------------------------
# A set of tasks

def evaluate(engine, tasks: list[AgentTask], time_budget_s: float | None = None, prompt_lookup: int = 0,
             max_steps: int = MAX_STEPS, max_new_tokens: int = MAX_NEW_TOKENS, constrained: bool | None = None,
             whole_tool_names: bool = False, whole_enum_values: bool = True) -> dict:
    """Run ``tasks`` (stopping early when ``time_budget_s`` runs out); success rates overall, by category and kind,
    tool-call validity, the top failures, generation counts and a few failed transcripts."""
    t0 = time.time()
    results = []
    for task in tasks:
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            break
        results.append(run_task(engine, task, max_steps, max_new_tokens, prompt_lookup=prompt_lookup,
                                constrained=constrained, whole_tool_names=whole_tool_names,
                                whole_enum_values=whole_enum_values))
    by_cat, by_kind = defaultdict(list), defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r["success"])
        by_kind[r["kind"]].append(r["success"])
    attempts = sum(r["tool_call_attempts"] for r in results)
    valid = sum(r["tool_call_valid"] for r in results)
    rate = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    usage = Counter()
    for r in results:
        usage.update(r["usage"])
    seconds = time.time() - t0
    return {
        "tasks": len(results), "tasks_planned": len(tasks), "seconds": round(seconds, 1),
        "success": rate([r["success"] for r in results]),
        "success_by_category": {k: rate(v) for k, v in sorted(by_cat.items())},
        "success_by_kind": {k: rate(v) for k, v in sorted(by_kind.items())},
        "counts_by_category": {k: len(v) for k, v in sorted(by_cat.items())},
        "tool_call_json_valid": round(valid / attempts, 4) if attempts else None,
        "top_failures": Counter(r["failure"] for r in results if r["failure"]).most_common(8),
        # tasks that ended in an error (a prompt the context cannot hold, ...): what it said, not only that it failed
        "errors": Counter(r["finish_reason"].removeprefix("error: ") for r in results
                          if r["finish_reason"].startswith("error:")).most_common(3),
        "generated_tokens": usage["generated_tokens"], "prefilled_tokens": usage["prefilled_tokens"],
        "reused_tokens": usage["reused_tokens"], "drafted_tokens": usage["drafted_tokens"],
        "accepted_draft_tokens": usage["accepted_draft_tokens"],
        "tokens_per_s": round(usage["generated_tokens"] / seconds, 1) if seconds else 0.0,
        "results": [{k: r[k] for k in ("id", "kind", "success", "failure", "calls", "final", "finish_reason")}
                    for r in results],
        "examples": [{k: r[k] for k in ("id", "kind", "failure", "messages")} for r in results if not r["success"]][:5],
    }


def _interleave(tasks: list[Task]) -> list[Task]:
    """Round-robin over kinds, so a time-capped run still covers every kind."""
    groups = defaultdict(list)
    for t in tasks:
        groups[t.kind].append(t)
    out, i = [], 0
    while len(out) < len(tasks):
        for g in groups.values():
            if i < len(g):
                out.append(g[i])
        i += 1
    return out


def format_report(report: dict, name: str = "") -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    c = report["counts_by_category"]
    lines = [
        f"agent eval{' (' + name + ')' if name else ''}: {report['tasks']}/{report['tasks_planned']} tasks in "
        f"{report['seconds']} s",
        f"  success overall {pct(report['success'])} | " + " | ".join(
            f"{k} {pct(v)} (n={c[k]})" for k, v in report["success_by_category"].items()),
        f"  tool-call JSON valid {pct(report['tool_call_json_valid'])}",
        "  by kind: " + ", ".join(f"{k} {pct(v)}" for k, v in report["success_by_kind"].items()),
        "  top failures: " + (", ".join(f"{k} x{n}" for k, n in report["top_failures"]) or "none"),
    ]
    lines += [f"  error in {n} task(s): {message}" for message, n in report.get("errors", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """``python -m agentopt_compiler.agent_tiny.eval FOLDER [--set handwritten]``: compile a folder written by
    train.py (or an engine folder) and evaluate it."""
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("folder", help="a folder train.py wrote, or an engine folder")
    p.add_argument("--set", dest="sets", action="append", choices=["generator", "handwritten", "unseen_tools"],
                   help="task set (repeatable; default all three)")
    p.add_argument("--tasks", type=int, default=100, help="generator tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes", type=float, default=None, help="time cap per set")
    p.add_argument("--json", help="write the full reports here")
    p.add_argument("--whole-tool-names", action="store_true",
                   help="choose tool names whole (GenerationConfig(whole_tool_names=True)), for comparison")
    p.add_argument("--enum-values-by-token", action="store_true",
                   help="choose enum values (memory keys) token by token, not whole "
                        "(GenerationConfig(whole_enum_values=False)), for comparison")
    args = p.parse_args(argv)
    from ..runtime.engine import load_engine

    folder = Path(args.folder)
    with tempfile.TemporaryDirectory(prefix="agent-eval-") as tmp:
        if (folder / "manifest.json").is_file():
            engine = load_engine(folder, threads=args.threads)
        else:
            import agentopt_compiler as ao

            ao.compile(str(folder), out=Path(tmp) / "engine")
            engine = load_engine(Path(tmp) / "engine", threads=args.threads)
        reports = {}
        for name in args.sets or ["generator", "handwritten", "unseen_tools"]:
            report = evaluate(engine, task_set(name, args.tasks, args.seed),
                              time_budget_s=None if args.minutes is None else args.minutes * 60,
                              whole_tool_names=args.whole_tool_names,
                              whole_enum_values=not args.enum_values_by_token)
            print(format_report(report, name), flush=True)
            reports[name] = report
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2))
    return reports


if __name__ == "__main__":
    main()
