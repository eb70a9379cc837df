"""The ONNX handed to TensorRT, checked and run here on ONNX Runtime CPU, and the missing-TensorRT error."""

import importlib.util
import json

import numpy as np
import onnx
import pytest

from agentopt_compiler.backends.onnxruntime.session import OrtSession
from agentopt_compiler.backends.tensorrt.lower import check_onnx_for_tensorrt, lower_to_tensorrt
from agentopt_compiler.errors import AgentOptError
from tests.conftest import TINY_CONTEXT, eager_greedy

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def test_onnx_for_tensorrt_is_standard_and_valid(trt_engine_dir):
    check_onnx_for_tensorrt(trt_engine_dir / "model.onnx")  # onnx.checker full_check + standard domains
    model = onnx.load(str(trt_engine_dir / "model.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = {n.op_type for n in model.graph.node}
    assert {"Attention", "ScatterND"} <= ops and "GroupQueryAttention" not in ops
    assert [o.name for o in model.graph.output][0] == "logits"


def test_gqa_onnx_is_refused_for_tensorrt(tiny_engine_dir):
    with pytest.raises(AgentOptError, match="com.microsoft::GroupQueryAttention.*--attention-impl standard"):
        check_onnx_for_tensorrt(tiny_engine_dir / "model.onnx")


def _session(folder):
    engine = json.loads((folder / "manifest.json").read_text())["engine"]
    # run TensorRT's ONNX with ORT's copy protocol: past fed, present returned (no aliasing assumed)
    return OrtSession(folder, {**engine, "cache_update": "copy"}, device="cpu", threads=1)


def test_onnx_for_tensorrt_matches_the_ort_engine_on_cpu(trt_engine_dir, tiny_engine):
    trt_onnx, ort_engine = _session(trt_engine_dir), tiny_engine.session
    ort_engine.reset()
    ids = np.random.default_rng(1).integers(0, 300, size=(1, 12))
    worst = 0.0
    for a, b in [(0, 9), (9, 10), (10, 11), (11, 12)]:  # prefill, then decode steps reading the cache
        positions = np.arange(a, b)
        expected = ort_engine.run(ids[:, a:b], positions)
        worst = max(worst, float(np.abs(trt_onnx.run(ids[:, a:b], positions) - expected).max()))
    assert worst <= 1e-4


def test_onnx_for_tensorrt_greedy_tokens_match_eager(trt_engine_dir, tiny_model):
    session, prompt = _session(trt_engine_dir), [5, 17, 99, 3, 250, 8]
    logits = session.run(np.array([prompt]), np.arange(len(prompt)))
    tokens, length = [], len(prompt)
    for _ in range(8):
        tokens.append(int(logits[0, -1].argmax()))
        logits = session.run(np.array([[tokens[-1]]]), np.array([length]))
        length += 1
    assert tokens == eager_greedy(tiny_model, prompt, 8, TINY_CONTEXT)


def test_lowering_refuses_contrib_attention(tmp_path):
    with pytest.raises(AgentOptError, match="'gqa' is not available for tensorrt"):
        lower_to_tensorrt(program=None, folder=tmp_path, attention_impl="gqa")


def test_compile_for_tensorrt_needs_standard_attention(tmp_path):
    import agentopt_compiler as ao

    with pytest.raises(AgentOptError, match="'gqa' is not available for backend 'tensorrt'; choose one of: standard"):
        ao.compile("tiny-random", out=tmp_path / "eng", backend="tensorrt", device="cuda", attention_impl="gqa")
    with pytest.raises(AgentOptError, match="does not run on device 'cpu'"):
        ao.compile("tiny-random", out=tmp_path / "eng", backend="tensorrt", attention_impl="standard")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_missing_tensorrt_fails_cleanly_and_leaves_no_engine(tmp_path):
    import agentopt_compiler as ao

    out = tmp_path / "eng"
    with pytest.raises(AgentOptError) as info:
        ao.compile("tiny-random", out=out, backend="tensorrt", device="cuda", attention_impl="standard",
                   context_length=32)
    message = str(info.value)
    assert "TensorRT is not installed" in message
    assert "pip install 'agentopt-compiler[tensorrt]' on a machine with an NVIDIA GPU and driver" in message
    assert "passed onnx.checker" in message and "agentopt rebuild DIR" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no engine, no temporary folder
