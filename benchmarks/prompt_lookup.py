#!/usr/bin/env python
"""Prompt-lookup decoding on agent work: agent-tiny engines run the same held-out agent tasks with and without drafts.

    python benchmarks/prompt_lookup.py                          # 50 tasks, drafts of 3 / 4 / 8 against none
    python benchmarks/prompt_lookup.py --tasks 10 --drafts 8    # quicker
    python benchmarks/prompt_lookup.py --sparse-attention window=64,sinks=4   # ring-cache engines

Each system is the same engine folder (agent-tiny, ``--precision`` fp32 or int4, ``--sparse-attention`` if given:
a bounded pattern gives ring caches, whose spare slots take the rejected drafts), loaded once per system with
``--threads`` threads, running the runtime ``Agent`` (the agent loop of ``agentopt eval`` and ``agentopt run``: each
step prefilling only what is new), greedily unless ``--temperature`` says to sample. The systems
take turns task by task, so load from other jobs falls on all of them. Measured per system: generation time (prefills
included), tokens generated, draft tokens checked and accepted, and every completion's text, which must equal the
no-draft system's: greedy, the tokens are the greedy tokens either way; sampled (seed 0 per task), a draft is kept
exactly when it is the token the plain sampler draws (sampling.py). Reported: generated tokens/s and its ratio to no
drafts, and the acceptance rate.

What a draft costs depends on the model: a call that checks k drafts computes k + 1 rows, and on a CPU that rarely
matters while the weights dominate the bytes read per call. So the report also measures, for agent-tiny and for
ref-60m (random weights, 57M parameters), the median time of one call by tokens fed, at 512 cached tokens.

Not a test: run it by hand. Progress to stderr, markdown to stdout, ``--json PATH`` for the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args) -> dict:
    import agentopt_compiler as ao
    from agentopt_compiler.agent_tiny.eval import run_task, task_set

    folder = Path(args.work_dir) / f"agent-tiny-{args.precision}"
    log(f"compiling agent-tiny ({args.precision}, sparse attention {args.sparse_attention}) into {folder}")
    ao.compile("agent-tiny", out=folder, overwrite=True, precision_plan=uniform_plan("agent-tiny", args.precision),
               sparse_attention=args.sparse_attention)
    drafts = [0] + [int(d) for d in args.drafts.split(",")]
    engines = {k: ao.load_engine(folder, threads=args.threads) for k in drafts}
    stats = {k: {"success": 0, "generated": 0, "seconds": 0.0, "drafted": 0, "accepted": 0, "completions": []}
             for k in drafts}
    tasks = task_set("generator", args.tasks, args.seed)
    for index, task in enumerate(tasks):
        for k, engine in engines.items():
            started = time.perf_counter()
            r = run_task(engine, task, prompt_lookup=k, temperature=args.temperature)
            s = stats[k]
            s["seconds"] += time.perf_counter() - started
            s["success"] += r["success"]
            s["generated"] += r["usage"].get("generated_tokens", 0)
            s["drafted"] += r["usage"].get("drafted_tokens", 0)
            s["accepted"] += r["usage"].get("accepted_draft_tokens", 0)
            s["completions"] += [m.get("content") for m in r["messages"] if m["role"] == "assistant"]
        if (index + 1) % 10 == 0:
            log(f"  {index + 1}/{len(tasks)} tasks")
    rows = []
    base = stats[0]
    for k, s in stats.items():
        rate = s["generated"] / s["seconds"]
        rows.append({
            "prompt_lookup": k, "tasks": len(tasks), "success": s["success"], "completions": len(s["completions"]),
            "different_completions": sum(a != b for a, b in zip(s["completions"], base["completions"]))
            + abs(len(s["completions"]) - len(base["completions"])),
            "generated_tokens": s["generated"], "seconds": round(s["seconds"], 3),
            "tokens_per_s": round(rate, 1), "vs_no_drafts": round(rate / (base["generated"] / base["seconds"]), 2),
            "drafted_tokens": s["drafted"], "accepted_draft_tokens": s["accepted"],
        })
    return {"settings": vars(args), "environment": environment(), "rows": rows,
            "call_cost": {"agent-tiny": call_cost(folder, args.threads),
                          "ref-60m": call_cost(compile_ref(Path(args.work_dir), args.precision, args.sparse_attention),
                                               args.threads)}}


CALL_TOKENS = (1, 2, 3, 5, 9, 17)  # one pending token plus 0, 1, 2, 4, 8, 16 drafts


def uniform_plan(model: str, precision: str):
    """None for fp32, else every linear of ``model`` at ``precision``."""
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.precision_plan import PrecisionPlan

    if precision == "fp32":
        return None
    return PrecisionPlan.uniform(precision, load_model(model).model.config.num_layers)


def compile_ref(work: Path, precision: str, sparse_attention: str | None) -> Path:
    import agentopt_compiler as ao

    log(f"compiling ref-60m ({precision}, sparse attention {sparse_attention}) for the call-cost table")
    ao.compile("ref-60m", out=work / "ref-60m", context_length=1024, overwrite=True,
               precision_plan=uniform_plan("ref-60m", precision), sparse_attention=sparse_attention)
    return work / "ref-60m"


def call_cost(folder: Path, threads: int, context: int = 512, repeats: int = 100) -> dict:
    """Median ms of one in-place call feeding n tokens (logits of all n) after ``context`` cached tokens."""
    import numpy as np

    import agentopt_compiler as ao

    session = ao.load_engine(folder, threads=threads).session
    rng = np.random.default_rng(0)
    session.reset()
    session.run(rng.integers(0, 256, (1, context)), np.arange(context))
    times = {n: [] for n in CALL_TOKENS}
    for round_ in range(repeats + 10):  # sizes take turns, so drifting load falls on all; 10 untimed rounds first
        for n in CALL_TOKENS:
            ids = rng.integers(0, 256, (1, n))
            start = time.perf_counter()
            session.run(ids, np.arange(context, context + n), np.arange(n)[None])
            if round_ >= 10:
                times[n].append(time.perf_counter() - start)
    return {n: round(1000 * float(np.median(t)), 3) for n, t in times.items()}


def environment() -> dict:
    from importlib import metadata

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": platform.processor() or "?",
            "commit": commit, "onnxruntime": metadata.version("onnxruntime")}


def report(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    sparse = f", sparse attention {s['sparse_attention']}" if s.get("sparse_attention") else ""
    lines = [f"## Prompt-lookup decoding: agent-tiny {s['precision']}{sparse}, {s['tasks']} held-out tasks "
             f"(seed {s['seed']})",
             "",
             f"- date {env['date']}, commit {env['commit']}, onnxruntime {env['onnxruntime']}, {s['threads']} threads, "
             + ("greedy" if not s["temperature"] else f"sampled at temperature {s['temperature']}, seed 0 per task"),
             "- tok/s = generated tokens over the time of the whole agent loop (prefills included); systems alternate "
             "task by task",
             "",
             "| drafts (tokens) | tok/s | vs no drafts | accepted / drafted | completions differing from no "
             "drafts | tasks solved |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        drafted = r["drafted_tokens"]
        acceptance = f"{r['accepted_draft_tokens']} / {drafted} ({r['accepted_draft_tokens'] / drafted:.0%})" \
            if drafted else "–"
        lines.append(f"| {r['prompt_lookup'] or 'off'} | {r['tokens_per_s']} | {r['vs_no_drafts']:.2f}× | "
                     f"{acceptance} | {r['different_completions']} of {r['completions']} | "
                     f"{r['success']}/{r['tasks']} |")
    lines += ["", f"Cost of one call by tokens fed ({s['precision']} engines; median ms, {s['threads']} threads, 512 "
              "tokens cached; relative to one token):", "",
              "| model | " + " | ".join(f"{n} tokens" for n in CALL_TOKENS) + " |", "|---|" + "---|" * len(CALL_TOKENS)]
    for model, costs in result["call_cost"].items():
        one = costs[1]
        lines.append(f"| {model} | " + " | ".join(f"{costs[n]:.2f} ({costs[n] / one:.2f}×)" for n in CALL_TOKENS)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=50, help="held-out agent tasks (default 50)")
    parser.add_argument("--seed", type=int, default=1, help="task sample seed (default 1)")
    parser.add_argument("--drafts", default="3,4,8", help="draft lengths to compare with no drafts (default 3,4,8)")
    parser.add_argument("--precision", choices=["fp32", "int4"], default="fp32")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy; above 0: sampled with seed 0 per task. Either way every "
                             "completion must equal the no-draft one (exit status 1 if one differs)")
    parser.add_argument("--sparse-attention", default=None,
                        help="compile both models with this sparse-attention plan (window=64,sinks=4: ring caches)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=None, help="where the engine is compiled (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        args.work_dir = args.work_dir or tmp
        result = run(args)
    text = report(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(r["different_completions"] == 0 for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
