"""TensorRT session for an engine folder: the runtime's session protocol over ``model.plan``.

    run(input_ids (B, S), positions (B, S) or (S,), logits_index (B,) or (B, L)) -> logits (B, 1 or L, V)
    reset(), read_cache(n, row), write_cache(rows, row), capacity, batch_size, in_place, multi_logits, rewindable,
    ring_spare_slots, cache_addresses() (backends/session_protocol.py)

Every call runs all B rows (``row_subsets`` False: the optimization profiles fix the batch), so a server holds one
session on such an engine (runtime/slots.py).

Device memory: **PyTorch CUDA tensors** (``torch`` is already a dependency of the compiler; cuda-python would be one
more package for the same few allocations and copies). Execution: one ``IExecutionContext`` per optimization profile
(0 = prefill, 1 = decode, see plan.py), ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3`` on a
private CUDA stream, synchronized before results reach the host.

Caches live on the GPU for the whole session. TensorRT only guarantees correct results for an input and an output
bound to the same memory when the engine itself declares the pair aliased (``get_aliased_input_tensor``, which KV-
cache-update layers produce). Our standard-ONNX graph updates caches with ScatterND, which TensorRT does not declare
aliased, so each cache gets two buffers: past is read from one, present written to the other, and the roles swap
after the call (a pointer swap, no copy). Where the engine does declare aliasing, one buffer is bound as both
(``in_place``).

Before deserializing, the target recorded at build time is compared with this machine (target.py): a plan from
another GPU or TensorRT version fails with the rebuild command instead of an opaque TensorRT error.

Not run on a GPU in this repository; see docs/tensorrt.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import EngineError, ProviderUnavailableError
from ..call_inputs import call_inputs, run_in_chunks
from ..ring_caches import ring_spare_slots
from .builder import import_tensorrt, require_cuda
from .plan import PROFILE_NAMES
from .target import check_compatible, describe_target


def _torch_dtype(trt, torch, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
    if dtype not in table:
        raise EngineError(f"TensorRT engine uses tensor type {dtype}, which this session does not bind")
    return table[dtype]


class TensorRTSession:
    def __init__(self, folder: Path, engine: dict, device: str = "cuda", threads: int | None = None,
                 slots: int | None = None):
        if slots is not None and slots != int(engine["batch_size"]):
            raise EngineError(f"TensorRT engines hold the {engine['batch_size']} cache rows they were built for; "
                              f"rebuild with --batch-size {slots} for {slots} slots")
        if device != "cuda":
            raise ProviderUnavailableError(f"TensorRT engines run on device 'cuda', not '{device}'")
        trt = import_tensorrt()
        torch = require_cuda()
        folder = Path(folder)
        problem = check_compatible((engine.get("tensorrt") or {}).get("target"), describe_target(), str(folder))
        if problem:
            raise EngineError(problem)
        self._trt, self._torch = trt, torch
        self.capacity = int(engine["context_length"])
        self.batch_size = int(engine["batch_size"])
        self.caches_spec = engine["caches"]
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine((folder / engine["plan_file"]).read_bytes())
        if self._engine is None:
            raise EngineError(f"TensorRT could not deserialize {folder / engine['plan_file']}; rebuild it with: "
                              f"agentopt rebuild {folder}")
        self._io = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        self._stream = torch.cuda.Stream()
        self._contexts = []
        for index in range(self._engine.num_optimization_profiles):
            context = self._engine.create_execution_context()
            context.set_optimization_profile_async(index, self._stream.cuda_stream)
            self._contexts.append(context)
        self._dtype = {name: _torch_dtype(trt, torch, self._engine.get_tensor_dtype(name)) for name in self._io}
        aliased = getattr(self._engine, "get_aliased_input_tensor", None)
        self.in_place = bool(aliased) and all(aliased(c["output"]) == c["input"] for c in self.caches_spec)
        self._buffers = {}  # past name -> [front, back] (the same tensor twice when in place)
        for spec in self.caches_spec:
            front = torch.zeros(spec["shape"], dtype=self._dtype[spec["input"]], device="cuda")
            back = front if self.in_place else torch.zeros_like(front)
            self._buffers[spec["input"]] = [front, back]
        self._logits_name = engine["logits"]
        self.multi_logits = bool(engine.get("multi_logits", False))  # logits_index (B, L) rather than (B,)
        spare = ring_spare_slots(engine)  # ring caches: no rewinding, writes past the end up to their spare slots
        self.rewindable, self.ring_spare_slots = spare is None, spare or 0
        self.max_call_tokens = engine.get("attention", {}).get("ring_call_tokens")
        self.row_subsets = False  # profiles fix the batch: every call runs all rows
        self.batched_chunks = True  # standard-op attention takes several new tokens per row at any batch
        shape = tuple(self._engine.get_tensor_shape(self._logits_name))
        if any(d < 0 for d in shape):  # (B, 1, V) is static in our graphs; be safe if an exporter left it symbolic
            shape = (self.batch_size, 1, shape[-1])
        self._logits = torch.empty(shape, dtype=self._dtype[self._logits_name], device="cuda")
        self._stream.synchronize()

    # -- caches -----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        for front, back in self._buffers.values():
            front.zero_()
            back.zero_()
        self._torch.cuda.synchronize()

    def read_cache(self, length: int, row: int | None = None) -> dict[str, np.ndarray]:
        """Host copies of positions [0, length) of one row (1, Hkv, length, D) or all rows, float32."""
        rows = slice(None) if row is None else slice(row, row + 1)
        self._stream.synchronize()
        return {name: bufs[0][rows, :, :length].float().cpu().numpy() for name, bufs in self._buffers.items()}

    def write_cache(self, cached: dict[str, np.ndarray], row: int | None = None) -> None:
        rows = slice(None) if row is None else slice(row, row + 1)
        with self._torch.cuda.stream(self._stream):
            for name, value in cached.items():
                front = self._buffers[name][0]
                front[rows, :, :value.shape[2]].copy_(self._torch.from_numpy(np.ascontiguousarray(value)).to(front))
        self._stream.synchronize()

    def cache_addresses(self) -> dict[str, int]:
        """Device address of the buffer each cache is read from next."""
        return {name: bufs[0].data_ptr() for name, bufs in self._buffers.items()}

    # -- one call ---------------------------------------------------------------------------------------------
    def _device(self, name: str, array: np.ndarray):
        return self._torch.from_numpy(array).to(device="cuda", dtype=self._dtype[name])

    def run(self, input_ids: np.ndarray, positions: np.ndarray, logits_index: np.ndarray | None = None,
            rows: range | None = None) -> np.ndarray:
        input_ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        batch, length = input_ids.shape
        if rows is not None and len(rows) != self.batch_size:
            raise EngineError(f"TensorRT engines run all {self.batch_size} rows in every call, not rows {rows.start} "
                              f"to {rows.stop - 1}")
        if batch != self.batch_size or not 1 <= length <= self.capacity:
            raise EngineError(f"input of shape {input_ids.shape}; this engine takes ({self.batch_size}, 1 to "
                              f"{self.capacity}) tokens")
        input_ids, positions, logits_index, picks = call_inputs(input_ids, positions, logits_index, self.multi_logits)
        if self.max_call_tokens and length > self.max_call_tokens:  # rings stored before attending: see lower.py
            return run_in_chunks(self.run, input_ids, positions, logits_index, self.max_call_tokens)
        logits = self._logits if picks == 1 else self._torch.empty(
            (batch, picks, self._logits.shape[-1]), dtype=self._logits.dtype, device="cuda")
        profile = PROFILE_NAMES.index("decode" if length == 1 else "prefill")
        context = self._contexts[min(profile, len(self._contexts) - 1)]
        with self._torch.cuda.stream(self._stream):
            feeds = {"input_ids": self._device("input_ids", input_ids),
                     "positions": self._device("positions", positions)}
            if "logits_index" in self._io:
                feeds["logits_index"] = self._device("logits_index", logits_index)
            for name, tensor in feeds.items():
                if name != "logits_index" or self.multi_logits:
                    context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
            for spec in self.caches_spec:
                front, back = self._buffers[spec["input"]]
                context.set_tensor_address(spec["input"], front.data_ptr())
                context.set_tensor_address(spec["output"], back.data_ptr())
            context.set_tensor_address(self._logits_name, logits.data_ptr())
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT execution failed (execute_async_v3 returned False)")
        self._stream.synchronize()  # inputs stay referenced in ``feeds`` until here
        if not self.in_place:  # present (back) becomes the next call's past (front)
            for bufs in self._buffers.values():
                bufs.reverse()
        return logits.float().cpu().numpy()
