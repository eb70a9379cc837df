"""agentopt eval: run agent tasks with the runtime Agent (as agentopt run does) and the real tools, on an engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .arg_types import PROMPT_LOOKUP, SEED, THREADS, float_in, int_in

SETS = ("generator", "handwritten", "unseen_tools")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="measure an engine's agent task success on held-out tasks",
                       description="Run held-out agent tasks with the runtime Agent that agentopt run uses (same "
                                   "tools, parsing and error observations) and report task success (the expected "
                                   "tool use and the right answer), tool-call validity and tokens/s. Sets: "
                                   "generator (procedural held-out tasks: calculator, unit conversion, memory "
                                   "lookup, chains, long-context retrieval, error recovery), handwritten (requests "
                                   "written by hand in everyday phrasing), unseen_tools (tools no training episode "
                                   "had). Meaningful for models trained on these tasks (the built-in agent-tiny).")
    p.add_argument("engine", help="engine folder written by agentopt compile")
    p.add_argument("--set", dest="sets", action="append", choices=SETS,
                   help="task set (repeatable; default generator)")
    p.add_argument("--tasks", type=int_in(1, 1_000_000), default=None,
                   help="number of generator tasks (default 100; the hand-written sets always run whole)")
    p.add_argument("--seed", type=SEED, default=0, help="generator task seed")
    p.add_argument("--minutes", type=float_in(0.0, low_open=True), default=None,
                   help="stop each set after this long (report how many ran)")
    p.add_argument("--threads", type=THREADS, default=None, help="CPU threads for the backend")
    p.add_argument("--prompt-lookup", type=PROMPT_LOOKUP, default=0, metavar="N",
                   help="decode with up to N drafted tokens per call (the same tokens; see agentopt run)")
    p.add_argument("--no-constrain", action="store_true",
                   help="decode tool calls freely (default: under the tools' grammar, as agentopt run does)")
    p.add_argument("--json", metavar="PATH", help="write the full reports (with transcripts of failures) here")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..agent_tiny.eval import evaluate, format_report, task_set
    from ..errors import AgentOptError
    from ..output_paths import check_writable_file, write_text_atomically
    from ..runtime.engine import load_engine

    sets = args.sets or ["generator"]
    if args.tasks is not None and "generator" not in sets:
        raise AgentOptError(f"--tasks counts generator tasks, and only {', '.join(sets)} is asked for (those sets "
                            "always run whole); add --set generator or drop --tasks")
    if args.json:  # now, not after the evaluation
        check_writable_file(Path(args.json), "--json")
    engine = load_engine(args.engine, threads=args.threads)
    if engine.tokenizer is None:
        raise AgentOptError(f"engine '{args.engine}' has no tokenizer; agent evaluation needs text")
    reports = {}
    for name in sets:
        tasks = task_set(name, args.tasks or 100, args.seed)
        print(f"evaluating {engine.manifest['model']['name']} on {len(tasks)} {name} tasks...", file=sys.stderr)
        report = evaluate(engine, tasks, time_budget_s=None if args.minutes is None else args.minutes * 60,
                          prompt_lookup=args.prompt_lookup, constrained=not args.no_constrain)
        print(format_report(report, name))
        print(f"  generation: {report['generated_tokens']} tokens at {report['tokens_per_s']} tokens/s "
              f"({report['prefilled_tokens']} prompt tokens prefilled, {report['reused_tokens']} reused from cache"
              + (f", {report['accepted_draft_tokens']} of {report['drafted_tokens']} drafted tokens accepted)"
                 if args.prompt_lookup else ")"))
        reports[name] = report
    if args.json:
        body = reports if len(reports) > 1 else next(iter(reports.values()))
        write_text_atomically(Path(args.json), json.dumps(body, indent=2) + "\n", "--json")
    return 0
