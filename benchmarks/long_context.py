#!/usr/bin/env python
"""Long-context benchmark: decode step time and KV memory at long contexts, dense against sparse attention, one run.

    python benchmarks/long_context.py                 # ref-60m at context 32768; steps at 1024, 4096, 16384, 32704
    python benchmarks/long_context.py --model tiny-random --context-length 512 --small-context 256 --window 64 \\
        --positions 64 128 256 448 --steps 4 --warmup 2 --repeats 1          # smoke run (seconds)

Systems (the same model, compiled with ``--context-length`` and run with ``--threads`` intra-op threads each):
    dense                 ao.compile(model, context_length=C)                       full-length caches, GQA
    window W (ring)       ao.compile(..., sparse_attention="window=W")              ring caches of W + spare slots
    sinks S + window W    ao.compile(..., sparse_attention="window=W,sinks=S")      ring caches of S + W + spare slots
(spare: RING_SPARE_SLOTS in passes/insert_sparse_attention.py, 64)
(The ring variants, and dense for contrast, are also compiled at ``--small-context``, only to compare KV bytes.)

Method. Prefilling 32k tokens on a small CPU would take far too long, so the decode step is measured at a given
context position without prefilling: the caches are filled with random (seeded) rows as if ``p - warmup`` tokens
had been processed (``session.write_cache``; a ring cache is filled whole, and which position each ring slot holds
follows from the row's position alone), then ``--warmup`` untimed and ``--steps`` timed single-token decode steps run
at positions ``p - warmup, ..., p + steps - 1`` (random token ids, the same for every system). This measures the
work per step at that context with random cache contents; it says nothing about model quality. Every round runs
every (context, system) block once, contexts and systems in a rotated order (load from other jobs comes and goes);
the table reports the median over all timed steps of all rounds, the range of the per-round medians, and the fastest
step (the one least disturbed by other jobs).

KV memory: the bytes of the cache tensors the manifest lists (``engine.manifest["engine"]["caches"]``), checked
against the buffers the session actually holds (``session.read_cache``), and the bytes that hold tokens at a
context (for ring layers from ``ring_slot_positions``: the slots that hold a position).

Targets (GitHub issue "Sparse attention pass", item 6): with a W-token window, the step at the longest context
takes <= 1.3x the step at the first (1k) context; KV memory of windowed layers constant past S + W + spare slots
(the ring's size). Each is printed
PASS/FAIL with the measured numbers.

Not a test: run it by hand. Progress goes to stderr, the markdown report to stdout (and ``--json PATH``).
"""

from __future__ import annotations

import gc
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import benchmark_parser, environment, footer, log, publish  # noqa: E402  (shared helpers)

from agentopt_compiler.passes.insert_sparse_attention import RING_SPARE_SLOTS  # noqa: E402
from agentopt_compiler.backends.ring_caches import cache_layers  # noqa: E402
from agentopt_compiler.runtime.manifest import describe_attention_layers  # noqa: E402

DENSE, WINDOW, SINKS_WINDOW = "dense", "window", "sinks-window"
SYSTEMS = (DENSE, WINDOW, SINKS_WINDOW)
STEP_RATIO_TARGET = 1.3


# -- results ----------------------------------------------------------------------------------------------------------
@dataclass
class StepTimes:
    system: str
    context: int  # tokens in the cache before the first timed step
    step_ms: float  # median over every timed step of every round
    fastest_ms: float  # the fastest timed step (the least disturbed by other jobs)
    round_medians_ms: list[float]
    steps_ms: list[list[float]] = field(repr=False)  # per round, every timed step
    kv_bytes_allocated: int = 0
    kv_bytes_holding_tokens: int = 0


@dataclass
class EngineInfo:
    system: str
    label: str
    sparse_attention: str | None
    context_length: int
    compile_seconds: float
    engine_bytes: int
    kv_bytes: int  # sum over the manifest's cache tensors
    kv_bytes_session: int | None  # the buffers the loaded session holds (None: not loaded)
    cache_tensors: int
    cache_slots: list[int]  # per cache tensor, its length (dim 2)
    attention_layers: list[dict]
    folder: str


@dataclass
class Bench:
    settings: dict
    environment: dict
    engines: list[EngineInfo] = field(default_factory=list)
    measurements: list[StepTimes] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# -- shared helpers ---------------------------------------------------------------------------------------------------
def kv_bytes(manifest: dict) -> int:
    """Bytes of every KV cache tensor the manifest lists (fp32 engines: 4 bytes an element)."""
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[manifest["engine"].get("dtype", "float32")]
    return sum(math.prod(c["shape"]) * itemsize for c in manifest["engine"]["caches"])


def kv_bytes_holding_tokens(manifest: dict, tokens: int) -> int:
    """Bytes of the cache rows that hold a token after ``tokens`` tokens: min(tokens, T) rows of a full cache; for a
    ring cache, the slots that hold a position (``ring_slot_positions``)."""
    import torch

    from agentopt_compiler.capture.custom_ops import ring_slot_positions

    itemsize = kv_bytes(manifest) // sum(math.prod(c["shape"]) for c in manifest["engine"]["caches"])
    total = 0
    for cache, layer in cache_layers(manifest["engine"]):
        b, h, slots, d = cache["shape"]
        if layer.get("ring"):
            held = ring_slot_positions(torch.tensor([tokens] * b), int(layer["sinks"]), slots - int(layer["sinks"]))
            rows = int((held >= 0).sum()) // b
        else:
            rows = min(tokens, slots)
        total += b * h * rows * d * itemsize
    return total


def compile_engine(model: str, out: Path, context: int, sparse: str | None) -> tuple[float, dict]:
    """Compile (overwrite) and return (seconds, manifest); the engine compile() loads is dropped at once."""
    import agentopt_compiler as ao

    started = time.perf_counter()
    engine = ao.compile(model, out=out, context_length=context, sparse_attention=sparse, overwrite=True,
                        progress=lambda msg: log(f"  compile: {msg}"))
    seconds = time.perf_counter() - started
    manifest = engine.manifest
    del engine
    gc.collect()
    return seconds, manifest


def engine_info(system: str, label: str, sparse: str | None, folder: Path, seconds: float, manifest: dict,
                session=None) -> EngineInfo:
    caches = manifest["engine"]["caches"]
    session_bytes = None
    if session is not None:  # what the session really allocated (read_cache copies every row of every buffer)
        rows = session.read_cache(max(c["shape"][2] for c in caches))
        session_bytes = sum(a.nbytes for a in rows.values())
        del rows
    return EngineInfo(system, label, sparse, int(manifest["engine"]["context_length"]), seconds,
                      sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), kv_bytes(manifest),
                      session_bytes, len(caches), [int(c["shape"][2]) for c in caches],
                      list(manifest["engine"].get("attention", {}).get("layers", [])), str(folder))


def fill_caches(session, caches: list[dict], tokens: int, seed: int) -> None:
    """Clear the caches, then put random rows where ``tokens`` processed tokens would be: rows [0, min(tokens, T))
    of every cache (a ring cache of T slots is full once tokens >= T; its slot positions follow from the position
    of the next step alone, so only the rows' count and not their contents shapes the work)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    session.reset()
    rows = {}
    for cache in caches:
        b, h, slots, d = cache["shape"]
        n = min(tokens, slots)
        if n:
            rows[cache["input"]] = rng.standard_normal((b, h, n, d), dtype=np.float32)
    session.write_cache(rows)


def time_steps(session, tokens: list[int], first_position: int, warmup: int) -> list[float]:
    """Run one single-token decode step per token at positions first_position, first_position + 1, ...; returns the
    milliseconds of each step after the first ``warmup`` ones."""
    import numpy as np

    index = np.zeros(1, dtype=np.int64)
    times = []
    for i, token in enumerate(tokens):
        ids = np.array([[token]], dtype=np.int64)
        positions = np.array([[first_position + i]], dtype=np.int64)
        start = time.perf_counter()
        session.run(ids, positions, index)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return times


# -- systems ----------------------------------------------------------------------------------------------------------
# Each system function returns (label, sparse spec); they differ only in the sparse-attention plan they compile with.

def dense_system(args) -> tuple[str, str | None]:
    return "dense", None


def window_system(args) -> tuple[str, str | None]:
    return f"window {args.window} (ring)", f"window={args.window}"


def sinks_window_system(args) -> tuple[str, str | None]:
    return f"sinks {args.sinks} + window {args.window} (ring)", f"window={args.window},sinks={args.sinks}"


SYSTEM_FUNCTIONS: dict[str, Callable] = {DENSE: dense_system, WINDOW: window_system,
                                         SINKS_WINDOW: sinks_window_system}


# -- the run ----------------------------------------------------------------------------------------------------------
def run(args) -> Bench:
    from agentopt_compiler.runtime.engine import load_engine

    work = Path(args.work_dir) / "long-context" / Path(str(args.model)).name
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(settings={"model": str(args.model), "context_length": args.context_length,
                            "small_context": args.small_context, "positions": args.positions, "window": args.window,
                            "sinks": args.sinks, "steps": args.steps, "warmup": args.warmup,
                            "repeats": args.repeats, "threads": args.threads, "seed": args.seed,
                            "systems": args.systems, "step_ratio_target": STEP_RATIO_TARGET, "work_dir": str(work),
                            "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(),
                                                                         *sys.argv[1:]])},
                  environment=environment(args.threads))
    bench.environment["load_average_before"] = list(os.getloadavg())  # other jobs on a shared machine

    def unavailable(system: str, exc: Exception) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        bench.unavailable[system] = f"{type(exc).__name__}: {first}"
        log(f"{system}: UNAVAILABLE: {bench.unavailable[system]}")
        if args.verbose:
            traceback.print_exception(exc)

    # 1. compile: every system at the long context (these are timed), and at the small context (KV bytes only)
    engines, labels = {}, {}
    for system in args.systems:
        label, sparse = SYSTEM_FUNCTIONS[system](args)
        labels[system] = label
        try:
            for context in (args.small_context, args.context_length):
                folder = work / f"{system}-{context}"
                log(f"{label}: compiling {args.model} (context {context}, sparse_attention={sparse!r}) -> {folder}")
                seconds, manifest = compile_engine(str(args.model), folder, context, sparse)
                if context == args.context_length:
                    engine = load_engine(folder, threads=args.threads)
                    engines[system] = engine
                    bench.engines.append(engine_info(system, label, sparse, folder, seconds, manifest,
                                                     engine.session))
                else:
                    bench.engines.append(engine_info(system, label, sparse, folder, seconds, manifest))
                log(f"{label}: context {context}: KV {kv_bytes(manifest)} bytes in "
                    f"{len(manifest['engine']['caches'])} cache tensors, compiled in {seconds:.1f} s")
        except Exception as exc:
            unavailable(label, exc)
            engines.pop(system, None)

    # 2. step times: rounds x contexts x systems (rotated), each block refilling the caches first
    vocab = int(next(iter(engines.values())).manifest["model"]["config"]["vocab_size"]) if engines else 0
    runs: dict[tuple[str, int], list[list[float]]] = {(s, p): [] for s in engines for p in args.positions}
    import numpy as np

    tokens = {p: [int(t) for t in np.random.default_rng(args.seed + p).integers(0, vocab, args.warmup + args.steps)]
              for p in args.positions}
    for r in range(args.repeats):
        contexts = args.positions[r % len(args.positions):] + args.positions[:r % len(args.positions)]
        for i, p in enumerate(contexts):
            order = list(engines)
            shift = (r + i) % len(order) if order else 0
            for system in order[shift:] + order[:shift]:
                engine = engines[system]
                start = p - args.warmup
                try:
                    fill_caches(engine.session, engine.manifest["engine"]["caches"], start, args.seed + p)
                    times = time_steps(engine.session, tokens[p], start, args.warmup)
                except Exception as exc:
                    unavailable(labels[system], exc)
                    del engines[system]
                    continue
                runs[(system, p)].append(times)
                log(f"  round {r + 1}/{args.repeats} context {p}: {labels[system]}: median step "
                    f"{statistics.median(times):.2f} ms ({min(times):.2f}–{max(times):.2f})")

    # 3. results
    manifests = {s: e.manifest for s, e in engines.items()}
    for (system, p), rounds in runs.items():
        if system not in engines or not rounds:
            continue
        pooled = [t for times in rounds for t in times]
        bench.measurements.append(StepTimes(system, p, statistics.median(pooled), min(pooled),
                                            [statistics.median(times) for times in rounds], rounds,
                                            kv_bytes(manifests[system]),
                                            kv_bytes_holding_tokens(manifests[system], p)))
    engines.clear()
    gc.collect()
    bench.environment["load_average_after"] = list(os.getloadavg())
    bench.targets = check_targets(bench, labels)
    return bench


def check_targets(bench: Bench, labels: dict[str, str]) -> list[dict]:
    s = bench.settings
    first, last = s["positions"][0], s["positions"][-1]
    by_key = {(m.system, m.context): m for m in bench.measurements}
    infos = {(e.system, e.context_length): e for e in bench.engines}
    targets = []
    for system in (WINDOW, SINKS_WINDOW):
        a, b = by_key.get((system, first)), by_key.get((system, last))
        if a is None or b is None:
            continue
        ratio = b.step_ms / a.step_ms
        targets.append({"target": f"{labels[system]}: decode step at context {last} <= {STEP_RATIO_TARGET}× its step "
                                  f"at context {first}",
                        "met": ratio <= STEP_RATIO_TARGET,
                        "measured": f"{ratio:.2f}× (median steps {b.step_ms:.2f} ms / {a.step_ms:.2f} ms); fastest "
                                    f"steps {b.fastest_ms / a.fastest_ms:.2f}× ({b.fastest_ms:.2f} / "
                                    f"{a.fastest_ms:.2f} ms)"})
    a, b = by_key.get((DENSE, first)), by_key.get((DENSE, last))
    if a is not None and b is not None:  # a check of the method: if dense did not grow, the steps measure nothing
        ratio = b.step_ms / a.step_ms
        targets.append({"target": f"(method check, not a target) dense: decode step grows with the context, "
                                  f"> {STEP_RATIO_TARGET}× from {first} to {last} (roughly linear would be "
                                  f"up to {(last + 1) / (first + 1):.1f}×)",
                        "met": ratio > STEP_RATIO_TARGET,
                        "measured": f"{ratio:.2f}× (median steps {b.step_ms:.2f} ms / {a.step_ms:.2f} ms); fastest "
                                    f"steps {b.fastest_ms / a.fastest_ms:.2f}× ({b.fastest_ms:.2f} / "
                                    f"{a.fastest_ms:.2f} ms)"})
    for system in (WINDOW, SINKS_WINDOW):
        small, large = infos.get((system, s["small_context"])), infos.get((system, s["context_length"]))
        if small is None or large is None:
            continue
        slots = s["window"] + (s["sinks"] if system == SINKS_WINDOW else 0) + RING_SPARE_SLOTS
        rings = [layer for layer in large.attention_layers if layer.get("ring")]
        every_ring = len(rings) == len(large.attention_layers) and len(large.attention_layers) > 0
        slots_ok = all(n == slots for n in small.cache_slots + large.cache_slots)
        session_ok = large.kv_bytes_session == large.kv_bytes
        held = [m.kv_bytes_holding_tokens for m in bench.measurements if m.system == system and m.context >= slots]
        held_ok = len(set(held)) <= 1 and (not held or held[0] == large.kv_bytes)
        met = small.kv_bytes == large.kv_bytes and every_ring and slots_ok and session_ok and held_ok
        targets.append({"target": f"{labels[system]}: KV memory constant past S + W + spare = {slots} tokens (every "
                                  f"layer a ring of {slots} slots; the same bytes compiled for context "
                                  f"{s['small_context']} and {s['context_length']}, allocated and holding tokens)",
                        "met": met,
                        "measured": f"{small.kv_bytes:,} B at context {s['small_context']}, {large.kv_bytes:,} B at "
                                    f"{s['context_length']} (session buffers {large.kv_bytes_session:,} B); ring "
                                    f"layers {len(rings)}/{len(large.attention_layers)}; cache slots "
                                    f"{sorted(set(large.cache_slots))}; bytes holding tokens at contexts >= {slots}: "
                                    f"{', '.join(f'{h:,}' for h in held) or '–'}"})
    return targets


# -- report -----------------------------------------------------------------------------------------------------------
def _mib(size: int | None) -> str:
    return "–" if size is None else f"{size / 2**20:.2f} MiB"


def write_report(bench: Bench) -> str:
    s, env = bench.settings, bench.environment
    labels = {e.system: e.label for e in bench.engines}
    lines = [f"## Long-context benchmark: {s['model']}", ""]
    lines += [f"- date: {env['date']}",
              f"- machine: {env['nproc']} CPUs usable (`nproc`), {env['cpu']}; {env['platform']}",
              f"- load average (1, 5, 15 min; other jobs and, at the end, this run itself) at the start: "
              f"{', '.join(f'{x:.2f}' for x in env['load_average_before'])}; at the end: "
              f"{', '.join(f'{x:.2f}' for x in env['load_average_after'])}",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()
                                         if k not in ("onnxruntime-genai", "transformers")),
              f"- code: commit {env['git'].get('commit', '?')}, with "
              f"{env['git'].get('uncommitted_package_files', '?')} uncommitted file(s) under agentopt_compiler/",
              f"- command: `python {s['command']}`",
              f"- settings: {s['threads']} threads for every system, engines compiled for context "
              f"{s['context_length']} (fp32), window {s['window']}, sinks {s['sinks']}; per context "
              f"{s['warmup']} warm-up + {s['steps']} timed single-token steps, {s['repeats']} interleaved rounds, "
              f"seed {s['seed']}", ""]
    lines += [f"Method: no prefill. For each context p, every cache is filled with random (seeded) rows as if "
              f"p − {s['warmup']} tokens had been processed (`session.write_cache`), then {s['warmup']} untimed and "
              f"{s['steps']} timed single-token decode steps run at positions p − {s['warmup']}, …, "
              f"p + {s['steps'] - 1}. This measures the work per decode step at that context, with random cache "
              f"contents; it says nothing about model quality. Step time: median over all timed steps of all "
              f"rounds, (lowest–highest per-round median) in brackets; fastest step: the fastest single timed "
              f"step (the one least disturbed by other jobs). \"vs {s['positions'][0]}\": this step time / the same "
              f"system's at context {s['positions'][0]}. KV allocated: bytes of the cache tensors in the "
              f"manifest; KV holding tokens: the rows of those that hold one of the p tokens.", ""]
    header = ["system", "context p", "step (ms)", f"vs {s['positions'][0]}", "fastest step (ms)",
              f"fastest vs {s['positions'][0]}", "KV allocated", "KV holding tokens"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(m.system, m.context): m for m in bench.measurements}
    for system in s["systems"]:
        base = by_key.get((system, s["positions"][0]))
        for p in s["positions"]:
            m = by_key.get((system, p))
            if m is None:
                continue
            spread = (f" ({min(m.round_medians_ms):.2f}–{max(m.round_medians_ms):.2f})"
                      if len(m.round_medians_ms) > 1 else "")
            ratio = f"{m.step_ms / base.step_ms:.2f}×" if base else "–"
            fastest = f"{m.fastest_ms / base.fastest_ms:.2f}×" if base else "–"
            lines.append(f"| {labels.get(system, system)} | {p} | {m.step_ms:.2f}{spread} | {ratio} | "
                         f"{m.fastest_ms:.2f} | {fastest} | {_mib(m.kv_bytes_allocated)} | "
                         f"{_mib(m.kv_bytes_holding_tokens)} |")
    lines.append("")

    lines += ["KV cache memory by compiled context (sum over the manifest's cache tensors; session: the buffers the "
              "loaded engine holds, read back with `read_cache`):", ""]
    header = ["system", "compiled context", "cache tensors", "slots per tensor", "KV bytes", "KV", "session buffers",
              "compile (s)", "engine folder"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in bench.engines:
        slots = ", ".join(str(n) for n in sorted(set(e.cache_slots)))
        lines.append(f"| {e.label} | {e.context_length} | {e.cache_tensors} | {slots} | {e.kv_bytes:,} | "
                     f"{_mib(e.kv_bytes)} | {_mib(e.kv_bytes_session) if e.kv_bytes_session is not None else '–'} | "
                     f"{e.compile_seconds:.1f} | {_mib(e.engine_bytes)} |")
    lines.append("")

    lines += ["Attention layers per engine (`manifest[\"engine\"][\"attention\"][\"layers\"]`, context "
              f"{s['context_length']}):", ""]
    lines += ["| system | sparse_attention | layers (op, window, sinks, cache) |", "|---|---|---|"]
    for e in bench.engines:
        if e.context_length == s["context_length"]:
            lines.append(f"| {e.label} | {f'`{e.sparse_attention}`' if e.sparse_attention else '(none)'} | "
                         f"{describe_attention_layers(e.attention_layers)} |")
    lines.append("")

    lines += ["Targets (GitHub issue \"Sparse attention pass\", item 6), judged on the median step times; the fastest "
              "steps' ratio is shown alongside as a check that is less sensitive to other jobs' load.", ""]
    lines += ["| target | result | measured |", "|---|---|---|"]
    for t in bench.targets:
        lines.append(f"| {t['target']} | {'PASS' if t['met'] else 'FAIL'} | {t['measured']} |")
    lines.append("")
    lines += footer(bench)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=6, repeats_help="interleaved rounds (6)")
    parser.add_argument("--context-length", type=int, default=32768,
                        help="context every timed engine is compiled for (its RoPE table and dense KV capacity)")
    parser.add_argument("--small-context", type=int, default=4096,
                        help="the engines are also compiled for this context, to compare KV bytes (4096)")
    parser.add_argument("--positions", type=int, nargs="+", default=None, metavar="P",
                        help="contexts to time the decode step at (default: 1024 4096 16384 and context - 64); "
                             "the first is the base of the ratios")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context and round (32)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed decode steps before them (4)")
    parser.add_argument("--seed", type=int, default=0, help="cache contents and token ids (0)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    args = parser.parse_args(argv)
    if args.positions is None:
        args.positions = [1024, 4096, 16384, args.context_length - 64]
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.threads < 1 or args.window < 1 or args.sinks < 0:
        parser.error("need --steps >= 1, --warmup >= 0, --repeats >= 1, --threads >= 1, --window >= 1, --sinks >= 0")
    bad = [p for p in args.positions if p - args.warmup < 0 or p + args.steps > args.context_length]
    if bad:
        parser.error(f"positions {bad} do not fit: each needs p >= --warmup and p + --steps <= --context-length")
    if args.sinks + args.window + RING_SPARE_SLOTS >= args.small_context:
        parser.error("--small-context must exceed sinks + window + spare slots (else the ring variants keep full "
                     "caches)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    bench = run(args)
    publish(bench, write_report(bench), args.json)
    for t in bench.targets:
        log(f"{'PASS' if t['met'] else 'FAIL'}: {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
