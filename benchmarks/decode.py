#!/usr/bin/env python
"""Decode benchmark: our engine against its eager reference and two peers, in one run, same machine, same threads.

    python benchmarks/decode.py                                   # ref-60m, prompts 128 and 2048, 128 new tokens
    python benchmarks/decode.py --model tiny-random --prompt-lengths 16 --new-tokens 8 --repeats 1   # smoke run

Systems (each measured with ``--threads`` intra-op threads):
    ours (default passes)   ao.compile(model) with the default pass pipeline, run with load_engine(threads=N)
    ours (no passes)        the same with every pass of default_pipeline() skipped
    eager PyTorch           our LlamaDecoder with its fixed-capacity cache, greedy, torch.set_num_threads(N)
    transformers            AutoModelForCausalLM.generate (sdpa, fp32, greedy) from the saved HF folder
    onnxruntime-genai       fp32 model from its model builder, built from the same HF folder

Per prompt length: one warm-up per system, then ``--repeats`` rounds that run every system once, interleaved (load
from other jobs on a shared machine comes and goes; interleaving spreads it over all systems). Reported: the median
time to first token (prompt in, first greedy token chosen) and decode tokens/s ((new tokens - 1) / time from the
first to the last token), with the range of the runs. Engines and peers are timed on token ids (no detokenizing). Every
system decodes exactly ``--new-tokens`` tokens (end-of-sequence ignored), and its tokens are compared with the eager
reference's. Peers are imported lazily: a missing or failing peer is reported as unavailable, with the reason.

Not a test: run it by hand. Progress goes to stderr, the markdown report to stdout (and ``--json PATH``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Iterator

OURS_DEFAULT = "ours (default passes)"
OURS_NO_PASSES = "ours (no passes)"
EAGER = "eager PyTorch (our reference)"
TRANSFORMERS = "transformers generate (sdpa)"
ORT_GENAI = "onnxruntime-genai"
SYSTEMS = {"ours-default": OURS_DEFAULT, "ours-no-passes": OURS_NO_PASSES, "eager": EAGER,
           "transformers": TRANSFORMERS, "ort-genai": ORT_GENAI}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- results ----------------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    system: str
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float  # median
    decode_tokens_per_s: float  # median
    runs_ttft_ms: list[float]
    runs_decode_tokens_per_s: list[float]
    tokens: list[int] = field(repr=False)
    same_as_eager: bool | None = None
    first_difference: int | None = None  # index of the first new token that differs from the eager reference


@dataclass
class Bench:
    """Everything one run measured; the report is written from this alone."""

    settings: dict
    environment: dict
    measurements: list[Measurement] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)  # system -> reason
    builds: dict[str, dict] = field(default_factory=dict)  # system -> compile/build seconds, size, notes
    notes: list[str] = field(default_factory=list)
    roofline: dict = field(default_factory=dict)  # weight bytes per decode step, weight-streaming probe times


# -- shared timing helper ---------------------------------------------------------------------------------------------
def timestamps_of(tokens: Iterable[int]) -> tuple[float, list[int], list[float]]:
    """Drive a token iterator to its end; returns (start time, tokens, time each token was available).

    The clock starts before the iterator's first step, so whatever a system does per request (cache reset, generator
    creation, prefill) counts toward its time to first token.
    """
    start = time.perf_counter()
    ids, times = [], []
    for token in tokens:
        times.append(time.perf_counter())
        ids.append(int(token))
    return start, ids, times


def ttft_and_rate(start: float, times: list[float]) -> tuple[float, float]:
    """Time to first token (ms) and decode tokens/s over the tokens after the first."""
    if not times:
        return float("nan"), float("nan")
    ttft_ms = (times[0] - start) * 1e3
    span = times[-1] - times[0]
    rate = (len(times) - 1) / span if len(times) > 1 and span > 0 else float("nan")
    return ttft_ms, rate


RunOnce = Callable[[list[int], int], tuple[float, list[int], list[float]]]


SETTLE_S = 0.1  # pause before each timed run (see measure)


def measure(systems: dict[str, RunOnce], prompt: list[int], new_tokens: int, repeats: int,
            failed: Callable[[str, Exception], None]) -> list[Measurement]:
    """Time every system on one prompt: a warm-up each, then ``repeats`` rounds in which every system runs once.

    Rounds interleave the systems, so that load from other jobs on a shared machine, which comes and goes, falls on
    all systems alike instead of on whichever one happened to run at the time. Each round's order is a seeded
    shuffle, not a rotation: a rotation keeps every system's predecessor the same in every round, and what runs just
    before a system can change its speed (against onnxruntime-genai, ours measured ~10% lower when the two alternated
    than when each ran back to back; cause not found), so a fixed predecessor could bias a comparison systematically.
    Before each timed run the machine settles for ``SETTLE_S``: a run that starts the moment its predecessor returned
    is slowed by what that process leaves running (likely ORT's worker threads, which spin a while for more work;
    not verified). Measured with our int4 engine and onnxruntime-genai's strictly alternating, 12 runs each: time to
    first token 79 and 104 ms with no pause, 39-44 and 58-64 ms with 0.05-0.3 s (ours alone: 36-43 ms);
    ours/theirs decode 0.80x with no pause, 0.90-0.92x with one.
    A system that raises is dropped (``failed`` is told) and the others go on.
    """
    live = dict(systems)
    for name, run_once in list(live.items()):
        try:
            run_once(prompt, new_tokens)  # warm-up: first-call allocations, lazy initialisation
        except Exception as exc:
            failed(name, exc)
            del live[name]
    runs: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in live}
    for r in range(repeats):
        names = random.Random(r).sample(list(live), len(live))
        for name in names:
            time.sleep(SETTLE_S)
            try:
                start, ids, times = live[name](prompt, new_tokens)
            except Exception as exc:
                failed(name, exc)
                del live[name], runs[name]
                continue
            ttft, rate = ttft_and_rate(start, times)
            runs[name].append((ttft, rate, ids))
            log(f"  round {r + 1}/{repeats} prompt {len(prompt)}: {name}: ttft {ttft:.1f} ms, {rate:.1f} tok/s")
    out = []
    for name, results in runs.items():
        ttfts, rates, tokens = [t for t, _, _ in results], [d for _, d, _ in results], results[0][2]
        if any(ids != tokens for _, _, ids in results):
            log(f"  {name}: repeated runs produced different tokens (the first run's are compared)")
        out.append(Measurement(name, len(prompt), new_tokens, statistics.median(ttfts), statistics.median(rates),
                               ttfts, rates, tokens))
    return out


# -- one process per system -------------------------------------------------------------------------------------------
def _serve(conn, factory: Callable[..., RunOnce], args: tuple) -> None:
    """Worker process: build one system, then answer run_once requests until told to stop (None)."""
    try:
        run_once = factory(*args)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while (request := conn.recv()) is not None:
        try:
            conn.send(("ok", run_once(*request)))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class Isolated:
    """A system run in its own process (``factory(*args)`` there), called like its run_once.

    Why: each system is timed as it is deployed, alone in its process, instead of beside the others' sessions,
    thread pools and allocators (five ORT sessions of ours in the precision benchmark, next to torch and
    onnxruntime-genai). A worker waits on its pipe, using no CPU, while the others run; the clock is read inside
    the worker, so the pipe's latency is not timed."""

    def __init__(self, factory: Callable[..., RunOnce], *args):
        import multiprocessing

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited from this one
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
        self._process.start()
        status, detail = self._receive()
        if status != "ready":
            self.close()
            raise RuntimeError(detail)

    def _receive(self):
        try:
            return self._conn.recv()
        except EOFError:
            return "error", f"the worker process died (exit code {self._process.exitcode})"

    def __call__(self, prompt: list[int], n: int):
        self._conn.send((prompt, n))
        status, value = self._receive()
        if status != "ok":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()


def system(isolate: bool, factory: Callable[..., RunOnce], *args) -> RunOnce:
    """``factory(*args)`` here, or in its own process when ``isolate``."""
    return Isolated(factory, *args) if isolate else factory(*args)


def close_systems(systems: dict) -> None:
    for run_once in systems.values():
        if isinstance(run_once, Isolated):
            run_once.close()
    systems.clear()


# -- systems ----------------------------------------------------------------------------------------------------------
# Each system function loads its model and returns run_once(prompt, n) -> timestamps_of(...) of n new tokens.

def compile_ours(model: str, out: Path, context: int, skip_passes: list[str]) -> dict:
    import agentopt_compiler as ao

    started = time.perf_counter()
    engine = ao.compile(model, out=out, context_length=context, skip_passes=skip_passes, overwrite=True,
                        progress=lambda msg: log(f"  compile: {msg}"))
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report = engine.compile_report
    del engine
    return {"compile_seconds": seconds, "compile_report_seconds": report.total_seconds,
            "stage_seconds": report.stage_seconds, "engine_bytes": size, "context_length": context,
            "skipped_passes": skip_passes, "folder": str(out)}


def ours_system(engine_dir: Path, threads: int):
    import agentopt_compiler as ao
    from agentopt_compiler.runtime.engine import GenerationConfig

    engine = ao.load_engine(engine_dir, threads=threads)

    def run_once(prompt, n):
        # stream_ids: token ids only, like the peers below (engine.complete would also detokenize each token)
        return timestamps_of(engine.stream_ids(prompt, GenerationConfig(max_new_tokens=n, ignore_eos=True)))

    return run_once


def eager_system(model, context: int, threads: int):
    import torch

    torch.set_num_threads(threads)

    def tokens(prompt, n) -> Iterator[int]:
        with torch.inference_mode():
            model.setup_cache(1, context)
            length = len(prompt)
            logits = model(torch.tensor([prompt]), torch.arange(length), torch.tensor([length - 1]))
            for step in range(n):
                token = int(logits[0, -1].argmax())
                yield token
                if step + 1 < n:
                    logits = model(torch.tensor([[token]]), torch.tensor([length]))
                    length += 1

    return lambda prompt, n: timestamps_of(tokens(prompt, n))


def transformers_system(hf_dir: Path, threads: int):
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa",
                                                              dtype=torch.float32).eval()

    class Clock(BaseStreamer):
        """generate() calls put() with the prompt, then with each new token as soon as it is chosen."""

        def __init__(self):
            self.times, self.calls = [], 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:
                self.times.append(time.perf_counter())

        def end(self):
            pass

    def run_once(prompt, n):
        clock = Clock()
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                 eos_token_id=None, pad_token_id=0, streamer=clock)  # eos None: never stop early
        return start, out[0, len(prompt):].tolist(), clock.times

    return run_once


def build_ort_genai(hf_dir: Path, out: Path, cache: Path, precision: str = "fp32",
                    extra_options: dict | None = None) -> dict:
    """Run onnxruntime-genai's model builder (cpu; fp32, or int4 for the precision benchmark, with its
    ``--extra_options`` such as ``block_size``) in a subprocess; its log goes next to the model."""
    import onnxruntime_genai  # noqa: F401  (fail here, with ImportError, when the package is missing)

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(cache)]
    if extra_options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    log_path = out.parent / f"{out.name}.build.log"
    started = time.perf_counter()
    with open(log_path, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:]
        hint = "" if (hf_dir / "tokenizer.json").is_file() else "; it needs a tokenizer.json in the model folder"
        raise RuntimeError(f"model builder failed (exit {result.returncode}): {' '.join(tail)}{hint} (log: {log_path})")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"build_seconds": seconds, "engine_bytes": size, "command": shlex.join(cmd[1:]), "folder": str(out)}


def ort_genai_system(model_dir: Path, threads: int, context: int, stop_sentinel: int):
    """onnxruntime-genai has no 'never stop' switch: an empty eos_token_id list falls back to pad_token_id. So both
    are set to ``stop_sentinel``, an id the eager reference never emits in this run, and the loop also checks
    is_done() so that an early stop shows up as fewer tokens (and a token mismatch) rather than silently.

    is_done() is checked *after* reading the token just chosen: it turns true as soon as the sequence reaches
    max_length (or the chosen token is the stop id), and that token is still a real new token. (Checking it first
    dropped the last token whenever prompt + new tokens == max_length.)"""
    import numpy as np
    import onnxruntime_genai as og

    config_path = model_dir / "genai_config.json"
    genai_config = json.loads(config_path.read_text())
    genai_config["model"]["eos_token_id"] = [stop_sentinel]
    genai_config["model"]["pad_token_id"] = stop_sentinel
    config_path.write_text(json.dumps(genai_config, indent=4))
    config = og.Config(str(model_dir))
    # its default thread setting used about one core here (see shared notes): give it the same count as everyone
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)

    def tokens(prompt, n) -> Iterator[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.array(prompt, dtype=np.int32))  # prefill
        for step in range(n):
            generator.generate_next_token()  # runs the previous token (if any), then picks the next one greedily
            yield int(generator.get_next_tokens()[0])
            if step + 1 < n and generator.is_done():
                return  # stopped early (the sentinel, or max_length): fewer tokens than asked for

    return lambda prompt, n: timestamps_of(tokens(prompt, n))


# -- the run ----------------------------------------------------------------------------------------------------------
def environment(threads: int) -> dict:
    from agentopt_compiler.analysis.cost_model import cpu_name

    cpu = cpu_name()
    versions = {"python": platform.python_version()}
    for name in ("agentopt-compiler", "torch", "onnxruntime", "onnxruntime-genai", "transformers", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    git = {}
    try:
        root = Path(__file__).resolve().parent.parent
        git["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                       text=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", "agentopt_compiler"], cwd=root,
                                 capture_output=True, text=True).stdout.splitlines()
        git["uncommitted_package_files"] = len(changed)
    except OSError:
        pass
    return {"date": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "git": git,
            "cpus_available": os.cpu_count(), "nproc": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "threads": threads, "versions": versions}


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table, of which a step gathers
    one row per token (a tied table is read whole, as the output projection)."""
    embedding = model.embed_tokens.weight
    tied = model.lm_head.weight is embedding
    return sum(p.numel() * p.element_size() for p in model.parameters()
               if tied or p is not embedding)


def weight_stream_probe(weight_bytes: int, threads: int, k: int = 512) -> Callable[[], float]:
    """A function timing one ONNX Runtime MatMul (1, k) x (k, n) over ``weight_bytes`` of fp32 weights with
    ``threads`` threads, in seconds (median of 15 after a warm-up): the same kernel streaming the same bytes as one
    decode step's projections, with none of the step's other work. Tokens/s at that time is the ceiling a
    weight-streaming decode step approaches (the memory bandwidth of this kind of machine drifts by tens of percent
    over minutes, so the benchmark probes several times)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = weight_bytes // 4 // k
    weights = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "weight_stream",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(weights, "w")])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                   .SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.ones((1, k), np.float32)

    def probe() -> float:
        session.run(None, {"x": x})
        times = []
        for _ in range(15):
            start = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return probe


def make_prompt(length: int, vocab_size: int, avoid: set[int], seed: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = [int(t) for t in rng.integers(0, vocab_size, size=length * 2) if int(t) not in avoid]
    return ids[:length]


def run(args) -> Bench:
    from agentopt_compiler.models.hf_loader import save_as_hf_folder
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.pipeline import default_pipeline

    selected = [SYSTEMS[s] for s in args.systems]
    work = Path(args.work_dir) / Path(str(args.model)).name
    work.mkdir(parents=True, exist_ok=True)
    longest = max(args.prompt_lengths) + args.new_tokens
    context = args.context_length or -(-longest // 256) * 256
    if context < longest:
        raise SystemExit(f"--context-length {context} does not fit the longest prompt plus new tokens ({longest})")
    pass_names = list(default_pipeline().names)
    bench = Bench(settings={"model": str(args.model), "prompt_lengths": args.prompt_lengths,
                            "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": args.threads,
                            "context_length": context, "pipeline_passes": pass_names, "work_dir": str(work),
                            "one_process_per_system": args.isolate,
                            "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(),
                                                                         *sys.argv[1:]])},
                  environment=environment(args.threads))

    log(f"loading {args.model} (eager reference) and writing it as a Hugging Face folder")
    loaded = load_model(args.model)
    weights = weight_bytes_per_step(loaded.model)
    probe = weight_stream_probe(weights, args.threads)
    bench.roofline = {"weight_bytes_per_step": weights, "probe_seconds": [probe()]}
    config = loaded.config
    hf_dir = save_as_hf_folder(loaded.model, work / "hf", loaded.tokenizer_dir)
    eos = set(config.eos_token_ids)
    prompts = {n: make_prompt(n, config.vocab_size, eos, seed=n) for n in args.prompt_lengths}
    systems: dict[str, RunOnce] = {}

    def unavailable(name: str, exc: Exception) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        bench.unavailable[name] = f"{type(exc).__name__}: {first}"
        log(f"{name}: UNAVAILABLE: {bench.unavailable[name]}")
        if args.verbose:
            traceback.print_exception(exc)

    def add(name: str, make: Callable[[], RunOnce]) -> None:
        """Build/load one system; a failure disables that system only."""
        if name not in selected:
            return
        log(f"{name}: loading")
        try:
            systems[name] = make()
        except Exception as exc:
            unavailable(name, exc)

    # 1. the eager reference: its greedy tokens are what every other system is checked against
    add(EAGER, lambda: eager_system(loaded.model, context, args.threads))
    if EAGER not in systems:
        raise SystemExit(f"the eager reference failed: {bench.unavailable.get(EAGER)}")
    reference = {n: systems[EAGER](prompt, args.new_tokens)[1] for n, prompt in prompts.items()}

    # 2. ours, compiled twice: with the default pipeline and with every pass skipped
    for name, skip, folder in ((OURS_DEFAULT, [], work / "engine-default"),
                               (OURS_NO_PASSES, pass_names, work / "engine-no-passes")):
        def make(name=name, skip=skip, folder=folder):
            log(f"{name}: compiling {args.model} (context {context}, skipping {skip or 'no pass'}) -> {folder}")
            bench.builds[name] = compile_ours(str(args.model), folder, context, skip)
            return system(args.isolate, ours_system, folder, args.threads)

        add(name, make)

    # 3. peers
    add(TRANSFORMERS, lambda: system(args.isolate, transformers_system, hf_dir, args.threads))
    sentinel = max(set(range(config.vocab_size)) - set().union(*reference.values()) - eos)

    def make_genai():
        log(f"{ORT_GENAI}: building the fp32 model with its model builder")
        bench.builds[ORT_GENAI] = build_ort_genai(hf_dir, work / "ort-genai-fp32", work / "ort-genai-cache")
        return system(args.isolate, ort_genai_system, work / "ort-genai-fp32", args.threads, context, sentinel)

    add(ORT_GENAI, make_genai)
    if ORT_GENAI in systems:
        bench.notes.append(f"onnxruntime-genai always stops on some token (an empty eos_token_id falls back to "
                           f"pad_token_id), so its genai_config.json sets both to id {sentinel}, which the eager "
                           f"reference never emits in this run; its KV buffer is max_length = {context}, the "
                           f"same capacity as our engine.")

    # 4. measure, prompt by prompt, the systems interleaved
    order = [s for s in (OURS_DEFAULT, OURS_NO_PASSES, EAGER, TRANSFORMERS, ORT_GENAI) if s in systems]
    for n, prompt in prompts.items():
        log(f"prompt {n}: {args.new_tokens} new tokens, a warm-up each, then {args.repeats} interleaved rounds")
        live = {name: systems[name] for name in order if name not in bench.unavailable}
        bench.measurements += measure(live, prompt, args.new_tokens, args.repeats, unavailable)
        bench.roofline["probe_seconds"].append(probe())
    del probe
    close_systems(systems)
    gc.collect()

    # 5. greedy-token check against the eager reference
    for m in bench.measurements:
        ref = reference[m.prompt_tokens]
        m.same_as_eager = m.tokens == ref
        if not m.same_as_eager:
            m.first_difference = next((i for i, (a, b) in enumerate(zip(m.tokens, ref)) if a != b),
                                      min(len(m.tokens), len(ref)))
    return bench


# -- report -----------------------------------------------------------------------------------------------------------
def _ratio(value: float, base: float | None, higher_is_better: bool) -> str:
    """Speed relative to a peer: > 1.00x means faster than it."""
    if base is None or not value or not base or value != value or base != base:
        return "–"
    return f"{(value / base if higher_is_better else base / value):.2f}×"


def paired_ratio(runs: list[float], peer_runs: list[float] | None) -> str:
    """Median over rounds of (system tok/s / peer tok/s) within the same round: rounds interleave the systems, so
    each pair ran seconds apart under the same machine load, which varies more between rounds than within one."""
    if not peer_runs or len(runs) != len(peer_runs) or not all(peer_runs):
        return "–"
    return f"{statistics.median(r / p for r, p in zip(runs, peer_runs)):.2f}×"


def _spread(median: float, runs: list[float]) -> str:
    """The median, and the range of the runs when there are several: '41.0 (39.8–47.2)'."""
    if len(runs) < 2:
        return f"{median:.1f}"
    return f"{median:.1f} ({min(runs):.1f}–{max(runs):.1f})"


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def run_facts(env: dict, command: str) -> list[str]:
    """Report lines saying where and with what a run was made: machine, versions, code, command."""
    return [f"- machine: {env['nproc']} CPUs usable (`nproc`), {env['cpu']}; {env['platform']}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
            f"- code: commit {env['git'].get('commit', '?')}, with "
            f"{env['git'].get('uncommitted_package_files', '?')} uncommitted file(s) under agentopt_compiler/",
            f"- command: `python {command}`"]


def write_report(bench: Bench) -> str:
    s, env = bench.settings, bench.environment
    lines = [f"## Decode benchmark: {s['model']}", ""]
    lines += [f"- date: {env['date']}",
              *run_facts(env, s["command"]),
              f"- settings: {s['threads']} threads for every system, prompts of {s['prompt_lengths']} random token "
              f"ids, {s['new_tokens']} greedy new tokens (end-of-sequence ignored), median of {s['repeats']} "
              f"interleaved rounds after one warm-up each, engine context {s['context_length']}, fp32 everywhere; "
              + ("each engine and peer in its own worker process" if s.get("one_process_per_system", False)
                 else "every system in one process"), ""]

    lines += ["TTFT and decode: median over the runs, (lowest–highest run) in brackets. Speed relative to a peer, "
              "from the medians: above 1.00× is faster than that peer, below is slower (TTFT: peer time / system "
              "time; decode: system tok/s / peer tok/s). \"paired\": the median over rounds of the ratio within "
              "each round.", ""]
    header = ["system", "prompt", "TTFT (ms)", "decode tok/s", "TTFT vs ORT-genai", "decode vs ORT-genai",
              "decode vs ORT-genai, paired", "TTFT vs transformers", "decode vs transformers", "same tokens as eager"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    by_key = {(m.system, m.prompt_tokens): m for m in bench.measurements}
    order = [OURS_DEFAULT, OURS_NO_PASSES, EAGER, TRANSFORMERS, ORT_GENAI]
    for n in s["prompt_lengths"]:
        genai, hf = by_key.get((ORT_GENAI, n)), by_key.get((TRANSFORMERS, n))
        for system in order:
            m = by_key.get((system, n))
            if m is None:
                continue
            same = {True: "yes", False: f"NO (from token {m.first_difference})", None: "–"}[m.same_as_eager]
            if system == EAGER:
                same = "(reference)"
            if len(m.tokens) != m.new_tokens:
                same += f"; decoded {len(m.tokens)} of {m.new_tokens}"
            lines.append(
                f"| {system} | {n} | {_spread(m.ttft_ms, m.runs_ttft_ms)} | "
                f"{_spread(m.decode_tokens_per_s, m.runs_decode_tokens_per_s)} | "
                f"{_ratio(m.ttft_ms, genai.ttft_ms if genai else None, False)} | "
                f"{_ratio(m.decode_tokens_per_s, genai.decode_tokens_per_s if genai else None, True)} | "
                f"{paired_ratio(m.runs_decode_tokens_per_s, genai.runs_decode_tokens_per_s if genai else None)} | "
                f"{_ratio(m.ttft_ms, hf.ttft_ms if hf else None, False)} | "
                f"{_ratio(m.decode_tokens_per_s, hf.decode_tokens_per_s if hf else None, True)} | {same} |")
    lines.append("")

    if bench.builds:
        lines += ["| build | seconds | size on disk | context |", "|---|---|---|---|"]
        for name, b in bench.builds.items():
            secs = b.get("compile_seconds", b.get("build_seconds"))
            what = "compile" if "compile_seconds" in b else "model builder"
            lines.append(f"| {name} ({what}) | {secs:.1f} | {_mib(b['engine_bytes'])} | "
                         f"{b.get('context_length', s['context_length'])} |")
        lines.append("")
    lines.append(f"Passes in the default pipeline (all skipped for \"{OURS_NO_PASSES}\"): "
                 f"{', '.join(s['pipeline_passes']) or 'none'}.")

    checked = [m for m in bench.measurements if m.system != EAGER and m.same_as_eager is not None]
    differing = [m for m in checked if not m.same_as_eager]
    if checked and not differing:
        lines.append("Greedy tokens: every system produced exactly the eager reference's tokens at every prompt "
                     "length.")
    for m in differing:
        lines.append(f"Greedy tokens: {m.system} at prompt {m.prompt_tokens} differs from the eager reference from "
                     f"new token {m.first_difference} on.")
    lines += roofline_lines(bench)
    lines += footer(bench)
    return "\n".join(lines) + "\n"


def roofline_lines(bench: Bench) -> list[str]:
    """What the decode rates mean in bytes: a weight-streaming decode step cannot beat one MatMul over its bytes."""
    roof = bench.roofline
    if not roof:
        return []
    weights, probes = roof["weight_bytes_per_step"], roof["probe_seconds"]
    ceiling = 1 / statistics.median(probes)
    rates = [f"{m.system} at {m.prompt_tokens}: {m.decode_tokens_per_s / ceiling:.0%}" for m in bench.measurements
             if m.system in (OURS_DEFAULT, ORT_GENAI)]
    return [f"Weight-streaming ceiling: a decode step reads {_mib(weights)} of weights (every parameter but the "
            f"embedding rows it does not gather). One ONNX Runtime MatMul over that many fp32 bytes "
            f"({bench.settings['threads']} threads, probed {len(probes)} times: before the first prompt length and "
            f"after each) takes {1000 / ceiling:.2f} ms ({min(probes) * 1000:.2f}–{max(probes) * 1000:.2f}), "
            f"{weights * ceiling / 1e9:.1f} GB/s: {ceiling:.0f} tokens/s if a step were only that. Median decode "
            f"rate as a share of it: " + ("; ".join(rates) or "no engine measured") + "."]


def footer(bench) -> list[str]:
    """The report's closing lines, common to the benchmarks: peers that could not run, and notes."""
    return [f"Unavailable: {name}: {reason}" for name, reason in bench.unavailable.items()] + list(bench.notes)


def publish(bench, report: str, json_path: Path | None) -> None:
    """Markdown to stdout; with ``--json``, the results and the markdown to a file."""
    sys.stdout.write(report)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**asdict(bench), "report_markdown": report}, indent=2))
        log(f"wrote {json_path}")


def benchmark_parser(doc: str, repeats: int = 3, repeats_help: str = "timed runs after one warm-up; the median "
                     "counts") -> argparse.ArgumentParser:
    """The options every benchmark shares: --model, --repeats, --threads, --work-dir, --json, --verbose."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ref-60m", help="built-in model name or Hugging Face folder (ref-60m)")
    parser.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads, the same for every system")
    parser.add_argument("--work-dir", default="bench_out", help="model folders and engines go here")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing systems")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 2048], metavar="N")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--context-length", type=int, default=None,
                        help="engine KV capacity (default: longest prompt + new tokens, rounded up to 256)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS),
                        help="which systems to run (default: all)")
    parser.add_argument("--shared-process", dest="isolate", action="store_false",
                        help="run every system in this one process (default: each engine and peer in its own "
                             "worker process; the eager reference stays here)")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.repeats < 1 or args.threads < 1 or min(args.prompt_lengths) < 1:
        parser.error("need --new-tokens >= 2, --repeats >= 1, --threads >= 1 and prompt lengths >= 1")
    if "eager" not in args.systems:
        args.systems.insert(0, "eager")  # the reference every token check needs
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    bench = run(args)
    publish(bench, write_report(bench), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
