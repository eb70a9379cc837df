"""TensorRTBuildPlan and target checks: pure Python, no TensorRT needed."""

import json

import onnx
import pytest

from agentopt_compiler.backends.tensorrt.plan import (DEFAULT_ISLANDS, TensorRTBuildPlan, island_nodes,
                                                      matches_island, onnx_node_of)
from agentopt_compiler.backends.tensorrt.target import check_compatible
from agentopt_compiler.errors import AgentOptError
from tests.backends.tensorrt.trt_fakes import FAKE_TARGET
from tests.conftest import TINY_CONTEXT


@pytest.fixture(scope="module")
def manifest(trt_engine_dir):
    return json.loads((trt_engine_dir / "manifest.json").read_text())


def test_plan_from_a_compiled_engine_manifest(manifest):
    engine = manifest["engine"]
    assert engine["backend"] == "tensorrt" and engine["device"] == "cuda" and engine["plan_file"] == "model.plan"
    # no ORT contrib-op rule ran (standard ONNX only); constant folding and shared subexpressions are standard too
    assert engine["attention"]["impl"] == "standard"
    assert set(engine["lowering_rules"]) == {"rows_copied_in_reshapes", "constant_slices", "shared_subexpressions",
                                             "dynamic_rows"}
    plan = TensorRTBuildPlan.from_manifest(engine)
    assert (plan.batch_size, plan.context_length, plan.precision, plan.typing) == (1, TINY_CONTEXT, "fp32", "strong")
    assert plan.cache_shapes == {c["input"]: c["shape"] for c in engine["caches"]}
    # the manifest records the plan it was built with, and the recorded plan round-trips
    assert engine["tensorrt"]["plan"] == plan.to_dict()
    assert engine["tensorrt"]["target"] == FAKE_TARGET


def test_profile_shapes(manifest):
    plan = TensorRTBuildPlan.from_manifest(manifest["engine"], {"prefill_opt": 64})
    prefill, decode = plan.profiles()
    assert prefill["name"] == "prefill" and decode["name"] == "decode"
    for tensor in ("input_ids", "positions"):
        assert prefill["shapes"][tensor] == {"min": [1, 1], "opt": [1, 64], "max": [1, TINY_CONTEXT]}
        assert decode["shapes"][tensor] == {"min": [1, 1], "opt": [1, 1], "max": [1, 1]}
    # one pick per row, or up to S (prompt-lookup decoding checks drafts through the prefill profile)
    assert prefill["shapes"]["logits_index"] == {"min": [1, 1], "opt": [1, 1], "max": [1, TINY_CONTEXT]}
    assert decode["shapes"]["logits_index"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 1]}
    for profile in (prefill, decode):
        cache = profile["shapes"]["past.0.key"]
        assert cache["min"] == cache["opt"] == cache["max"] == [1, 2, TINY_CONTEXT, 32]
    assert TensorRTBuildPlan.from_manifest(manifest["engine"]).profiles()[0]["shapes"]["input_ids"]["opt"] == \
        [1, TINY_CONTEXT]  # the default opt (512) is clipped to the context
    assert (plan.profile_for(1), plan.profile_for(7)) == (1, 0)
    with pytest.raises(AgentOptError, match="1 to 96"):
        plan.profile_for(TINY_CONTEXT + 1)


def test_batched_profiles():
    section = {"batch_size": 4, "context_length": 256, "caches": [{"input": "past.0.key", "shape": [4, 2, 256, 8]}],
               "multi_logits": True}
    prefill, decode = TensorRTBuildPlan.from_manifest(section, {"timing_cache": "off"}).profiles()
    assert prefill["shapes"]["input_ids"] == {"min": [4, 1], "opt": [4, 256], "max": [4, 256]}
    assert decode["shapes"]["positions"]["max"] == [4, 1] and decode["shapes"]["logits_index"]["max"] == [4, 1]
    old = {k: v for k, v in section.items() if k != "multi_logits"}  # compiled before multi-position logits
    assert TensorRTBuildPlan.from_manifest(old, {"timing_cache": "off"}).profiles()[0]["shapes"]["logits_index"] == \
        {"min": [4], "opt": [4], "max": [4]}


def test_options_validation_and_recorded_options(manifest):
    engine = manifest["engine"]
    with pytest.raises(AgentOptError, match="precision 'int3'.*fp32, fp16, bf16"):
        TensorRTBuildPlan.from_manifest(engine, {"precision": "int3"})
    with pytest.raises(AgentOptError, match="unknown TensorRT option.*max_batch"):
        TensorRTBuildPlan.from_manifest(engine, {"max_batch": 8})
    with pytest.raises(AgentOptError, match="fp16 ONNX, but this engine's ONNX is float32"):
        TensorRTBuildPlan.from_manifest(engine, {"precision": "fp16"})  # strong typing cannot make fp16 from fp32
    plan = TensorRTBuildPlan.from_manifest(engine, {"precision": "bf16", "typing": "constraints",
                                                    "workspace_bytes": 1 << 30, "timing_cache": "/tmp/t.cache"})
    assert plan.builder_flags("10.14.1") == ["BF16", "OBEY_PRECISION_CONSTRAINTS"]
    with pytest.raises(AgentOptError, match="needs TensorRT 10.x; TensorRT 11.4.0 removed weak typing"):
        plan.builder_flags("11.4.0")
    assert TensorRTBuildPlan.from_manifest(engine).builder_flags("11.4.0") == []
    # a rebuild keeps the recorded options unless told otherwise
    recorded = {**engine, "tensorrt": {"plan": plan.to_dict()}}
    again = TensorRTBuildPlan.from_manifest(recorded)
    assert (again.precision, again.typing, again.workspace_bytes, again.timing_cache) == \
        ("bf16", "constraints", 1 << 30, "/tmp/t.cache")
    assert TensorRTBuildPlan.from_manifest(recorded, {"precision": "fp32"}).precision == "fp32"
    assert TensorRTBuildPlan.from_manifest(engine, {"timing_cache": "off"}).timing_cache is None


def test_fp32_islands_cover_norms_lm_head_and_softmax(trt_engine_dir):
    model = onnx.load(str(trt_engine_dir / "model.onnx"), load_external_data=False)
    kept = island_nodes(model, DEFAULT_ISLANDS)
    by_name = {n.name: n for n in model.graph.node}
    ops = sorted({by_name[name].op_type for name in kept})
    assert "RMSNormalization" in ops and "MatMul" in ops  # the norms and lm_head
    norms = [n.name for n in model.graph.node if n.op_type == "RMSNormalization"]
    assert set(norms) <= set(kept) and len(norms) == 5  # 2 layers x 2 + final norm
    matmuls = [name for name in kept if by_name[name].op_type == "MatMul"]
    assert len(matmuls) == 1  # lm_head only: q/k/v/o and MLP projections stay in reduced precision
    # TensorRT layers: softmax by layer type, the rest through their ONNX node
    assert matches_island(["node_Attention_61_softmax", "SOFTMAX"], DEFAULT_ISLANDS)
    assert not matches_island(["node_linear_3", "MATRIX_MULTIPLY"], DEFAULT_ISLANDS)
    assert onnx_node_of("anything", "[ONNX Layer: node_linear_10]", []) == "node_linear_10"
    assert onnx_node_of("node_linear_10_cast", "", ["node_linear_1", "node_linear_10"]) == "node_linear_10"


def test_compatibility_messages():
    here = dict(FAKE_TARGET)
    assert check_compatible(FAKE_TARGET, here, "eng") is None
    other_gpu = {**here, "gpu": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}
    message = check_compatible(FAKE_TARGET, other_gpu, "eng")
    assert "NVIDIA H100 80GB HBM3 (compute capability 9.0)" in message
    assert "NVIDIA A100-SXM4-80GB (compute capability 8.0)" in message
    assert "compute capability, GPU differ" in message and message.endswith("agentopt rebuild eng")
    message = check_compatible(FAKE_TARGET, {**here, "tensorrt": "11.4.0"}, "eng")
    assert "TensorRT 10.14.1" in message and "TensorRT 11.4.0" in message and "TensorRT version differ" in message
    assert "agentopt rebuild eng" in check_compatible(None, here, "eng")
