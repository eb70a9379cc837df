"""The planner's decode-time model: seconds per weight of each kernel format, measured once per machine.

Decode streams every weight once per token, so a unit's matmul time is about

    seconds(unit, precision) = weights(unit) * seconds_per_weight[format]

    format      what ORT CPU runs                          bytes per weight (symmetric, block b)
    fp32        MatMul                                     4    (fp16/bf16 units run as fp32 on ORT CPU)
    int8@b      MatMulNBits bits=8, block b, accuracy 4    1 + 4/b   (an fp32 scale per block; +1/b with zero points)
    int4@b      MatMulNBits bits=4, block b, accuracy 4    1/2 + 4/b

One constant per format, measured, not derived from the bytes: until 2026-12-04 the model was bytes moved times one
constant per kernel, so int4@128 (0.53 bytes per weight) was predicted 1.18x cheaper than int4@32 (0.625). Timed on
this project's 2-core AVX2 host it is not: per weight int4@32, @64, @128 took 133, 135, 127 ps in one run and 104, 93,
121 ps in another (``MatMulNBits`` at accuracy level 4 is not bound by the bytes of its scales), and a plan of mostly
int4@128 predicted 1.14x faster than uniform int4 decoded at 0.98x of it (docs/benchmarks.md, issue 32).

Timing each format once let one lucky run make a block size look cheaper than it is (issue 32), so: each constant is
the first quartile of interleaved rounds, measured until two attempts agree (``measure_cost_model``), how well they
agreed is recorded as its noise, and formats of one kernel within ``max_noise`` (or their measured noise, if larger)
of the kernel's fastest are given one value (their median): a difference the host cannot reproduce does not decide
a plan, the KL does. The constants are cached per machine (CPU model, cores, threads, ONNX Runtime version,
symmetric or not) in ``$AGENTOPT_CACHE_DIR/cost_model.json`` (default ``~/.cache/agentopt``), so every later plan
on that machine uses the same numbers and two runs give the same plan; each plan records the constants it used.
A format a plan needs that the cache lacks (another block size) is measured then, with the cached ones, and the
entry rewritten.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import AgentOptError
from ..passes.precision_plan import BITS, parse_precision

DEFAULT_FORMATS = ("fp32", "int8@32", "int4@32", "int4@64", "int4@128")
CACHE_FILE = "cost_model.json"
COST_MODEL_NOISE = 0.1  # two attempts' quartiles agreeing within this end the timing; more is said as a warning


def format_of(precision: str, block: int) -> str:
    """The kernel format a unit at ``precision`` runs (``int4`` at the plan's block 32 -> ``int4@32``)."""
    bare, own_block = parse_precision(precision)
    return f"{bare}@{own_block or block}" if bare in BITS else "fp32"  # fp16/bf16: fp32 on ORT CPU


def formats_for(candidates, block: int) -> list[str]:
    """The formats a plan over ``candidates`` needs timed: each candidate's, and fp32 (what units left alone run)."""
    return sorted({"fp32"} | {format_of(c, block) for c in candidates})


@dataclass
class CostModel:
    seconds_per_weight: dict[str, float]  # format -> decode seconds per weight, e.g. {"int4@32": 1.1e-10, ...}
    noise: dict[str, float] = field(default_factory=dict)  # format -> round spread of its timing between attempts
    machine: dict = field(default_factory=dict)  # what the constants were measured on (the cache key's parts)
    measured_at: str = ""
    source: str = "measured"  # "measured" now, or "cached" (read from the cache file)

    def bytes_of(self, elements: int, precision: str, block: int, symmetric: bool = True) -> int:
        return unit_bytes(elements, precision, block, symmetric)

    def seconds(self, elements: int, precision: str, block: int, symmetric: bool = True) -> float:
        """Decode seconds for ``elements`` weights at ``precision`` (``int4@128`` names its own block size)."""
        fmt = format_of(precision, block)
        if fmt not in self.seconds_per_weight:
            raise AgentOptError(f"the cost model has no time for {fmt} (it has {', '.join(self.seconds_per_weight)}); "
                                "measure it: cached_cost_model(formats=[...]) or agentopt plan precision "
                                "--refresh-cost-model")
        return elements * self.seconds_per_weight[fmt]

    def to_dict(self) -> dict:
        return {"kind": "per-format", **asdict(self)}


def unit_bytes(elements: int, precision: str, block: int, symmetric: bool = True) -> int:
    if precision in BITS:  # + an fp32 scale per block, and (asymmetric) a zero point
        return elements * BITS[precision] // 8 + elements // block * (4 if symmetric else 5)
    return elements * (2 if precision in ("fp16", "bf16") else 4)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_key(threads: int | None, symmetric: bool) -> dict:
    import onnxruntime as ort

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads or 0, "onnxruntime": ort.__version__,
            "symmetric": symmetric}


def cache_path() -> Path:
    return Path(os.environ.get("AGENTOPT_CACHE_DIR") or Path.home() / ".cache" / "agentopt") / CACHE_FILE


def cached_cost_model(threads: int | None = None, symmetric: bool = True, refresh: bool = False,
                      path: Path | None = None, log=None, formats=DEFAULT_FORMATS, **measure_options) -> CostModel:
    """This machine's constants from the cache, measured (and cached) when absent, when a format in ``formats`` is
    missing (then with the cached ones, in the same interleaved rounds), or when ``refresh``."""
    path = path or cache_path()
    key = json.dumps(machine_key(threads, symmetric), sort_keys=True)
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}  # an unreadable cache is measured again and rewritten
    entry = entries.get(key)
    cached = entry.get("seconds_per_weight") if isinstance(entry, dict) else None  # older entries: per byte
    if isinstance(cached, dict) and not refresh and set(formats) <= set(cached):
        return CostModel(cached, entry.get("noise", {}), entry.get("machine", {}), entry.get("measured_at", ""),
                         source=f"cached in {path}")
    wanted = sorted(set(formats) | (set(cached) if isinstance(cached, dict) and not refresh else set()))
    if log:
        log(f"measuring this machine's decode cost model: {', '.join(wanted)} (once; cached in {path})")
    model = measure_cost_model(threads, symmetric, formats=wanted, **measure_options)
    entries[key] = {k: v for k, v in asdict(model).items() if k != "source"}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=2) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        if log:
            log(f"could not cache the cost model in {path} ({exc.strerror or exc}); it will be measured again next "
                "time: set AGENTOPT_CACHE_DIR to a writable folder")
    return model


def measure_cost_model(threads: int | None = None, symmetric: bool = True, formats=DEFAULT_FORMATS,
                       weights_mib: int = 128, shape: tuple[int, int] = (1024, 1024), repeats: int = 21,
                       max_noise: float = COST_MODEL_NOISE, attempts: int = 5) -> CostModel:
    """Seconds per weight of each format: decode-shaped products (1, K) x (K, N) over ``weights_mib`` of distinct
    matrices per format (more than a last-level cache), the formats timed in turns.

    The statistic is the first quartile of the rounds, not the median: other work on a shared machine only ever adds
    time, so the faster rounds are the kernel's own speed (on this project's shared 2-core host the median of one
    kernel moved 1.6x between two runs a minute apart while its first quartile moved 4%; per-round ratios between
    kernels were no better, their interquartile range as large as the median). Noise check: rounds come in attempts
    of ``repeats``; measuring stops once the last two attempts' quartiles agree within ``max_noise`` for every format
    (at most ``attempts``), and the constants are the quartiles of all rounds. ``noise`` records the last two
    attempts' largest relative difference per format. Formats of one kernel within ``max_noise`` (or their measured
    noise, when larger) of the kernel's fastest get one value, their median."""
    if repeats < 4:
        raise AgentOptError(f"the cost model needs at least 4 repeats for its quartiles, got {repeats}")
    for fmt in formats:
        if fmt != "fp32" and (parse_precision(fmt)[0] not in BITS or parse_precision(fmt)[1] is None):
            raise AgentOptError(f"cost model format {fmt!r}: expected fp32, int8@B or int4@B (B a block size)")
    sessions, x, weights = _timing_sessions(threads, symmetric, weights_mib, shape, formats)
    rounds: dict[str, list[float]] = {fmt: [] for fmt in sessions}
    quartiles: list[dict[str, float]] = []
    noise: dict[str, float] = {}
    for _ in range(max(2, attempts)):
        this: dict[str, list[float]] = {fmt: [] for fmt in sessions}
        for _ in range(repeats):
            for fmt, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                this[fmt].append((time.perf_counter() - start) / weights[fmt])
        for fmt, times in this.items():
            rounds[fmt] += times
        quartiles.append({fmt: float(np.percentile(times, 25)) for fmt, times in this.items()})
        if len(quartiles) >= 2:
            last, before = quartiles[-1], quartiles[-2]
            noise = {k: abs(last[k] - before[k]) / min(last[k], before[k]) for k in last}
            if max(noise.values()) <= max_noise:
                break
    constants = _tie_within({k: max(max_noise, noise.get(k, 0.0)) for k in rounds},
                            {k: float(np.percentile(t, 25)) for k, t in rounds.items()})
    # two significant digits: a re-measurement within a few percent gives the same constants
    return CostModel({k: float(f"{v:.2g}") for k, v in constants.items()},
                     {k: round(v, 4) for k, v in noise.items()}, machine_key(threads, symmetric),
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def _tie_within(tolerance: dict[str, float], constants: dict[str, float]) -> dict[str, float]:
    """Formats of one kernel (``int4@32``, ``int4@128``, ...) within the kernel's tolerance (the largest of its
    formats' ``tolerance``: ``max_noise`` or their measured noise) of its fastest take the median of those formats:
    the host cannot tell them apart, so the plan should not either."""
    out = dict(constants)
    for kernel in {fmt.split("@")[0] for fmt in constants if "@" in fmt}:
        family = {f: v for f, v in constants.items() if f.split("@")[0] == kernel}
        fastest = min(family.values())
        within = max(tolerance[f] for f in family)
        close = [f for f, v in family.items() if v <= fastest * (1 + within)]
        if len(close) > 1:
            tied = float(np.median([family[f] for f in close]))
            out.update({f: tied for f in close})
    return out


def _timing_sessions(threads, symmetric, weights_mib, shape, formats):
    """One ORT session per format, each reading ``weights_mib`` of its own bytes (random weights and codes: the
    values do not matter for the time); returns the sessions, the input and the weights each multiplies."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ..backends.onnxruntime.contrib_schemas import register_ort_contrib_schema

    register_ort_contrib_schema("MatMulNBits")
    k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k)).astype(np.float32)
    sessions, weights = {}, {}
    for fmt in formats:
        kernel, block = parse_precision(fmt)
        matrix_bytes = unit_bytes(k * n, kernel, block or 32, symmetric)
        count = max(1, weights_mib * 2**20 // matrix_bytes)
        weights[fmt] = count * k * n
        nodes, inits = [], []
        for i in range(count):
            if kernel == "fp32":
                nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
                inits.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), f"w{i}"))
                continue
            bits = BITS[kernel]
            arrays = {f"q{i}": rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8),
                      f"s{i}": rng.uniform(0.01, 0.1, (n * k // block,)).astype(np.float32)}
            if not symmetric:
                arrays[f"z{i}"] = np.full((n * ((k // block * bits + 7) // 8),), 0x88, dtype=np.uint8)
            nodes.append(helper.make_node("MatMulNBits", ["x", *arrays], [f"y{i}"], domain="com.microsoft", K=k, N=n,
                                          bits=bits, block_size=block, accuracy_level=4))
            inits += [numpy_helper.from_array(a, name) for name, a in arrays.items()]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n])
                                   for i in range(count)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid("com.microsoft", 1)])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        sessions[fmt] = ort.InferenceSession(model.SerializeToString(), options,
                                             providers=["CPUExecutionProvider"])
        sessions[fmt].run(None, {"x": x})  # warm up
    return sessions, x, weights
