"""agentopt plan precision|sparse: measure per-layer sensitivity and write a plan that meets a budget."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from .arg_types import float_in, int_in

KL = float_in(0.0)  # a KL budget: below 0 no plan can meet it
SEQUENCES = int_in(1, 10_000)


def add_parser(sub) -> None:
    from ..compiler import MAX_CONTEXT_LENGTH, MIN_CONTEXT_LENGTH
    from ..passes.precision_plan import BLOCK_SIZES

    p = sub.add_parser("plan", help="choose per-layer settings from measurements (precision, sparse)",
                       description="Measure and write an editable plan for agentopt compile.")
    kinds = p.add_subparsers(dest="plan_kind", required=True, metavar="KIND")
    q = kinds.add_parser("precision", help="per-layer int8/int4 plan from measured sensitivity",
                         description="Quantize each unit alone, measure KL and top-1 against fp32 on calibration "
                                     "tokens, and pick the cheapest assignment that meets the budget.")
    q.add_argument("--model", default="agent-tiny", help="built-in model name or Hugging Face folder (default: "
                   "agent-tiny, as agentopt compile)")
    q.add_argument("--calib", default=None, help="calibration text file (default: seeded random tokens)")
    budget = q.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-kl", type=KL, help="total KL(fp32 || plan) per token allowed (>= 0)")
    budget.add_argument("--target-bits", type=float_in(0.0, 32.0, low_open=True),
                        help="average bits per weight allowed")
    budget.add_argument("--min-top1", type=float_in(0.0, 1.0), help="top-1 agreement with fp32 required (0 to 1)")
    q.add_argument("--candidates", default="fp32,int8,int4",
                   help="precisions to consider, from fp32,fp16,bf16,int8,int4; int8/int4 at a block size of their "
                        "own as int4@128 (larger blocks: fewer scale bytes and faster decode, more error); "
                        "fp16/bf16: scored by emulating the GPU's half region; on ONNX Runtime CPU they run, and "
                        "cost, as fp32")
    q.add_argument("--block-size", type=int_in(), choices=BLOCK_SIZES, default=32,
                   help="block size of int8/int4 candidates that name none")
    q.add_argument("--asymmetric", action="store_true",
                   help="int8/int4 blocks with zero points (default: symmetric blocks, no zero points: a smaller "
                        "engine at about the same error)")
    q.add_argument("--sequences", type=SEQUENCES, default=4, help="calibration sequences")
    q.add_argument("--length", type=int_in(2, MAX_CONTEXT_LENGTH), default=None,
                   help="tokens per calibration sequence (default 128, at most the model's max positions)")
    q.add_argument("--sensitivity", choices=["scaled", "exact"], default="scaled",
                   help="scaled (default): each layer unit's most lossy int8/int4 candidate is propagated through the "
                        "model, the others scaled by their output error (within 8%% of exact on ref-60m, 3x faster); "
                        "exact: every unit and candidate propagated")
    q.add_argument("--threads", type=int_in(1, 1024), default=None,
                   help="intra-op threads the engine will run with, for the decode cost model (default: ONNX "
                        "Runtime's, as engines load)")
    q.add_argument("--refresh-cost-model", action="store_true",
                   help="measure this machine's decode cost model again (it is measured once per machine and "
                        "threads, and cached in $AGENTOPT_CACHE_DIR or ~/.cache/agentopt, so two plans on one "
                        "machine use the same numbers)")
    q.add_argument("--out", required=True, help="plan JSON to write")
    q.add_argument("--report", default=None, metavar="DIR", help="write report.md, sensitivity.json and "
                                                                 "sensitivity.png here")
    q.set_defaults(handler=run)

    s = kinds.add_parser("sparse", help="per-layer sparse attention plan from measured attention cost",
                         description="Give each layer alone the attention pattern, measure KL and top-1 against the "
                                     "dense model on calibration tokens (and each head's attention mass outside the "
                                     "pattern), and make as many layers sparse as the KL budget allows.")
    s.add_argument("--model", default="agent-tiny", help="built-in model name or Hugging Face folder (default: "
                   "agent-tiny, as agentopt compile)")
    source = s.add_mutually_exclusive_group()
    source.add_argument("--calib", default=None, help="calibration text file (default: seeded random tokens)")
    source.add_argument("--calib-chat", default=None, metavar="FILE.jsonl",
                        help="calibration conversations, one per line ({\"messages\": [...], \"tools\": [...]}), "
                             "rendered with the model's chat template; KL is measured over the positions that "
                             "predict assistant tokens (tool calls, answers), and held out on the next conversations")
    s.add_argument("--holdout", default=None, metavar="FILE",
                   help="held-out text for the fidelity check (default: the calibration file's rows after the "
                        "calibration ones; other random tokens without --calib)")
    s.add_argument("--window", type=int_in(1, MAX_CONTEXT_LENGTH), required=True,
                   help="window W: a query sees W keys, itself included")
    s.add_argument("--sinks", type=int_in(0, MAX_CONTEXT_LENGTH), default=0,
                   help="first S tokens stay visible (StreamingLLM)")
    s.add_argument("--stride", type=int_in(0, MAX_CONTEXT_LENGTH), default=0,
                   help="every K-th earlier key stays visible (no ring cache)")
    s.add_argument("--max-kl", type=KL, required=True,
                   help="total KL(dense || plan) per token allowed, summed over the sparse layers")
    s.add_argument("--sequences", type=SEQUENCES, default=4, help="calibration sequences")
    s.add_argument("--length", type=int_in(2, MAX_CONTEXT_LENGTH), default=None,
                   help="tokens per calibration sequence, more than --window (default 256, at most the model's max "
                        "positions)")
    s.add_argument("--context-length", type=int_in(MIN_CONTEXT_LENGTH, MAX_CONTEXT_LENGTH), default=None,
                   help="engine context for the KV-bytes estimate (default: the model's, at most 4096)")
    s.add_argument("--out", required=True, help="plan JSON to write (agentopt compile --sparse-attention PLAN)")
    s.add_argument("--report", default=None, metavar="DIR", help="write report.md, sensitivity.json and "
                                                                 "heatmap.png here")
    s.set_defaults(handler=run_sparse)


class _Progress:
    """A bar with the measurements done, the time taken and an estimate of the time left (from the mean time per
    measurement so far)."""

    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, done: int, total: int, what: str) -> None:
        elapsed = time.perf_counter() - self.start
        left = elapsed / done * (total - done) if done else 0.0
        bar = "#" * (30 * done // total)
        print(f"\r  measuring [{bar:<30}] {done}/{total} {elapsed:5.0f}s, ~{left:4.0f}s left {what:<28}",
              end="" if done < total else "\n", file=sys.stderr, flush=True)


def _progress(done: int, total: int, what: str) -> None:
    bar = "#" * (30 * done // total)
    print(f"\r  calibrating [{bar:<30}] {done}/{total} {what:<28}", end="" if done < total else "\n",
          file=sys.stderr, flush=True)


def _check_outputs(args) -> None:
    """--out and --report can be written: checked before the measurement, which takes minutes on real models."""
    from ..output_paths import check_writable_file, check_writable_folder

    check_writable_file(Path(args.out), "--out")
    if args.report:
        check_writable_folder(Path(args.report), "--report")


def _set_length(args, loaded, default: int) -> None:
    """--length, within the positions the model has (RoPE tables end there): the default shrinks to fit, a longer
    --length given by hand is refused."""
    from ..errors import AgentOptError

    positions = loaded.config.max_position_embeddings
    if args.length is None:
        args.length = min(default, positions)
    elif args.length > positions:
        raise AgentOptError(f"--length {args.length} is longer than the {positions} positions of {args.model} "
                            f"(max_position_embeddings); give --length {positions} or less")


def _write_report(folder: Path, texts: dict[str, str]) -> None:
    from ..errors import OutputPathError

    path = folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            path = folder / name
            path.write_text(text)
    except OSError as exc:
        raise OutputPathError(f"cannot write --report '{path}': {exc.strerror or exc}; choose another "
                              "--report") from None


def run(args) -> int:
    from ..analysis.calibration import calibration_batches
    from ..analysis.precision import options_to_json, plan_precision, report_rows
    from ..models.registry import load_model
    from ..passes.precision_plan import parse_precision

    _check_outputs(args)
    from ..analysis.cost_model import COST_MODEL_NOISE, cached_cost_model, formats_for
    from .progress import ProgressLog

    log = ProgressLog()
    candidates = [c.strip() for c in args.candidates.split(",")]
    for candidate in candidates:
        parse_precision(candidate)  # a typo fails before the model loads
    loaded = load_model(args.model)  # the module the compile captures (reference, else transformers)
    _set_length(args, loaded, 128)
    batches = calibration_batches(loaded, args.calib, args.sequences, args.length)
    formats = formats_for(candidates, args.block_size)
    cost_model = cached_cost_model(args.threads, not args.asymmetric, refresh=args.refresh_cost_model, log=log,
                                   formats=formats)
    constants = ", ".join(f"{k} {v * 1e12:.0f}" for k, v in cost_model.seconds_per_weight.items())
    noise = max(cost_model.noise.values(), default=0)
    log(f"cost model ({cost_model.source}): ps per weight {constants}; noise {noise:.1%}"
        + (f" (over the {COST_MODEL_NOISE:.0%} its measurement aims for: other work was running while it was "
           "timed, and plans chosen with it may differ from an idle machine's; measure it again on an idle "
           "machine with --refresh-cost-model)" if noise > COST_MODEL_NOISE else ""))
    log(f"measuring {args.model}: {len(batches)} x {args.length} calibration tokens "
        f"({args.calib or 'seeded random tokens'})")
    plan, options = plan_precision(loaded.model, batches, args.max_kl, args.target_bits, args.min_top1,
                                   candidates, args.block_size, progress=_Progress(),
                                   symmetric=not args.asymmetric, cost_model=cost_model, log=log,
                                   method=args.sensitivity)
    plan.measurements["calibration"] = str(args.calib or "seeded random tokens")
    plan.model = loaded.name  # the compile refuses it for another model
    m = plan.measurements
    for row in m["uniform"]:
        log(f"uniform {row['precision']}: checked KL {row['checked_kl']:.3g}, predicted decode matmuls "
            f"{row['decode_matmul_seconds'] * 1e3:.2f} ms")
    log(f"plan ({m['choice']}): checked KL {plan.predicted['checked_kl']:.3g}, predicted decode matmuls "
        f"{plan.predicted['decode_matmul_seconds'] * 1e3:.2f} ms; planned in {m['planning_seconds']:.0f}s")
    rows = report_rows(options, plan)
    table = _markdown(rows)
    print(table)
    print(f"plan: {json.dumps(plan.budget)}; predicted {json.dumps(plan.predicted)} -> {args.out}")
    if args.report:
        folder = Path(args.report)
        _write_report(folder, {"report.md": f"# Precision plan for {args.model}\n\nbudget: {plan.budget}\n\n"
                                            f"predicted: {plan.predicted}\n\n{table}\n",
                               "sensitivity.json": json.dumps(options_to_json(options), indent=2)})
        print(_plot(rows, folder / "sensitivity.png"), file=sys.stderr)
    plan.save(args.out)  # last: a report that cannot be written leaves no plan behind
    return 0


def _measured_precisions(rows: list[dict]) -> list[str]:
    """Every precision measured on some unit, in order (a unit whose size a block does not divide has fewer)."""
    return list(dict.fromkeys(k[3:] for row in rows for k in row if k.startswith("kl_")))


def _markdown(rows: list[dict]) -> str:
    precisions = _measured_precisions(rows)
    head = "| unit | chosen | " + " | ".join(f"KL {p} | top-1 {p}" for p in precisions) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(precisions))]
    for row in rows:  # n/a: that unit cannot take that precision
        cells = " | ".join(f"{row[f'kl_{p}']:.2e} | {row[f'top1_{p}']:.3f}" if f"kl_{p}" in row else "n/a | n/a"
                           for p in precisions)
        lines.append(f"| {row['unit']} | {row['chosen']} | {cells} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no sensitivity.png: install matplotlib (pip install 'agentopt-compiler[plot]')"
    precisions = [p for p in _measured_precisions(rows) if p != "fp32"]
    figure, axis = plt.subplots(figsize=(max(6, len(rows) * 0.35), 4))
    for precision in precisions:  # a gap where a unit cannot take the precision
        axis.plot(range(len(rows)), [max(r[f"kl_{precision}"], 1e-9) if f"kl_{precision}" in r else float("nan")
                                     for r in rows], marker="o", label=precision)
    axis.set_yscale("log")
    axis.set_xticks(range(len(rows)), [r["unit"] for r in rows], rotation=90, fontsize=7)
    axis.set_ylabel("KL vs fp32 (unit quantized alone)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return f"wrote {path}"


def _held_out(loaded, args) -> list:
    from ..analysis.calibration import calibration_batches

    if args.holdout:
        return calibration_batches(loaded, args.holdout, args.sequences, args.length)
    if args.calib is None:
        return calibration_batches(loaded, None, args.sequences, args.length, seed=1234)
    return calibration_batches(loaded, args.calib, 2 * args.sequences, args.length)[args.sequences:]


MIN_CHAT_POSITIONS = 32  # assistant-token positions a --calib-chat plan is measured on, at least


def run_sparse(args) -> int:
    from ..analysis.calibration import calibration_batches, chat_calibration
    from ..analysis.sparse import check_length, measure_fidelity, plan_sparse
    from ..errors import AgentOptError
    from ..models.registry import load_model
    from ..passes.insert_sparse_attention import SparsePattern

    pattern = SparsePattern(args.window, args.sinks, args.stride)
    if args.length is not None:
        check_length(args.length, pattern)  # before the model loads
    _check_outputs(args)
    loaded = load_model(args.model)  # the module the compile captures (reference, else transformers)
    _set_length(args, loaded, 256)
    check_length(args.length, pattern)
    positions = held_out_positions = None
    if args.calib_chat:
        if args.holdout:
            raise AgentOptError("--holdout is plain text; with --calib-chat the held-out check uses the "
                                "conversations after the calibration ones in the same file")
        # the file is read once: the first --sequences conversations calibrate, the next ones are held out
        rows, masks = chat_calibration(loaded, args.calib_chat, 2 * args.sequences, args.length,
                                       min_length=pattern.window + 1)
        batches, positions = rows[:args.sequences], masks[:args.sequences]
        held_out, held_out_positions = rows[args.sequences:], masks[args.sequences:]
        if not batches:
            raise AgentOptError(f"'{args.calib_chat}' has no conversation longer than the window of {pattern.window} "
                                f"tokens, so the pattern hides nothing there")
        measured = int(sum(p.sum() for p in positions))
        if measured < MIN_CHAT_POSITIONS:  # a plan from a handful of positions is noise (1 chose a layer)
            raise AgentOptError(f"in '{args.calib_chat}', cut to --length {args.length} tokens, the conversations "
                                f"have {measured} position(s) that predict assistant tokens (at least "
                                f"{MIN_CHAT_POSITIONS} are needed), and only those are measured; give a larger "
                                "--length, more --sequences, or conversations with longer assistant turns")
        what = (f"{len(batches)} conversations ({sum(b.shape[1] for b in batches)} tokens, "
                f"{int(sum(p.sum() for p in positions))} predicting assistant tokens)")
    else:
        batches = calibration_batches(loaded, args.calib, args.sequences, args.length)
        held_out = _held_out(loaded, args)
        what = f"{len(batches)} x {args.length} calibration tokens"
    print(f"measuring {args.model} with {pattern.describe()}: {what}", file=sys.stderr)
    result = plan_sparse(loaded.model, batches, pattern, args.max_kl, args.context_length, progress=_progress,
                         positions=positions)
    if held_out:
        result.fidelity = measure_fidelity(loaded.model, result.plan, held_out, held_out_positions)
    else:
        print("no held-out conversations (the file has no more than --sequences usable ones): add some"
              if args.calib_chat else
              "no held-out rows (the calibration file has no text beyond the calibration rows): give --holdout "
              "FILE to check the plan", file=sys.stderr)
    result.plan = dataclasses.replace(result.plan, model=loaded.name)  # the compile refuses it for another model
    rows = _sparse_rows(result)
    table = _sparse_markdown(rows)
    print(table)
    predicted = {k: result.predicted[k] for k in ("kl", "sparse_layers", "kv_bytes", "kv_bytes_all_dense")}
    print(f"plan: {json.dumps(result.budget)}; predicted {json.dumps(predicted)}; held-out "
          f"{json.dumps(result.fidelity)} -> {args.out}")
    if result.fidelity and result.fidelity["kl"] > args.max_kl:
        print(f"WARNING: with all chosen layers sparse the held-out KL {result.fidelity['kl']:.3g} exceeds the "
              f"budget {args.max_kl} (per-layer errors did not add up); choose a tighter budget", file=sys.stderr)
    if args.report:
        folder = Path(args.report)
        m = result.measurement
        report = (
            f"# Sparse attention plan for {args.model}\n\n"
            f"pattern: {pattern.describe()} ({json.dumps(result.document()['pattern'])}); calibration: "
            f"{what} ({args.calib_chat or args.calib or 'seeded random tokens'})\n\n"
            f"budget: {result.budget}\n\npredicted (sum of per-layer KL): {result.predicted}\n\n"
            f"held-out (all chosen layers sparse together): {result.fidelity}\n\n{table}\n\n"
            f"KL and top-1: that layer alone sparse, against the dense model, mean per token over "
            f"{'the positions that predict assistant tokens' if args.calib_chat else 'every position'}. Mass "
            f"outside: per query head, the softmax probability the dense model puts on keys the pattern hides, "
            f"averaged over the {m.queries_beyond_window} queries at positions >= {pattern.window}.\n\nThe plan is "
            f"per layer, not per head: the fused attention op applies one pattern to all heads of a layer, so a layer "
            f"with one far-looking (retrieval) head stays dense as a whole. The per-head masses show where a "
            f"per-head plan would differ.\n")
        _write_report(folder, {"report.md": report, "sensitivity.json": json.dumps(m.to_dict(), indent=2)})
        print(_heatmap(rows, pattern.describe(), folder / "heatmap.png"), file=sys.stderr)
    result.save(args.out)  # last: a report that cannot be written leaves no plan behind
    return 0


def _sparse_rows(result) -> list[dict]:
    from ..analysis.sparse import report_rows

    return report_rows(result)


def _sparse_markdown(rows: list[dict]) -> str:
    lines = ["| layer | chosen | KL (layer alone) | top-1 | mass outside (mean) | (max head) | per head |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        heads = " ".join(f"{v:.2f}" for v in row["heads"])
        lines.append(f"| {row['layer']} | {row['chosen']} | {row['kl']:.2e} | {row['top1']:.3f} | "
                     f"{row['mass_mean']:.3f} | {row['mass_max']:.3f} | {heads} |")
    return "\n".join(lines)


def _heatmap(rows: list[dict], pattern: str, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no heatmap.png: install matplotlib (pip install 'agentopt-compiler[plot]')"
    heads = len(rows[0]["heads"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(max(7, heads * 0.3 + 4), max(3, len(rows) * 0.3 + 1.5)),
                                         gridspec_kw={"width_ratios": [max(heads, 4), 3]})
    image = left.imshow([r["heads"] for r in rows], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    figure.colorbar(image, ax=left, label="attention mass outside")
    left.set_title(f"mass each head puts outside {pattern}", fontsize=9)
    left.set_yticks(range(len(rows)), [f"{r['layer']} {r['chosen']}" for r in rows], fontsize=7)
    left.set_xticks(range(heads))
    left.tick_params(axis="x", labelsize=7)
    left.set_xlabel("query head")
    left.set_ylabel("layer (plan)")
    for chosen, colour in (("sparse", "tab:green"), ("dense", "tab:red")):
        picked = [(max(r["kl"], 1e-9), i) for i, r in enumerate(rows) if r["chosen"] == chosen]
        if picked:
            right.plot(*zip(*picked), "o", color=colour, label=chosen)
    right.set_xscale("log")
    right.set_ylim(len(rows) - 0.5, -0.5)
    right.set_yticks(range(len(rows)), [str(r["layer"]) for r in rows], fontsize=7)
    right.grid(True, axis="x", alpha=0.3)
    right.set_title("KL vs dense, layer alone sparse", fontsize=9)
    right.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return f"wrote {path}"
