"""ONNX Runtime session for an engine folder (deploy side: onnxruntime + numpy, no torch).

Implements the runtime's session protocol (backends/session_protocol.py): ``run(input_ids (R, S), positions,
logits_index, rows=range(a, b)) -> logits (R, L, V)`` with the KV caches of ``batch_size`` rows held between calls.
In-place engines (fused attention) bind each cache buffer as both its ``past.*`` input and its ``present.*`` output,
by address: the kernel writes new keys and values into the memory it reads, and a call on rows [a, b) binds the
addresses of those rows only (engines with dynamic rows, lowering rule dynamic_rows.py), so one row prefills alone
and all decoding rows step together without a copy. Caches are host numpy buffers on CPU (``HostCaches``) and
device-resident ``OrtValue``s on CUDA (``DeviceCaches``). Unfused engines (``cache_update`` "copy") feed caches as
inputs and keep the presents they return.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from ...errors import EngineError, ProviderUnavailableError
from ..call_inputs import call_inputs, run_in_chunks
from ..ring_caches import ring_spare_slots

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def create_inference_session(model_path: Path, device: str, threads: int | None = None, optimize: bool = True):
    """An InferenceSession that really runs on ``device``, or a ProviderUnavailableError (ORT itself only warns
    and falls back to CPU)."""
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise ProviderUnavailableError(f"device '{device}' is not supported by onnxruntime engines; use one of: "
                                       f"{', '.join(PROVIDERS)}")
    provider = PROVIDERS[device]
    available = ort.get_available_providers()
    if provider not in available:
        raise ProviderUnavailableError(
            f"device '{device}' needs onnxruntime's {provider}, but this onnxruntime has only "
            f"{', '.join(available)}; install the GPU build (pip install 'agentopt-compiler[gpu]') or use --device cpu"
        )
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:  # tests check our own rewrites with ORT's fusions off, so ORT cannot hide a missed fusion
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's per-node placement warnings are noise for users
    providers = [provider] if device == "cpu" else [provider, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EngineError(f"onnxruntime could not load {model_path}: {first}; recompile the engine") from None
    if session.get_providers()[0] != provider:
        raise ProviderUnavailableError(
            f"onnxruntime did not start {provider} (session runs on {session.get_providers()}); check the CUDA "
            f"installation or use --device cpu"
        )
    return session


CALL_FEEDS = {"input_ids", "positions", "logits_index"}  # what each call feeds besides the caches


def _check_manifest_matches_graph(engine: dict, session, graph_path: Path) -> None:
    """The manifest's names, shapes and cache dtypes are the graph's: a mismatched manifest.json (from a faulty
    writer, or edited in an engine written before manifests carried their own sha256) is one EngineError here, not
    an ONNX Runtime error at the first call."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    input_types = {i.name: i.type for i in session.get_inputs()}  # "tensor(float)", "tensor(int8)", ...
    outputs = {o.name for o in session.get_outputs()}

    def wrong(what: str) -> EngineError:
        return EngineError(f"manifest.json does not describe {graph_path}: {what}; the manifest was edited or comes "
                           "from another engine: recompile with agentopt compile")

    logits = next((o for o in session.get_outputs() if o.name == engine["logits"]), None)
    if logits is None or len(logits.shape) not in (2, 3) \
            or engine["logits"] in {cache["output"] for cache in engine["caches"]}:  # (B, V) or (B, L, V)
        raise wrong(f"engine.logits names '{engine['logits']}', which is not the graph's logits output (its "
                    f"outputs: {', '.join(sorted(outputs))})")
    if set(engine["inputs"]) != set(inputs):
        raise wrong(f"engine.inputs lists {', '.join(engine['inputs']) or 'nothing'}, and the graph takes "
                    f"{', '.join(inputs)}")
    if not engine["caches"]:
        raise wrong("engine.caches is empty")
    unlisted = set(inputs) - CALL_FEEDS - {cache["input"] for cache in engine["caches"]}
    if unlisted:
        raise wrong(f"the graph takes {', '.join(sorted(unlisted))}, which engine.caches does not list")
    rings = ring_spare_slots(engine) is not None
    for cache in engine["caches"]:
        if cache["input"] not in inputs or cache["output"] not in outputs:
            raise wrong(f"the cache {cache['input']} -> {cache['output']} is not among the graph's inputs and outputs")
        static = inputs[cache["input"]]
        if any(isinstance(d, int) and d != want for d, want in zip(static[1:], cache["shape"][1:])):
            raise wrong(f"the cache {cache['input']} has shape {cache['shape']} in the manifest and {static} in the "
                        "graph")
        dtype = np.dtype(cache.get("dtype", "float32"))
        if input_types[cache["input"]] != ORT_TENSOR_TYPES.get(dtype.name):
            raise wrong(f"the cache {cache['input']} is {dtype.name} in the manifest and "
                        f"{input_types[cache['input']]} in the graph")
        if not rings and cache["shape"][2] < engine["context_length"]:
            raise wrong(f"engine.context_length is {engine['context_length']}, and the cache {cache['input']} holds "
                        f"{cache['shape'][2]} positions")


ORT_TENSOR_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "bfloat16": "tensor(bfloat16)",
                    "int8": "tensor(int8)", "uint8": "tensor(uint8)"}  # numpy name -> ORT's input type


class OrtSession:
    """The session protocol over an ORT InferenceSession; ``slots`` rows of caches (default: the compiled batch)."""

    def __init__(self, folder: Path, engine: dict, device: str = "cpu", threads: int | None = None,
                 optimize: bool = True, slots: int | None = None):
        self.session = create_inference_session(folder / engine["graph"], device, threads, optimize)
        _check_manifest_matches_graph(engine, self.session, folder / engine["graph"])
        self.device = device
        self.capacity = int(engine["context_length"])
        compiled = int(engine["batch_size"])
        self.row_subsets = engine.get("rows") == "dynamic"
        if slots is not None and (slots < 1 or (slots != compiled and not self.row_subsets)):
            raise EngineError(f"cannot hold {slots} cache rows: " + (
                "give at least 1" if slots < 1 else f"this engine runs exactly {compiled} rows per call (compiled "
                "before dynamic rows, or its graph mixes rows); recompile it with agentopt compile"))
        self.batch_size = slots or compiled
        self.caches_spec = [{**c, "shape": [self.batch_size, *c["shape"][1:]]} for c in engine["caches"]]
        self.in_place = engine.get("cache_update") == "in_place"
        # ring caches (bounded sparse layers) forget old slots: a conversation cannot rewind into them cheaply, and
        # may write past its end only as far as their spare slots reach
        spare = ring_spare_slots(engine)
        self.rewindable, self.ring_spare_slots = spare is None, spare or 0
        # rings stored before attending are exact for calls of at most this many tokens: longer ones are split
        self.max_call_tokens = engine.get("attention", {}).get("ring_call_tokens")
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._input_names = {i.name for i in self.session.get_inputs()}
        # engines compiled before multi-position logits take logits_index (B,): one token per row and call
        picks = next((i for i in self.session.get_inputs() if i.name == "logits_index"), None)
        self.multi_logits = picks is not None and len(picks.shape) == 2
        # ORT's GroupQueryAttention takes several new tokens per row on top of cached ones only at batch size 1
        # ("batch_size must be 1 when sequence_length > 1 and past context is given"): such calls on several rows
        # go one token at a time (the same results, one call per token)
        layers = engine.get("attention", {}).get("layers", [])
        self.batched_chunks = not any(layer.get("op") == "GroupQueryAttention" for layer in layers)
        self._present_to_past = {c["output"]: c["input"] for c in self.caches_spec}
        self._logits_name = engine["logits"]
        self._vocab = next(o.shape[-1] for o in self.session.get_outputs() if o.name == self._logits_name)
        self._caches = self._make_caches(device) if self.in_place else HostCaches(self.caches_spec)
        self._bindings: dict[tuple[int, int], _RowsBinding] = {}  # (first row, end row) -> its IO binding

    def _make_caches(self, device: str) -> "HostCaches | DeviceCaches":
        """Host buffers on CPU (ORT reads and writes the numpy memory), device OrtValues elsewhere (separate so tests
        can exercise the device path with 'cpu' OrtValues)."""
        return HostCaches(self.caches_spec) if device == "cpu" else DeviceCaches(self.caches_spec, device)

    # -- caches -------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the cached tokens of every row. Only positions written since the last reset are cleared: a
        2048-token engine that ran a short prompt clears those few positions, not its whole capacity (that memset was
        a measurable part of the time to first token)."""
        self._caches.reset()

    def read_cache(self, length: int, row: int | None = None) -> dict[str, np.ndarray]:
        """Copies of positions [0, length) of one row (1, Hkv, length, D) each, or of all rows (B, ...)."""
        return self._caches.read(length, self._row_range(row))

    def write_cache(self, cached: dict[str, np.ndarray], row: int | None = None) -> None:
        """Put rows saved by ``read_cache`` back at positions [0, length) of ``row`` (or of all rows)."""
        self._caches.write(cached, self._row_range(row))

    def cache_addresses(self) -> dict[str, int]:
        """Memory address of each cache buffer (tests check they stay put and that presents alias them)."""
        return self._caches.addresses()

    def _row_range(self, row: int | None) -> range:
        if row is None:
            return range(self.batch_size)
        if not 0 <= row < self.batch_size:
            raise EngineError(f"cache row {row} does not exist; this session holds rows 0 to {self.batch_size - 1}")
        return range(row, row + 1)

    # -- one call -----------------------------------------------------------------------------------------------
    def run(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray | None = None,
            rows: range | None = None) -> np.ndarray:
        """Feed new tokens (R, S) at each row's ``positions`` ((R, S), or (S,) for all rows) to cache rows ``rows``
        (a contiguous range; default all); their caches advance. Returns the logits (R, L, V) of tokens
        ``logits_index[r]`` of each row: (R,) picks one token per row, (R, L) picks L (default: the last token)."""
        rows = range(self.batch_size) if rows is None else rows
        if rows.step != 1 or not 0 <= rows.start < rows.stop <= self.batch_size or (
                len(rows) != self.batch_size and not self.row_subsets):
            raise EngineError(f"cannot run cache rows {rows.start} to {rows.stop - 1} of this session's "
                              f"{self.batch_size}" + ("" if self.row_subsets else " (its graph runs all rows at once)"))
        input_ids, positions, logits_index, picks = call_inputs(input_ids, positions, logits_index, self.multi_logits)
        count, length = input_ids.shape
        if count != len(rows):
            raise EngineError(f"{count} rows of tokens for {len(rows)} cache rows")
        run = partial(self.run, rows=rows)
        if length > 1 and count > 1 and not self.batched_chunks and int(positions[:, 0].max()) > 0:
            return run_in_chunks(run, input_ids, positions, logits_index, 1)
        if self.max_call_tokens and length > self.max_call_tokens:
            return run_in_chunks(run, input_ids, positions, logits_index, self.max_call_tokens)
        self._caches.written = max(self._caches.written, int(positions.max()) + 1)  # ring slots are below this
        if not self.in_place:
            return self._run_copying(input_ids, positions, logits_index, rows)
        binding = self._binding(rows)
        if length == 1:  # decode: write into the bound step buffers (ORT reads the numpy memory directly)
            step = binding.step_inputs(self._input_names)
            step["input_ids"][...], step["positions"][...], step["logits_index"][...] = \
                input_ids, positions, logits_index
        else:
            binding.bind_inputs({"input_ids": input_ids, "positions": positions, "logits_index": logits_index},
                                self._input_names)
        if picks == 1:
            self.session.run_with_iobinding(binding.io)
            return binding.logits.copy()  # the buffer is overwritten by the next call
        return binding.run_with_logits(self.session, (count, picks, self._vocab))

    def _binding(self, rows: range) -> "_RowsBinding":
        """The IO binding of cache rows [start, stop): every cache bound by address as past and present, made once."""
        key = (rows.start, rows.stop)
        if key not in self._bindings:
            io = self.session.io_binding()
            for spec in self.caches_spec:
                address, shape = self._caches.rows_address(spec["input"], rows)
                dtype = np.dtype(spec.get("dtype", "float32"))
                io.bind_input(spec["input"], self._caches.device_type, 0, dtype, shape, address)
                io.bind_output(spec["output"], self._caches.device_type, 0, dtype, shape, address)
            self._bindings[key] = _RowsBinding(io, len(rows), self._vocab, self._logits_name, self.multi_logits)
        return self._bindings[key]

    def _run_copying(self, input_ids, positions, logits_index, rows: range) -> np.ndarray:
        """Unfused graphs: caches in as inputs, presents out as new arrays, stored back into the rows."""
        caches = self._caches.arrays
        feeds = {"input_ids": input_ids, "positions": positions, "logits_index": logits_index,
                 **{name: array[rows.start:rows.stop] for name, array in caches.items()}}
        outputs = self.session.run(self._output_names, {k: v for k, v in feeds.items() if k in self._input_names})
        logits = None
        for name, value in zip(self._output_names, outputs):
            if name in self._present_to_past:
                caches[self._present_to_past[name]][rows.start:rows.stop] = value
            else:
                logits = value
        return logits


class _RowsBinding:
    """One IO binding of some cache rows, with its (R, 1) step inputs and (R, 1, V) logits buffer: a decode step
    writes the tokens into the bound step buffers and rebinds nothing. A multi-token call binds its own arrays, so
    the step buffers are bound again on the next decode step."""

    def __init__(self, io, rows: int, vocab: int, logits_name: str, multi_logits: bool):
        import onnxruntime as ort

        self.io, self.logits_name = io, logits_name
        self.logits = np.zeros((rows, 1, vocab), dtype=np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        io.bind_ortvalue_output(logits_name, self._logits_value)
        self._step = {"input_ids": np.zeros((rows, 1), np.int64), "positions": np.zeros((rows, 1), np.int64),
                      "logits_index": np.zeros((rows, 1) if multi_logits else rows, np.int64)}
        self._step_bound = False

    def bind_inputs(self, arrays: dict[str, np.ndarray], names: set[str]) -> None:
        for name, array in arrays.items():
            if name in names:
                self.io.bind_cpu_input(name, array)
        self._step_bound = arrays is self._step

    def step_inputs(self, names: set[str]) -> dict[str, np.ndarray]:
        if not self._step_bound:
            self.bind_inputs(self._step, names)
        return self._step

    def run_with_logits(self, session, shape: tuple[int, int, int]) -> np.ndarray:
        """One call whose logits do not fit the (R, 1, V) buffer: bind a buffer of ``shape`` for this call only."""
        import onnxruntime as ort

        logits = np.zeros(shape, dtype=np.float32)
        self.io.bind_ortvalue_output(self.logits_name, ort.OrtValue.ortvalue_from_numpy(logits))
        try:
            session.run_with_iobinding(self.io)
        finally:
            self.io.bind_ortvalue_output(self.logits_name, self._logits_value)
        return logits


class HostCaches:
    """KV caches as host numpy buffers (B, Hkv, T, D); ``written``: positions [0, written) may hold data."""

    device_type = "cpu"

    def __init__(self, specs: list[dict]):
        self.arrays = {s["input"]: np.zeros(s["shape"], dtype=s.get("dtype", "float32")) for s in specs}
        self.written = 0

    def rows_address(self, name: str, rows: range) -> tuple[int, list[int]]:
        view = self.arrays[name][rows.start:rows.stop]  # contiguous: rows are the leading dimension
        return view.ctypes.data, list(view.shape)

    def reset(self) -> None:
        for array in self.arrays.values():
            array[:, :, :self.written].fill(0)  # ring caches hold fewer positions: the slice just stops there
        self.written = 0

    def read(self, length: int, rows: range) -> dict[str, np.ndarray]:
        return {name: array[rows.start:rows.stop, :, :length].copy() for name, array in self.arrays.items()}

    def write(self, cached: dict[str, np.ndarray], rows: range) -> None:
        for name, value in cached.items():
            self.arrays[name][rows.start:rows.stop, :, :value.shape[2]] = value
            self.written = max(self.written, value.shape[2])

    def addresses(self) -> dict[str, int]:
        return {name: array.ctypes.data for name, array in self.arrays.items()}


class DeviceCaches:
    """In-place KV caches resident on an ORT device (``cuda``): one ``OrtValue`` per layer cache, allocated with
    ``ortvalue_from_shape_and_type`` and bound (by address, row by row when a call runs some rows) as both past and
    present, so decode never moves a cache across PCIe.

    Host access (conversation save/restore, prefix cache) copies through the OrtValue: ``numpy()`` copies the cache
    to the host, ``update_inplace`` copies a host array back. Row writes therefore read-modify-write the whole cache;
    they happen once per session switch or prefix-cache hit, not per token.
    """

    def __init__(self, specs: list[dict], device: str, device_id: int = 0):
        import onnxruntime as ort

        self.device_type = device
        self.shapes = {spec["input"]: tuple(spec["shape"]) for spec in specs}
        self.dtypes = {spec["input"]: np.dtype(spec.get("dtype", "float32")) for spec in specs}
        self.values = {name: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtypes[name], device,
                                                                       device_id)
                       for name, shape in self.shapes.items()}
        self.written = 0
        self.reset()  # device allocations are uninitialized

    def rows_address(self, name: str, rows: range) -> tuple[int, list[int]]:
        shape = self.shapes[name]
        row_bytes = int(np.prod(shape[1:])) * self.dtypes[name].itemsize
        return self.values[name].data_ptr() + rows.start * row_bytes, [len(rows), *shape[1:]]

    def reset(self) -> None:
        for name, value in self.values.items():
            value.update_inplace(np.zeros(self.shapes[name], dtype=self.dtypes[name]))
        self.written = 0

    def read(self, length: int, rows: range) -> dict[str, np.ndarray]:
        return {name: np.array(value.numpy()[rows.start:rows.stop, :, :length])
                for name, value in self.values.items()}

    def write(self, cached: dict[str, np.ndarray], rows: range) -> None:
        for name, value in cached.items():
            full = np.array(self.values[name].numpy())  # host copy of the whole cache
            full[rows.start:rows.stop, :, :value.shape[2]] = value
            self.values[name].update_inplace(np.ascontiguousarray(full, dtype=self.dtypes[name]))
            self.written = max(self.written, value.shape[2])

    def addresses(self) -> dict[str, int]:
        return {name: value.data_ptr() for name, value in self.values.items()}
