"""Lower a captured program to a TensorRT engine folder: standard-ONNX first, then a TensorRT plan built from it.

    program --lower_to_onnx(attention_impl="standard")--> model.onnx   (Attention-23 + ScatterND; no com.microsoft)
            --check_onnx_for_tensorrt-->                   onnx.checker (full_check) + standard domains only
            --TensorRTBuildPlan.from_manifest-->           precision, profiles, workspace, timing cache, fp32 islands
            --build_plan_file (TensorRT + GPU)-->           model.plan

Why reuse the ONNX Runtime lowering: its ``standard`` attention lowering already emits only standard ONNX ops, and
TensorRT cannot run ORT's contrib ops (GroupQueryAttention, SkipSimplifiedLayerNormalization). One lowering means one
set of parity tests: the exact ONNX handed to TensorRT runs here on ONNX Runtime CPU and must match the ORT engine.

Without TensorRT (or without a GPU) the build step raises an AgentOptError; the compiler writes into a temporary
folder and removes it on error, so no half-written engine is left behind.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import AgentOptError
from .builder import INSTALL_HINT, PLAN_FILE, TensorRTUnavailableError, build_plan_file
from .plan import TensorRTBuildPlan

STANDARD_DOMAINS = ("", "ai.onnx")
CACHE_UPDATE = "double_buffer"  # see session.py: past and present are two buffers unless TensorRT reports aliasing


def check_onnx_for_tensorrt(path: Path) -> None:
    """Fail unless ``path`` is a valid ONNX model of standard ops only (what TensorRT's parser accepts without
    plugins). ``full_check`` also runs strict shape inference; it is given the path so >2 GB models work."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AgentOptError(f"the ONNX written for TensorRT is invalid ({first}); please report this") from None
    model = onnx.load(str(path), load_external_data=False)
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in STANDARD_DOMAINS})
    if foreign:
        raise AgentOptError(f"the ONNX for TensorRT contains non-standard ops TensorRT cannot run: "
                            f"{', '.join(foreign)}; compile with --attention-impl standard")


# lowering rules (backends/onnxruntime/lower.py) that emit com.microsoft ops; the others emit standard ONNX
CONTRIB_RULES = ("skip_rms_norm", "packed_qkv")


def check_standard_engine(engine: dict, folder: str = "ENGINE") -> None:
    """An engine section whose ONNX TensorRT can take: the tensorrt backend, or an onnxruntime engine lowered
    with standard attention (or unfused) and no ORT contrib rewrites."""
    if engine.get("backend") == "tensorrt":
        return
    impl = (engine.get("attention") or {}).get("impl")
    contrib_rules = {k: v for k, v in (engine.get("lowering_rules") or {}).items() if v and k in CONTRIB_RULES}
    if engine.get("backend") != "onnxruntime" or impl not in ("standard", "unfused") or contrib_rules:
        raise AgentOptError(
            f"engine '{folder}' ({engine.get('backend')}, attention {impl}) uses ONNX Runtime contrib ops TensorRT "
            f"cannot run; recompile it with: agentopt compile --attention-impl standard ...")


def tensorrt_section(onnx_section: dict, plan: TensorRTBuildPlan, build: dict) -> dict:
    """The manifest's engine section for a TensorRT engine (the compiler adds backend, device, context, batch)."""
    section = {k: v for k, v in onnx_section.items() if k not in ("tensorrt", "plan_file")}
    section.update({
        "plan_file": PLAN_FILE,
        "cache_update": CACHE_UPDATE,
        "tensorrt": {"plan": plan.to_dict(), "target": build["target"],
                     "build": {k: v for k, v in build.items() if k != "target"}},
    })
    return section


def lower_to_tensorrt(program, folder: Path, attention_impl: str = "standard", device: str = "cuda",
                      **options) -> dict:
    """Write ``folder/model.onnx`` (standard ONNX) and ``folder/model.plan``; return the manifest's engine section.

    ``options``: precision (fp32|fp16|bf16), typing (strong|constraints), workspace_bytes, timing_cache (path or
    "off"), fp32_islands (glob patterns), prefill_opt (tokens the prefill profile is tuned for)."""
    from ..onnxruntime.lower import lower_to_onnx

    if attention_impl != "standard":
        raise AgentOptError(f"attention implementation '{attention_impl}' is not available for tensorrt (it cannot "
                            "run ONNX Runtime contrib ops); use --attention-impl standard")
    folder = Path(folder)
    onnx_section = lower_to_onnx(program, folder, attention_impl="standard", device=device)
    check_onnx_for_tensorrt(folder / onnx_section["graph"])
    plan = TensorRTBuildPlan.from_manifest(
        {**onnx_section, "context_length": program.context_length, "batch_size": program.batch_size}, options)
    try:
        build = build_plan_file(folder / onnx_section["graph"], plan, folder / PLAN_FILE)
    except TensorRTUnavailableError as exc:
        raise TensorRTUnavailableError(
            f"{exc}. The ONNX for TensorRT was written and passed onnx.checker, but no engine was written. To build "
            f"the TensorRT engine later: agentopt compile --backend onnxruntime --attention-impl standard --out DIR "
            f"here, then agentopt rebuild DIR on the GPU machine") from None
    return tensorrt_section(onnx_section, plan, build)


__all__ = ["lower_to_tensorrt", "check_onnx_for_tensorrt", "check_standard_engine", "tensorrt_section",
           "INSTALL_HINT", "PLAN_FILE"]
