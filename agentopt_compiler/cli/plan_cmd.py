"""agentopt plan precision: measure per-layer sensitivity and write a precision plan that meets a budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="choose per-layer settings from measurements (precision)",
                       description="Measure and write an editable plan for agentopt compile.")
    kinds = p.add_subparsers(dest="plan_kind", required=True, metavar="KIND")
    q = kinds.add_parser("precision", help="per-layer int8/int4 plan from measured sensitivity",
                         description="Quantize each unit alone, measure KL and top-1 against fp32 on calibration "
                                     "tokens, and pick the cheapest assignment that meets the budget.")
    q.add_argument("--model", default="tiny-random", help="built-in model name or Hugging Face folder")
    q.add_argument("--calib", default=None, help="calibration text file (default: seeded random tokens)")
    budget = q.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-kl", type=float, help="total KL(fp32 || plan) per token allowed")
    budget.add_argument("--target-bits", type=float, help="average bits per weight allowed")
    budget.add_argument("--min-top1", type=float, help="top-1 agreement with fp32 required")
    q.add_argument("--candidates", default="fp32,int8,int4", help="precisions to consider")
    q.add_argument("--block-size", type=int, default=32)
    q.add_argument("--sequences", type=int, default=4, help="calibration sequences")
    q.add_argument("--length", type=int, default=128, help="tokens per calibration sequence")
    q.add_argument("--out", required=True, help="plan JSON to write")
    q.add_argument("--report", default=None, metavar="DIR", help="write report.md, sensitivity.json and "
                                                                 "sensitivity.png here")
    q.set_defaults(handler=run)


def _progress(done: int, total: int, what: str) -> None:
    bar = "#" * (30 * done // total)
    print(f"\r  calibrating [{bar:<30}] {done}/{total} {what:<28}", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


def run(args) -> int:
    from ..analysis.calibration import calibration_batches
    from ..analysis.precision import options_to_json, plan_precision, report_rows
    from ..models.registry import load_model

    loaded = load_model(args.model)
    batches = calibration_batches(loaded, args.calib, args.sequences, args.length)
    print(f"measuring {args.model}: {len(batches)} x {args.length} calibration tokens", file=sys.stderr)
    plan, options = plan_precision(loaded.model, batches, args.max_kl, args.target_bits, args.min_top1,
                                   [c.strip() for c in args.candidates.split(",")], args.block_size,
                                   progress=_progress)
    plan.save(args.out)
    rows = report_rows(options, plan)
    table = _markdown(rows)
    print(table)
    print(f"plan: {json.dumps(plan.budget)}; predicted {json.dumps(plan.predicted)} -> {args.out}")
    if args.report:
        folder = Path(args.report)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(f"# Precision plan for {args.model}\n\nbudget: {plan.budget}\n\n"
                                          f"predicted: {plan.predicted}\n\n{table}\n")
        (folder / "sensitivity.json").write_text(json.dumps(options_to_json(options), indent=2))
        print(_plot(rows, folder / "sensitivity.png"), file=sys.stderr)
    return 0


def _markdown(rows: list[dict]) -> str:
    precisions = [k[3:] for k in rows[0] if k.startswith("kl_")]
    head = "| unit | chosen | " + " | ".join(f"KL {p} | top-1 {p}" for p in precisions) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(precisions))]
    for row in rows:
        cells = " | ".join(f"{row[f'kl_{p}']:.2e} | {row[f'top1_{p}']:.3f}" for p in precisions)
        lines.append(f"| {row['unit']} | {row['chosen']} | {cells} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no sensitivity.png: install matplotlib (pip install 'agentopt-compiler[plot]')"
    precisions = [k[3:] for k in rows[0] if k.startswith("kl_") and k != "kl_fp32"]
    figure, axis = plt.subplots(figsize=(max(6, len(rows) * 0.35), 4))
    for precision in precisions:
        axis.plot(range(len(rows)), [max(r[f"kl_{precision}"], 1e-9) for r in rows], marker="o", label=precision)
    axis.set_yscale("log")
    axis.set_xticks(range(len(rows)), [r["unit"] for r in rows], rotation=90, fontsize=7)
    axis.set_ylabel("KL vs fp32 (unit quantized alone)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return f"wrote {path}"
