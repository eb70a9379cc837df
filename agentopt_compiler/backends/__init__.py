"""Backends by name. Each entry names the module that lowers (needs torch) and the one that runs (deploy side);
both are imported only when used, so ``agentopt --help`` or a torch-free deployment never imports a backend it
does not run."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import AgentOptError


@dataclass(frozen=True)
class BackendEntry:
    name: str
    devices: tuple[str, ...]
    lowering: str  # "module:function" — lower(program, folder, **options) -> engine section of the manifest
    session: str  # "module:class"   — Session(folder, engine_section, device, threads)
    attention_impls: tuple[str, ...]  # lowerings of fused attention it offers; the first is the default
    half_precision_devices: tuple[str, ...] = ()  # devices with native fp16/bf16 kernels: planned half regions pay
    default_impl_by_device: tuple[tuple[str, str], ...] = ()  # (device, attention impl) where the default differs

    def default_attention_impl(self, device: str) -> str:
        return dict(self.default_impl_by_device).get(device, self.attention_impls[0])

    def load(self, which: str):
        module_name, attr = getattr(self, which).split(":")
        return getattr(importlib.import_module(module_name), attr)


BACKENDS: dict[str, BackendEntry] = {
    "onnxruntime": BackendEntry(
        name="onnxruntime",
        devices=("cpu", "cuda"),
        lowering="agentopt_compiler.backends.onnxruntime.lower:lower_to_onnx",
        session="agentopt_compiler.backends.onnxruntime.session:OrtSession",
        attention_impls=("gqa", "standard"),
        half_precision_devices=("cuda",),
        # ORT's CUDA GroupQueryAttention kernel is fp16/bf16 only and our caches are fp32 (lower.check_cuda_kernels)
        default_impl_by_device=(("cuda", "standard"),),
    ),
    "tensorrt": BackendEntry(  # standard ONNX -> TensorRT plan; needs TensorRT + an NVIDIA GPU (docs/tensorrt.md)
        name="tensorrt",
        devices=("cuda",),
        lowering="agentopt_compiler.backends.tensorrt.lower:lower_to_tensorrt",
        session="agentopt_compiler.backends.tensorrt.session:TensorRTSession",
        attention_impls=("standard",),
        half_precision_devices=("cuda",),
    ),
}


def get_backend(name: str, device: str | None = None) -> BackendEntry:
    if name not in BACKENDS:
        raise AgentOptError(f"backend '{name}' is not available; available: {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    if device is not None and device not in entry.devices:
        raise AgentOptError(f"backend '{name}' does not run on device '{device}'; it runs on: "
                            f"{', '.join(entry.devices)}")
    return entry


def check_attention_impl(entry: BackendEntry, attention_impl: str) -> None:
    if attention_impl not in entry.attention_impls:
        raise AgentOptError(f"attention implementation '{attention_impl}' is not available for backend "
                            f"'{entry.name}'; choose one of: {', '.join(entry.attention_impls)}")
