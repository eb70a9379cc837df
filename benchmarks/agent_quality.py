#!/usr/bin/env python
"""What each optimization costs in task success: agent-tiny, eager and as engines, on the same held-out tasks.

    python benchmarks/agent_quality.py                    # 100 held-out tasks per variant
    python benchmarks/agent_quality.py --tasks 20 --variants fused,int4     # quicker

Variants (each compiled from the shipped agent-tiny weights and evaluated with agentopt eval's agent loop, the
runtime Agent, and the real tools; ``--set handwritten`` or ``unseen_tools`` for the hand-written sets):
    fused              default passes, fp32 (lossless: should match eager task for task)
    window-64          sliding window of 64 keys on every layer (ring caches)
    sinks4-window-64   4 attention sinks + 64-key window on every layer (ring caches)
    local-global-64    64-key window on layers 0, 2, 4; layers 1, 3, 5 dense (ring caches on the windowed ones)
    sparse-planned     the plan agentopt plan sparse chose for agent-tiny at --max-kl 0.05 (sinks 4 + window 64 on
                       layers 1, 3 and 4; benchmarks/sparse_quality.py chose it for the weights of commit
                       dc65441's run, 2026-12-01): dense layers carry the far context
    sparse-planned-assistant  the same planner with its KL over assistant-token positions only, at --max-kl 0.01
                       (sinks 4 + window 64 on layers 0, 2, 3 and 4; benchmarks/sparse_quality.py --max-kl 0.01,
                       the same weights)
    int8               every linear int8 weight-only (MatMulNBits)
    int4               every linear int4 weight-only, block 32
    planned            agentopt plan precision with --max-kl (default 0.05) on held-out-free calibration episodes
    kv-fp16, kv-int8   fp32 weights, KV caches in fp16 / int8 (static scales calibrated at compile; --kv-cache-dtype)
Long-context tasks put the needed fact far back among filler, so windows show their cost there.
Not a test: run it by hand. Markdown to stdout, ``--json`` for the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

VARIANTS = {
    "fused": {},
    "window-64": {"sparse_attention": "window=64"},
    "sinks4-window-64": {"sparse_attention": "window=64,sinks=4"},
    "local-global-64": {"sparse_attention": "window=64,layers=0,2,4"},
    "sparse-planned": {"sparse_attention": "window=64,sinks=4,layers=1,3,4"},
    "sparse-planned-assistant": {"sparse_attention": "window=64,sinks=4,layers=0,2,3,4"},
    "int8": {"precision": "int8"},
    "int4": {"precision": "int4"},
    "planned": {"planned": True},
    "kv-fp16": {"kv_cache_dtype": "fp16"},
    "kv-int8": {"kv_cache_dtype": "int8"},
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def calibration_text(tasks: int = 24, seed: int = 97) -> str:
    """Training-split episodes (not the held-out ones) rendered as text, for the precision planner."""
    from agentopt_compiler.agent_tiny.tasks import episode_text, generate_tasks

    return "\n".join(episode_text(task)[0] for task in generate_tasks(tasks, "train", seed=seed))


def compile_variant(name: str, options: dict, work: Path, max_kl: float):
    import agentopt_compiler as ao
    from agentopt_compiler.passes.precision_plan import PrecisionPlan

    kwargs = {"sparse_attention": options.get("sparse_attention"), "kv_cache_dtype": options.get("kv_cache_dtype")}
    config = json.loads((Path(ao.__file__).parent / "models" / "agent_tiny" / "config.json").read_text())
    if "precision" in options:
        kwargs["precision_plan"] = PrecisionPlan.uniform(options["precision"], config["num_layers"])
    if options.get("planned"):
        from agentopt_compiler.analysis.calibration import calibration_batches
        from agentopt_compiler.analysis.precision import plan_precision
        from agentopt_compiler.models.registry import load_model

        calib = work / "calibration.txt"
        calib.write_text(calibration_text())
        loaded = load_model("agent-tiny")
        batches = calibration_batches(loaded, calib, sequences=4, length=256)
        plan, _ = plan_precision(loaded.model, batches, max_kl=max_kl)
        plan.save(work / "planned.json")
        kwargs["precision_plan"] = plan
    engine = ao.compile("agent-tiny", out=work / name, overwrite=True, **kwargs)
    size = sum(info["bytes"] for info in engine.manifest["files"].values())
    return engine, size


def evaluate_variant(name: str, engine, tasks: int, seed: int, task_set_name: str = "generator") -> dict:
    from agentopt_compiler.agent_tiny.eval import evaluate, task_set

    started = time.perf_counter()
    report = evaluate(engine, task_set(task_set_name, tasks, seed))
    log(f"{name}: success {report['success']} in {time.perf_counter() - started:.0f}s")
    return report


def table(rows: list[dict]) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.0f}%"  # noqa: E731
    lines = ["| variant | success | single-tool | multi-step | long-context | error recovery | tool-call JSON valid "
             "| tokens/s | engine size |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        r = row["report"]
        size = f"{row['size'] / 2**20:.1f} MiB" if row.get("size") else "-"
        c = r["success_by_category"]
        lines.append(f"| {row['variant']} | {pct(r['success'])} | {pct(c.get('single'))} | "
                     f"{pct(c.get('multi'))} | {pct(c.get('long_context'))} | {pct(c.get('recovery'))} | "
                     f"{pct(r['tool_call_json_valid'])} | {r.get('tokens_per_s', '-')} | {size} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="held-out task seed")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--set", dest="task_set", default="generator",
                        choices=["generator", "handwritten", "unseen_tools"])
    parser.add_argument("--max-kl", type=float, default=0.05, help="budget of the planned precision variant")
    parser.add_argument("--work-dir", default="bench_out/agent_quality")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; variants: {', '.join(VARIANTS)}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants.split(","):
        log(f"{name}...")
        engine, size = compile_variant(name, VARIANTS[name], work, args.max_kl)
        rows.append({"variant": name, "size": size, "report": evaluate_variant(name, engine, args.tasks, args.seed,
                                                                                 args.task_set)})
    print(f"agent-tiny on {args.tasks} held-out tasks (seed {args.seed}), {time.strftime('%Y-%m-%d %H:%M UTC')}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
