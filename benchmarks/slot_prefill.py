#!/usr/bin/env python
"""How a prefill of one KV slot can share a scheduler step with the batched decode of the others, measured per call.

    python benchmarks/slot_prefill.py                     # ref-60m, 2 threads (a few minutes)
    python benchmarks/slot_prefill.py --model tiny-random --repeats 5

ONNX Runtime's GroupQueryAttention takes several new tokens per row after cached ones only at batch size 1, so a
step on a GQA engine is two calls: the prefill chunk on its row alone, then one decode call over the decoding rows.
The standard lowering (Attention over the whole cache, masked) takes any shape, so it could run both in one call:
every row gets the chunk's width, the decoding rows padded. This script times, on engines with 1 row per slot and
``--context`` positions (the decoding rows at position ``--position``):

    decode R rows            one token per row, R = 1, 2, 4, 7, 8 (what one step of R sessions costs)
    prefill C tokens         one row alone, C = 16 ... 256
    mixed, one call          standard lowering only: R rows x C tokens (the decode rows padded to C)

and reports a step of R - 1 decoding sessions plus one prefill chunk both ways. Medians of ``--repeats`` timings
of ``--calls`` calls each. Not a test: run it by hand; the markdown report goes to stdout.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import benchmark_parser, environment, log, run_facts  # noqa: E402


def timed(call, calls: int, repeats: int) -> float:
    """Median milliseconds per call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1000)
    return statistics.median(times)


def measure(engine, impl: str, rows: list[int], chunks: list[int], position: int, calls: int, repeats: int) -> dict:
    session = engine.session
    rng = np.random.default_rng(0)
    vocab = engine.manifest["model"]["config"]["vocab_size"]
    out = {"decode": {}, "prefill": {}, "mixed": {}}
    for r in rows:
        ids, positions = rng.integers(0, vocab, (r, 1)), np.full((r, 1), position)
        out["decode"][r] = timed(lambda: session.run(ids, positions, None, range(0, r)), calls, repeats)
    for c in chunks:
        ids, positions = rng.integers(0, vocab, (1, c)), np.arange(position, position + c)[None]
        out["prefill"][c] = timed(lambda: session.run(ids, positions, None, range(0, 1)), max(1, calls // 4),
                                  repeats)
    if impl == "standard":
        for r in rows:
            for c in chunks:
                ids = rng.integers(0, vocab, (r, c))
                positions = np.broadcast_to(np.arange(position, position + c), (r, c)).copy()
                out["mixed"][(r, c)] = timed(lambda: session.run(ids, positions, None, range(0, r)),
                                             max(1, calls // 4), repeats)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=5)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--position", type=int, default=1024, help="cached tokens of every row")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    import agentopt_compiler as ao

    rows, chunks = [1, 2, 4, 7, 8], [16, 32, 64, 128, 256]
    env = environment(args.threads)
    lines = ["## Prefill beside batched decode, per call", "", f"- date: {env['date']}",
             *run_facts(env, "benchmarks/slot_prefill.py " + " ".join(argv or sys.argv[1:])),
             f"- {args.model}, context {args.context}, decoding rows at position {args.position}, "
             f"--threads {args.threads}; medians of {args.repeats} x {args.calls} calls", ""]
    results = {}
    for impl in ("gqa", "standard"):
        folder = Path(args.work_dir) / f"slot-prefill-{args.model}-{impl}"
        log(f"compiling {args.model} ({impl})")
        ao.compile(args.model, out=folder, context_length=args.context, attention_impl=impl, overwrite=True)
        engine = ao.load_engine(folder, slots=max(rows), threads=args.threads)
        log(f"timing {impl}")
        results[impl] = measure(engine, impl, rows, chunks, args.position, args.calls, args.repeats)
        del engine
    lines += ["| lowering | decode step, R rows (ms): " + " / ".join(map(str, rows)) + " | prefill on one row (ms): " +
              " / ".join(f"{c}" for c in chunks) + " tokens |", "|---|---|---|"]
    for impl, r in results.items():
        lines.append(f"| {impl} | " + " / ".join(f"{r['decode'][n]:.2f}" for n in rows) + " | " +
                     " / ".join(f"{r['prefill'][c]:.1f}" for c in chunks) + " |")
    lines += ["", "A step of 7 decoding sessions and one prefill chunk of C tokens (ms):", "",
              "| C | GQA: chunk alone + decode 7 rows | standard: chunk alone + decode 7 rows | "
              "standard: one mixed call, 8 rows x C |", "|---|---|---|---|"]
    gqa, standard = results["gqa"], results["standard"]
    seven = {impl: r["decode"][7] for impl, r in results.items()}
    for c in chunks:
        lines.append(f"| {c} | {gqa['prefill'][c] + seven['gqa']:.1f} | {standard['prefill'][c] + seven['standard']:.1f}"
                     f" | {standard['mixed'][(8, c)]:.1f} |")
    lines.append("")
    sys.stdout.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
