"""Decode attention: ONNX Runtime's GroupQueryAttention against a plain C loop, per layer, on this CPU.

Issue 3's long-context targets (fused >= 2x unfused at 2048 tokens of context, and a margin over onnxruntime-genai
there) hinge on one kernel: with the weights streamed once per token, what is left of a decode step that grows
with the context is attention, and both our engine and onnxruntime-genai run ORT's CPU GroupQueryAttention. This
probe asks how far that kernel is from what the hardware allows, per layer of a model's shape:

    gqa     com.microsoft.GroupQueryAttention as our engines call it at decode: one new token, packed q/k/v,
            caches of fixed capacity bound as both past and present (IO binding), RoPE off on both sides
    c-loop  a plain C loop (C_SOURCE below) over the same keys and values, keys stored transposed (a layout a
            kernel of our own could choose): each query group's scores 16 rows at a time, softmax, weighted sum
            of value rows; OpenMP over KV heads; compiled here with ``cc -O3 -march=native -ffast-math``
            (vectorized sums and expf; the output check bounds what that changes)

Both read the same rows and must give the same output (checked). Each call takes the next of ``--cache-sets``
distinct cache pairs (well over the last-level cache together), so K and V come from memory as they do in a real
step, where the weights of every layer stream through the caches between two attention calls.

The C loop is a measuring stick, not a kernel we ship: running it inside an engine needs an ONNX Runtime custom-op
library, built against ONNX Runtime's C API headers, and no package registry this project can use carries them
(docs/benchmarks.md, "Decode attention probe").

    python benchmarks/attention_kernel.py                      # ref-60m shape, 128 and 2048 tokens cached
    python benchmarks/attention_kernel.py --json bench_out/attention_kernel.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from decode import Isolated, log  # noqa: E402

C_SOURCE = r"""
#include <math.h>
/* One decode token, one layer: out (HEADS, HEAD_DIM) = softmax(q k^T / sqrt(HEAD_DIM)) v over rows [0, length).
   k_t (KV_HEADS, HEAD_DIM, capacity): keys stored transposed, so the scores of 16 consecutive rows are 16 lanes
   of one vector and no horizontal sums are needed; v (KV_HEADS, capacity, HEAD_DIM). GROUP = HEADS / KV_HEADS
   query heads share a KV head and read each of its rows once. HEAD_DIM and GROUP are compile-time constants
   (-D), as a kernel specialized per head size would have them. */
#define BLOCK 16
void decode_attention(const float *q, const float *k_t, const float *v, float *out, float *scores,
                      int kv_heads, int capacity, int length, int threads) {
  const float scale = 1.0f / sqrtf((float)HEAD_DIM);
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int g = 0; g < kv_heads; g++) {
    const float *kg = k_t + (long)g * HEAD_DIM * capacity, *vg = v + (long)g * capacity * HEAD_DIM;
    const float *qg = q + (long)g * GROUP * HEAD_DIM;
    float *s = scores + (long)g * GROUP * capacity;
    for (int t0 = 0; t0 < length; t0 += BLOCK) {  /* rows past length are computed, then ignored */
      float acc[GROUP][BLOCK] = {{0}};
      for (int d = 0; d < HEAD_DIM; d++)
        for (int h = 0; h < GROUP; h++)
          for (int j = 0; j < BLOCK; j++) acc[h][j] += qg[h * HEAD_DIM + d] * kg[(long)d * capacity + t0 + j];
      for (int h = 0; h < GROUP; h++)
        for (int j = 0; j < BLOCK; j++) s[h * capacity + t0 + j] = acc[h][j] * scale;
    }
    for (int h = 0; h < GROUP; h++) {
      float *row = s + h * capacity, top = -INFINITY, sum = 0.f;
      for (int t = 0; t < length; t++) top = row[t] > top ? row[t] : top;
      for (int t = 0; t < length; t++) { row[t] = expf(row[t] - top); sum += row[t]; }
      for (int t = 0; t < length; t++) row[t] /= sum;
    }
    float o[GROUP][HEAD_DIM] = {{0}};
    for (int t = 0; t < length; t++)  /* each value row once for the whole group */
      for (int h = 0; h < GROUP; h++)
        for (int d = 0; d < HEAD_DIM; d++) o[h][d] += s[h * capacity + t] * vg[(long)t * HEAD_DIM + d];
    for (int h = 0; h < GROUP; h++)
      for (int d = 0; d < HEAD_DIM; d++) out[((long)g * GROUP + h) * HEAD_DIM + d] = o[h][d];
  }
}
"""


def inputs(shape: dict, cache_sets: int):
    """The same random qkv row and caches in every process (seeded): (qkv (1, 1, (H + 2 Hkv) D), [(k, v), ...])."""
    rng = np.random.default_rng(0)
    cache = (1, shape["kv_heads"], shape["capacity"], shape["head_dim"])
    qkv = rng.standard_normal((1, 1, (shape["heads"] + 2 * shape["kv_heads"]) * shape["head_dim"]), dtype=np.float32)
    return qkv, [(rng.standard_normal(cache, dtype=np.float32), rng.standard_normal(cache, dtype=np.float32))
                 for _ in range(cache_sets)]


def timed(call, cache_sets: int, calls: int) -> float:
    """Microseconds a call, after a warm-up pass over the cache sets; call i takes set i % cache_sets."""
    for index in range(cache_sets):
        call(index)
    start = time.perf_counter()
    for step in range(calls):
        call(step % cache_sets)
    return (time.perf_counter() - start) / calls * 1e6


def c_loop_timer(shape: dict, threads: int, cache_sets: int):
    """Worker-process factory: run_once(length, calls) -> (us a call, output of a first call on set 0)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH; install gcc to run this probe")
    with tempfile.TemporaryDirectory() as work:  # the library stays mapped after its file is gone
        source, library = Path(work) / "decode_attention.c", Path(work) / "decode_attention.so"
        source.write_text(C_SOURCE)
        heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
        subprocess.run([compiler, "-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC",
                        f"-DHEAD_DIM={head_dim}", f"-DGROUP={heads // kv_heads}", str(source), "-o", str(library),
                        "-lm"], check=True)
        c_loop = ctypes.CDLL(str(library)).decode_attention
    c_loop.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 4
    qkv, caches = inputs(shape, cache_sets)
    # the same keys, stored transposed: (1, Hkv, T, D) -> (Hkv, D, T)
    caches = [(np.ascontiguousarray(key[0].transpose(0, 2, 1)), value) for key, value in caches]
    q = qkv.reshape(-1)[:heads * head_dim]
    new_k = qkv.reshape(-1)[heads * head_dim:(heads + kv_heads) * head_dim].reshape(kv_heads, head_dim)
    new_v = qkv.reshape(-1)[(heads + kv_heads) * head_dim:].reshape(kv_heads, head_dim)
    out = np.empty(heads * head_dim, np.float32)
    scores = np.empty(heads * shape["capacity"], np.float32)

    def run_once(length: int, calls: int):
        def call(index: int) -> None:
            key_t, value = caches[index]
            key_t[:, :, length - 1], value[0, :, length - 1] = new_k, new_v  # the cache write GQA does too
            c_loop(q.ctypes.data, key_t.ctypes.data, value.ctypes.data, out.ctypes.data, scores.ctypes.data,
                   kv_heads, shape["capacity"], length, threads)

        call(0)
        first = out.copy()
        return timed(call, cache_sets, calls), first

    return run_once


def gqa_timer(shape: dict, threads: int, cache_sets: int):
    """Worker-process factory: run_once(length, calls) -> (us a call, output of a first call on set 0)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    heads, kv_heads, head_dim, capacity = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["capacity"]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"],
                            ["out", "present_key", "present_value"], domain="com.microsoft", num_heads=heads,
                            kv_num_heads=kv_heads, do_rotary=0, local_window_size=-1)
    cache = [1, kv_heads, capacity, head_dim]
    graph_inputs = [
        helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, (heads + 2 * kv_heads) * head_dim]),
        helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    graph_outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, heads * head_dim]),
                     helper.make_tensor_value_info("present_key", TensorProto.FLOAT, cache),
                     helper.make_tensor_value_info("present_value", TensorProto.FLOAT, cache)]
    model = helper.make_model(helper.make_graph([node], "decode_attention", graph_inputs, graph_outputs),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    qkv, caches = inputs(shape, cache_sets)
    caches = [(ort.OrtValue.ortvalue_from_numpy(key), ort.OrtValue.ortvalue_from_numpy(value))
              for key, value in caches]

    def run_once(length: int, calls: int):
        bindings = []
        for key, value in caches:  # past and present are one buffer, as in our engines
            binding = session.io_binding()
            for name, array in (("qkv", qkv), ("seqlens_k", np.array([length - 1], np.int32)),
                                ("total", np.array(length, np.int32))):
                binding.bind_cpu_input(name, array)
            binding.bind_ortvalue_input("past_key", key)
            binding.bind_ortvalue_input("past_value", value)
            binding.bind_output("out")
            binding.bind_ortvalue_output("present_key", key)
            binding.bind_ortvalue_output("present_value", value)
            bindings.append(binding)
        session.run_with_iobinding(bindings[0])
        first = bindings[0].copy_outputs_to_cpu()[0].reshape(-1)
        return timed(lambda index: session.run_with_iobinding(bindings[index]), cache_sets, calls), first

    return run_once


def run(args) -> dict:
    import onnxruntime as ort

    from agentopt_compiler.models.registry import load_model

    config = load_model(args.model).config
    shape = {"heads": config.num_heads, "kv_heads": config.num_kv_heads, "head_dim": config.dim_per_head,
             "capacity": args.context_length}
    if max(args.lengths) > args.context_length:
        raise SystemExit(f"error: --lengths go up to {max(args.lengths)}, over --context-length "
                         f"{args.context_length}")
    if args.context_length % 16:
        raise SystemExit("error: --context-length must be a multiple of 16 (the C loop's row block)")
    set_mib = 2 * shape["kv_heads"] * shape["capacity"] * shape["head_dim"] * 4 / 2**20
    log(f"{args.cache_sets} cache pairs of {set_mib:.2f} MiB each; starting one process a system")
    # one process a system, as each would be deployed. ORT's pool threads spin for a while after a run and take a
    # core from whatever runs next, in any process: each round waits first (without the pause, the C loop's
    # rounds right after GroupQueryAttention's timed 161 us at 2048 instead of 91)
    systems = {"gqa": Isolated(gqa_timer, shape, args.threads, args.cache_sets),
               "c-loop": Isolated(c_loop_timer, shape, args.threads, args.cache_sets)}
    rows = []
    try:
        for length in args.lengths:
            times = {name: [] for name in systems}
            outputs = {}
            for _ in range(args.repeats):  # rounds alternate the two, so load from elsewhere falls on both
                for name, system in systems.items():
                    time.sleep(0.2)
                    microseconds, outputs[name] = system(length, args.calls)
                    times[name].append(microseconds)
            difference = float(np.abs(outputs["gqa"] - outputs["c-loop"]).max())
            if difference > 1e-4:
                raise SystemExit(f"error: the C loop and GroupQueryAttention disagree by {difference} at {length}")
            gqa_us, c_us = statistics.median(times["gqa"]), statistics.median(times["c-loop"])
            rows.append({"length": length, "gqa_us": gqa_us, "c_loop_us": c_us, "ratio": gqa_us / c_us,
                         "step_ms_saved": (gqa_us - c_us) * config.num_layers / 1e3,
                         "max_abs_difference": difference, "gqa_runs_us": times["gqa"],
                         "c_loop_runs_us": times["c-loop"]})
            log(f"{length} tokens cached: GroupQueryAttention {gqa_us:.1f} us, C loop {c_us:.1f} us a layer")
    finally:
        for system in systems.values():
            system.close()
    return {"model": args.model, **shape, "layers": config.num_layers, "threads": args.threads,
            "cache_sets": args.cache_sets, "calls": args.calls, "repeats": args.repeats, "rows": rows,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, {platform.platform()}",
            "onnxruntime": ort.__version__,
            "command": " ".join(["python", "benchmarks/attention_kernel.py", *sys.argv[1:]])}


def report(result: dict) -> str:
    lines = [f"## Decode attention probe: {result['model']} shape", "",
             f"- date: {result['date']}", f"- machine: {result['machine']}; onnxruntime {result['onnxruntime']}",
             f"- command: `{result['command']}`",
             f"- shape: {result['heads']} query heads, {result['kv_heads']} KV heads, head size {result['head_dim']},"
             f" capacity {result['capacity']}, {result['layers']} layers; {result['threads']} threads for both;"
             f" {result['cache_sets']} cache pairs in turn; median of {result['repeats']} rounds of"
             f" {result['calls']} calls", "",
             "| tokens cached | GroupQueryAttention (us a layer) | C loop (us a layer) | GQA / C loop "
             "| GQA - C loop over all layers (ms a decode step) | max abs difference |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        step_ms = round(row["step_ms_saved"], 2) + 0.0  # no "-0.00"
        lines.append(f"| {row['length']} | {row['gqa_us']:.1f} ({min(row['gqa_runs_us']):.1f}-"
                     f"{max(row['gqa_runs_us']):.1f}) | {row['c_loop_us']:.1f} ({min(row['c_loop_runs_us']):.1f}-"
                     f"{max(row['c_loop_runs_us']):.1f}) | {row['ratio']:.2f}x | {step_ms:.2f} "
                     f"| {row['max_abs_difference']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ref-60m",
                        help="built-in model or Hugging Face folder whose attention shape to use (ref-60m)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 2048], help="tokens cached (128 2048)")
    parser.add_argument("--context-length", type=int, default=2304, help="cache capacity (decode.py's: 2304)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-sets", type=int, default=64, help="distinct cache pairs taken in turn (64)")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls a round (2000)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (5)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
