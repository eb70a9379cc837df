"""Build ``model.plan`` from the engine folder's ONNX with the TensorRT Python API (10.14+; 11.x for fp32).

    OnnxParser(network).parse_from_file(model.onnx)      # file path, so external weights (model.onnx.data) load
    config: workspace pool limit, precision flags of the plan, timing cache, one optimization profile per plan profile
    fp32 islands: layer.precision / set_output_type(fp32) on layers made from island nodes (constraints mode only)
    builder.build_serialized_network(network, config) -> model.plan ; the updated timing cache is saved back

Only this module (and session.py) import ``tensorrt``, lazily: ``import_tensorrt`` turns its absence into an
AgentOptError that says how to install it. Nothing here has run on a GPU in this repository (see docs/tensorrt.md).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ...errors import AgentOptError
from .plan import TensorRTBuildPlan, island_nodes, matches_island, onnx_node_of
from .target import describe_target

PLAN_FILE = "model.plan"
MIN_VERSION = (10, 14)  # first TensorRT whose ONNX parser imports the opset-23 Attention op our lowering emits
INSTALL_HINT = ("install it with: pip install 'agentopt-compiler[tensorrt]' on a machine with an NVIDIA GPU and "
                "driver")


class TensorRTUnavailableError(AgentOptError):
    """TensorRT, CUDA or a GPU is missing here: the engine cannot be built or run on this machine."""


def import_tensorrt():
    """``tensorrt``, or an AgentOptError naming the fix (TensorRT wheels only work with an NVIDIA GPU + driver)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    version = tuple(int(p) for p in str(trt.__version__).split(".")[:2])
    if version < MIN_VERSION:
        raise TensorRTUnavailableError(f"TensorRT {trt.__version__} is too old: its ONNX parser lacks the Attention "
                                       f"op; need {'.'.join(map(str, MIN_VERSION))} or newer ({INSTALL_HINT})")
    return trt


def require_cuda():
    """A CUDA device through torch (used for the target description and, in the session, for device buffers)."""
    try:
        import torch
    except ImportError:
        raise TensorRTUnavailableError("the TensorRT backend needs PyTorch with CUDA for device memory; "
                                       "install torch") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("the TensorRT backend needs an NVIDIA GPU, but torch sees no CUDA device "
                                       f"(torch {torch.__version__}); run on a GPU machine with a CUDA build of torch")
    return torch


class _Logger:
    """TensorRT logger that keeps errors so a failed build can report them in one line."""

    def __init__(self, trt):
        class Logger(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)
                inner.errors = []

            def log(inner, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    inner.errors.append(str(msg))

        self.logger = Logger()


def _parse(trt, builder, logger, onnx_path: Path, strongly_typed: bool):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            errors.append(f"node {error.node_name() or error.node()} ({error.node_operator()}): {error.desc()}")
        raise AgentOptError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errors) or 'unknown'}")
    return network, parser


def _pin_islands(trt, network, onnx_model, plan: TensorRTBuildPlan) -> int:
    """Constraints mode: layers made from island nodes (norms, softmax, lm_head) compute and output fp32."""
    nodes = set(island_nodes(onnx_model, plan.fp32_islands))
    names = [n.name for n in onnx_model.graph.node]
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        node = onnx_node_of(layer.name, getattr(layer, "metadata", "") or "", names)
        if node in nodes or matches_island([layer.name, str(layer.type).split(".")[-1]], plan.fp32_islands):
            if any(layer.get_output(j).dtype not in (trt.float32, trt.float16, trt.bfloat16)
                   for j in range(layer.num_outputs)):
                continue  # shape / index layers: no float precision to pin
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def _load_timing_cache(config, path: str | None):
    data = b""
    if path and Path(path).is_file():
        data = Path(path).read_bytes()
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another device/version is just ignored


def _save_timing_cache(config, path: str | None) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".timing-", dir=target.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(memoryview(config.get_timing_cache().serialize()))
    os.replace(tmp, target)  # concurrent builds never see a half-written cache


def build_plan_file(onnx_path: Path, plan: TensorRTBuildPlan, out_file: Path) -> dict:
    """Build and write the serialized engine; return what the manifest records about the build."""
    import onnx

    trt = import_tensorrt()
    require_cuda()
    target = describe_target()
    holder = _Logger(trt)
    builder = trt.Builder(holder.logger)
    network, _parser = _parse(trt, builder, holder.logger, onnx_path, plan.strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for flag in plan.builder_flags(trt.__version__):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    pinned = 0
    if plan.builder_flags(trt.__version__):
        pinned = _pin_islands(trt, network, onnx.load(str(onnx_path), load_external_data=False), plan)
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    for spec in plan.profiles():
        profile = builder.create_optimization_profile()
        for name, shapes in spec["shapes"].items():
            if name in inputs and any(d < 0 for d in inputs[name].shape):  # only dynamic inputs take ranges
                profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    _load_timing_cache(config, plan.timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise AgentOptError(f"TensorRT could not build {onnx_path.name}: "
                            f"{'; '.join(holder.logger.errors[-3:]) or 'no error logged'}")
    out_file.write_bytes(memoryview(serialized))
    _save_timing_cache(config, plan.timing_cache)
    return {"target": target, "fp32_layers_pinned": pinned, "layers": network.num_layers}
