"""The planner's decode-time model: bytes moved, times seconds per byte of each kernel, measured once per machine.

Decode streams every weight from memory once per token, so a unit's matmul time is about

    seconds(unit, precision) = bytes(unit, precision) * seconds_per_byte[kernel]

    kernel     what ORT CPU runs                        bytes per weight (symmetric, block b)
    fp32       MatMul                                   4    (fp16/bf16 units run as fp32 on ORT CPU)
    int8       MatMulNBits bits=8, accuracy level 4     1 + 4/b   (an fp32 scale per block; +1/b with zero points)
    int4       MatMulNBits bits=4, accuracy level 4     1/2 + 4/b

Three constants, not one time per candidate: the block size enters through the bytes alone, so int4@32, int4@64 and
int4@128 are always ordered by their bytes and no timing can flip them (timing each candidate once let one lucky run
make int4@64 look cheaper than it is, and the planner picked it for every unit; issue 32). Each constant is the
first quartile of interleaved rounds, measured until two attempts agree (``measure_cost_model``); how well they
agreed is recorded as its noise. The constants are cached per machine (CPU
model, cores, threads, ONNX Runtime version, symmetric or not) in ``$AGENTOPT_CACHE_DIR/cost_model.json`` (default
``~/.cache/agentopt``), so every later plan on that machine uses the same numbers and two runs give the same plan;
each plan records the constants it used.
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

KERNELS = ("fp32", "int8", "int4")
CACHE_FILE = "cost_model.json"


@dataclass
class CostModel:
    seconds_per_byte: dict[str, float]  # kernel -> seconds per byte read, e.g. {"fp32": 1.1e-10, ...}
    noise: dict[str, float] = field(default_factory=dict)  # kernel -> round spread (IQR / median) of its timing
    machine: dict = field(default_factory=dict)  # what the constants were measured on (the cache key's parts)
    measured_at: str = ""
    source: str = "measured"  # "measured" now, or "cached" (read from the cache file)

    def bytes_of(self, elements: int, precision: str, block: int, symmetric: bool = True) -> int:
        return unit_bytes(elements, precision, block, symmetric)

    def seconds(self, elements: int, precision: str, block: int, symmetric: bool = True) -> float:
        """Decode seconds for ``elements`` weights at ``precision`` (``int4@128`` names its own block size)."""
        bare, own_block = parse_precision(precision)
        kernel = bare if bare in BITS else "fp32"  # fp16/bf16: fp32 on ORT CPU (assign_layer_precision keeps them)
        return unit_bytes(elements, bare, own_block or block, symmetric) * self.seconds_per_byte[kernel]

    def to_dict(self) -> dict:
        return {"kind": "bytes-moved", **asdict(self)}


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
                      path: Path | None = None, log=None, **measure_options) -> CostModel:
    """This machine's constants from the cache, measured (and cached) when absent or when ``refresh``."""
    path = path or cache_path()
    key = json.dumps(machine_key(threads, symmetric), sort_keys=True)
    try:
        entries = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}  # an unreadable cache is measured again and rewritten
    entry = entries.get(key)
    if entry and not refresh:
        try:
            return CostModel(entry["seconds_per_byte"], entry.get("noise", {}), entry.get("machine", {}),
                             entry.get("measured_at", ""), source=f"cached in {path}")
        except (KeyError, TypeError):
            pass
    if log:
        log(f"measuring this machine's decode cost model (once; cached in {path})")
    model = measure_cost_model(threads, symmetric, **measure_options)
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


def measure_cost_model(threads: int | None = None, symmetric: bool = True, weights_mib: int = 128,
                       shape: tuple[int, int] = (1024, 1024), repeats: int = 21, max_noise: float = 0.1,
                       attempts: int = 5) -> CostModel:
    """Seconds per byte of each kernel: decode-shaped products (1, K) x (K, N) over ``weights_mib`` of distinct
    matrices per kernel (more than a last-level cache), the kernels timed in turns.

    The statistic is the first quartile of the rounds, not the median: other work on a shared machine only ever adds
    time, so the faster rounds are the kernel's own speed (on this project's shared 2-core host the median of one
    kernel moved 1.6x between two runs a minute apart while its first quartile moved 4%; per-round ratios between
    kernels were no better, their interquartile range as large as the median). Noise check: rounds come in attempts
    of ``repeats``; measuring stops once the last two attempts' quartiles agree within ``max_noise`` for every kernel
    (at most ``attempts``), and the constants are the quartiles of all rounds. ``noise`` records the last two
    attempts' largest relative difference per kernel."""
    if repeats < 4:
        raise AgentOptError(f"the cost model needs at least 4 repeats for its quartiles, got {repeats}")
    sessions, x, read = _timing_sessions(threads, symmetric, weights_mib, shape)
    rounds: dict[str, list[float]] = {kernel: [] for kernel in sessions}
    quartiles: list[dict[str, float]] = []
    noise: dict[str, float] = {}
    for _ in range(max(2, attempts)):
        this: dict[str, list[float]] = {kernel: [] for kernel in sessions}
        for _ in range(repeats):
            for kernel, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                this[kernel].append((time.perf_counter() - start) / read[kernel])
        for kernel, times in this.items():
            rounds[kernel] += times
        quartiles.append({kernel: float(np.percentile(times, 25)) for kernel, times in this.items()})
        if len(quartiles) >= 2:
            last, before = quartiles[-1], quartiles[-2]
            noise = {k: abs(last[k] - before[k]) / min(last[k], before[k]) for k in last}
            if max(noise.values()) <= max_noise:
                break
    # two significant digits: a re-measurement within a few percent gives the same constants
    return CostModel({k: float(f"{np.percentile(t, 25):.2g}") for k, t in rounds.items()},
                     {k: round(v, 4) for k, v in noise.items()}, machine_key(threads, symmetric),
                     time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def _timing_sessions(threads, symmetric, weights_mib, shape, block: int = 32):
    """One ORT session per kernel, each reading ``weights_mib`` of its own bytes (random weights and codes: the
    values do not matter for the time); returns the sessions, the input and the bytes each reads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from ..backends.onnxruntime.contrib_schemas import register_ort_contrib_schema

    register_ort_contrib_schema("MatMulNBits")
    k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, k)).astype(np.float32)
    sessions, read = {}, {}
    for kernel in KERNELS:
        matrix_bytes = unit_bytes(k * n, kernel, block, symmetric)
        count = max(1, weights_mib * 2**20 // matrix_bytes)
        read[kernel] = count * matrix_bytes
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
        sessions[kernel] = ort.InferenceSession(model.SerializeToString(), options,
                                                providers=["CPUExecutionProvider"])
        sessions[kernel].run(None, {"x": x})  # warm up
    return sessions, x, read
