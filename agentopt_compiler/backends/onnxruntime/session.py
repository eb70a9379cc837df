"""ONNX Runtime session for an engine folder (deploy side: onnxruntime + numpy, no torch).

Implements the runtime's session protocol: ``run(input_ids (B, S), positions (B, S) or (S,), logits_index (B,) or
(B, L)) -> logits (B, 1 or L, V)`` with the KV caches held between calls, ``reset()``, ``read_cache``/``write_cache``,
``capacity`` and ``multi_logits`` (whether one call can return the logits of several tokens per row). The caches
are numpy arrays fed as ``past.*`` and replaced by the ``present.*`` outputs after each call, or, for in-place
engines, buffers bound as both past and present: host numpy buffers on CPU, device-resident ``OrtValue``s on CUDA
(``DeviceCaches``).
"""

from __future__ import annotations

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


class OrtSession:
    """Session protocol over an ORT InferenceSession.

    ``cache_update == "in_place"`` (fused attention): zero-copy decode. Each layer cache is one buffer bound as both
    ``past.*`` input and ``present.*`` output through IO binding, so the kernel writes new rows into the memory it
    reads; logits go into a preallocated buffer; per call only ``input_ids``, ``positions`` and ``logits_index`` are
    bound.
    ``"copy"`` (unfused graphs): caches are fed as numpy arrays and replaced by the returned presents.
    """

    def __init__(self, folder: Path, engine: dict, device: str = "cpu", threads: int | None = None,
                 optimize: bool = True):
        import onnxruntime as ort

        self.session = create_inference_session(folder / engine["graph"], device, threads, optimize)
        self.device = device
        self.caches_spec = engine["caches"]
        self.capacity = int(engine["context_length"])
        self.batch_size = int(engine["batch_size"])
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
        # ("batch_size must be 1 when sequence_length > 1 and past context is given"): such calls on a batch engine
        # go one token at a time (the same results, one call per token)
        layers = engine.get("attention", {}).get("layers", [])
        self.batched_chunks = self.batch_size == 1 or not any(l.get("op") == "GroupQueryAttention" for l in layers)
        self._present_to_past = {c["output"]: c["input"] for c in self.caches_spec}
        self._caches = {c["input"]: np.zeros(c["shape"], dtype=c.get("dtype", "float32")) for c in self.caches_spec}
        self._rows_written = 0  # cache rows [0, this) may hold data since the last reset (the rest are zeros)
        self._device_caches = None  # DeviceCaches when the in-place caches live on the device (not CPU)
        self._step = None  # (B, 1) int64 inputs of one-token calls, bound once (see _step_buffers)
        self._step_bound = False  # whether they are the bound inputs now (a prefill binds its own)
        if self.in_place:
            vocab = next(o.shape[-1] for o in self.session.get_outputs() if o.name == engine["logits"])
            self._logits = np.zeros((self.batch_size, 1, vocab), dtype=np.float32)
            self._binding = self.session.io_binding()
            if device == "cpu":
                # OrtValues that wrap the numpy buffers (no copy): the kernels read and write this memory directly
                self._cache_values = {name: ort.OrtValue.ortvalue_from_numpy(array)
                                      for name, array in self._caches.items()}
            else:  # device-resident caches: host reads/writes of rows go through OrtValue copies
                self._device_caches = self._make_device_caches(device)
                self._cache_values = self._device_caches.values
                self._caches = {}
            self._bind_caches()
            # logits stay a host buffer: ORT copies the (B, 1, V) row from the device into it
            self._logits_name = engine["logits"]
            self._logits_value = ort.OrtValue.ortvalue_from_numpy(self._logits)
            self._binding.bind_ortvalue_output(self._logits_name, self._logits_value)

    def _bind_inputs(self, arrays: dict[str, np.ndarray]) -> None:
        for name, array in arrays.items():
            if name in self._input_names:
                self._binding.bind_cpu_input(name, array)

    def _step_buffers(self, batch: int) -> dict[str, np.ndarray]:
        """(B, 1) int64 buffers for one-token calls, bound once and then only written: a decode step rebinds
        nothing. A prefill call binds its own arrays, so the buffers are bound again on the next decode step."""
        if self._step is None:
            self._step = {"input_ids": np.zeros((batch, 1), np.int64), "positions": np.zeros((batch, 1), np.int64),
                          "logits_index": np.zeros((batch, 1) if self.multi_logits else batch, np.int64)}
        if not self._step_bound:
            self._bind_inputs(self._step)
            self._step_bound = True
        return self._step

    def _make_device_caches(self, device: str) -> "DeviceCaches":
        """Separate so tests can exercise the device-cache code path with device 'cpu' OrtValues."""
        return DeviceCaches(self.caches_spec, device)

    def _bind_caches(self) -> None:
        """Bind each cache buffer as both its past input and its present output (the kernel updates it in place)."""
        for spec in self.caches_spec:
            value = self._cache_values[spec["input"]]
            self._binding.bind_ortvalue_input(spec["input"], value)
            self._binding.bind_ortvalue_output(spec["output"], value)

    def reset(self) -> None:
        """Forget the cached tokens. (Stale rows are never attended to, since positions mask them, but a clean
        cache keeps runs reproducible bit for bit.) Only the rows written since the last reset are cleared: a
        2048-token engine that ran a short prompt clears those few rows, not its whole capacity (that memset was a
        measurable part of the time to first token)."""
        if self._device_caches is not None:
            self._device_caches.reset()
        for cache in self._caches.values():
            cache[:, :, :self._rows_written].fill(0.0)  # ring caches hold fewer rows: the slice just stops there
        self._rows_written = 0

    def read_cache(self, length: int) -> dict[str, np.ndarray]:
        """Copies of rows [0, length) of every cache: (B, Hkv, length, D) each."""
        if self._device_caches is not None:
            return self._device_caches.read(length)
        return {name: array[:, :, :length].copy() for name, array in self._caches.items()}

    def write_cache(self, rows: dict[str, np.ndarray]) -> None:
        """Put rows saved by ``read_cache`` back at [0, length)."""
        if self._device_caches is not None:
            self._device_caches.write(rows)
            return
        for name, value in rows.items():
            self._caches[name][:, :, :value.shape[2]] = value
            self._rows_written = max(self._rows_written, value.shape[2])

    def cache_addresses(self) -> dict[str, int]:
        """Memory address of each cache buffer (tests check they stay put and that presents alias them)."""
        if self._device_caches is not None:
            return {name: value.data_ptr() for name, value in self._cache_values.items()}
        return {name: array.ctypes.data for name, array in self._caches.items()}

    def run(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray | None = None) -> np.ndarray:
        """Feed new tokens (B, S) at each row's ``positions`` ((B, S), or (S,) for all rows); the caches advance.
        Returns the logits (B, L, V) of tokens ``logits_index[b]`` of each row: (B,) picks one token per row,
        (B, L) picks L (default: the last token)."""
        input_ids, positions, logits_index, picks = call_inputs(input_ids, positions, logits_index, self.multi_logits)
        batch, length = input_ids.shape
        if length > 1 and not self.batched_chunks and int(positions[:, 0].max()) > 0:
            return run_in_chunks(self.run, input_ids, positions, logits_index, 1)
        if self.max_call_tokens and length > self.max_call_tokens:
            return run_in_chunks(self.run, input_ids, positions, logits_index, self.max_call_tokens)
        self._rows_written = max(self._rows_written, int(positions.max()) + 1)  # a ring slot is below its position
        if self.in_place:
            if length == 1:  # decode: write into the bound step buffers (ORT reads the numpy memory directly)
                step = self._step_buffers(batch)
                step["input_ids"][...], step["positions"][...] = input_ids, positions
                step["logits_index"][...] = logits_index
            else:
                self._step_bound = False
                self._bind_inputs({"input_ids": input_ids, "positions": positions, "logits_index": logits_index})
            if picks == 1:
                self.session.run_with_iobinding(self._binding)
                return self._logits.copy()  # the buffer is overwritten by the next call
            return self._run_with_logits((batch, picks, self._logits.shape[-1]))
        feeds = {"input_ids": input_ids, "positions": positions, "logits_index": logits_index, **self._caches}
        feeds = {name: value for name, value in feeds.items() if name in self._input_names}
        outputs = self.session.run(self._output_names, feeds)
        logits = None
        for name, value in zip(self._output_names, outputs):
            if name in self._present_to_past:
                self._caches[self._present_to_past[name]] = value
            else:
                logits = value
        return logits

    def _run_with_logits(self, shape: tuple[int, int, int]) -> np.ndarray:
        """One in-place call whose logits do not fit the preallocated (B, 1, V) buffer: bind a buffer of ``shape``
        for this call only, then put the decode buffer back."""
        import onnxruntime as ort

        logits = np.zeros(shape, dtype=np.float32)
        self._binding.bind_ortvalue_output(self._logits_name, ort.OrtValue.ortvalue_from_numpy(logits))
        try:
            self.session.run_with_iobinding(self._binding)
        finally:
            self._binding.bind_ortvalue_output(self._logits_name, self._logits_value)
        return logits


class DeviceCaches:
    """In-place KV caches resident on an ORT device (``cuda``): one ``OrtValue`` per layer cache, allocated with
    ``ortvalue_from_shape_and_type`` and bound as both past and present, so decode never moves a cache across PCIe.

    Host access (conversation save/restore, prefix cache) copies through the OrtValue: ``numpy()`` copies the cache
    to the host, ``update_inplace`` copies a host array back. Row writes therefore read-modify-write the whole cache;
    they happen once per conversation switch, not per token.
    """

    def __init__(self, specs: list[dict], device: str, device_id: int = 0):
        import onnxruntime as ort

        self.shapes = {spec["input"]: tuple(spec["shape"]) for spec in specs}
        self.dtypes = {spec["input"]: np.dtype(spec.get("dtype", "float32")) for spec in specs}
        self.values = {name: ort.OrtValue.ortvalue_from_shape_and_type(list(shape), self.dtypes[name], device,
                                                                       device_id)
                       for name, shape in self.shapes.items()}
        self.reset()  # device allocations are uninitialized

    def reset(self) -> None:
        for name, value in self.values.items():
            value.update_inplace(np.zeros(self.shapes[name], dtype=self.dtypes[name]))

    def read(self, length: int) -> dict[str, np.ndarray]:
        return {name: np.array(value.numpy()[:, :, :length]) for name, value in self.values.items()}

    def write(self, rows: dict[str, np.ndarray]) -> None:
        for name, value in rows.items():
            full = np.array(self.values[name].numpy())  # host copy of the whole cache
            full[:, :, :value.shape[2]] = value
            self.values[name].update_inplace(np.ascontiguousarray(full, dtype=self.dtypes[name]))
