"""ONNX Runtime session for an engine folder (deploy side: onnxruntime + numpy, no torch).

Implements the runtime's session protocol: ``run(input_ids (B, S), positions (S,)) -> logits (B, 1, V)`` with the
KV caches held between calls, ``reset()`` and ``capacity``. The caches are numpy arrays fed as ``past.*`` and replaced
by the ``present.*`` outputs after each call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import EngineError, ProviderUnavailableError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def create_inference_session(model_path: Path, device: str, threads: int | None = None):
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
    def __init__(self, folder: Path, engine: dict, device: str = "cpu", threads: int | None = None):
        self.session = create_inference_session(folder / engine["graph"], device, threads)
        self.device = device
        self.caches_spec = engine["caches"]
        self.capacity = int(engine["context_length"])
        self.batch_size = int(engine["batch_size"])
        self._output_names = [o.name for o in self.session.get_outputs()]
        self._caches = {c["input"]: np.zeros(c["shape"], dtype=np.float32) for c in self.caches_spec}
        self._present_to_past = {c["output"]: c["input"] for c in self.caches_spec}

    def reset(self) -> None:
        for cache in self._caches.values():
            cache.fill(0.0)

    def run(self, input_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Feed new tokens at ``positions``; the caches advance; returns last-token logits (B, 1, V)."""
        feeds = {"input_ids": input_ids.astype(np.int64, copy=False),
                 "positions": positions.astype(np.int64, copy=False), **self._caches}
        outputs = self.session.run(self._output_names, feeds)
        logits = None
        for name, value in zip(self._output_names, outputs):
            if name in self._present_to_past:
                self._caches[self._present_to_past[name]] = value
            else:
                logits = value
        return logits
