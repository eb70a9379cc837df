"""Both lowerings of the fused attention op, run by ORT with its own graph optimizations off (so ORT cannot hide a
missed fusion), against the eager reference: prefill in chunks, then 32 decode steps; and the zero-copy decode."""

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from agentopt_compiler.backends.onnxruntime.lower import lower_to_onnx
from agentopt_compiler.backends.onnxruntime.session import OrtSession
from agentopt_compiler.capture.export import capture
from agentopt_compiler.models.config import ModelConfig
from agentopt_compiler.models.registry import build_model, load_model
from agentopt_compiler.passes.pipeline import default_pipeline

CONTEXT = 64
MISTRAL = ModelConfig(family="mistral", vocab_size=200, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=128, sliding_window=8)


def _model(name):
    return build_model(MISTRAL, seed=5) if name == "window-8" else load_model("tiny-random").model


def _lower(model, folder, impl):
    program, _ = default_pipeline().run(capture(model, CONTEXT))
    section = lower_to_onnx(program, folder, attention_impl=impl)
    session = OrtSession(folder, {**section, "context_length": CONTEXT, "batch_size": 1}, optimize=False)
    graph = onnx.load(str(folder / section["graph"])).graph
    return section, session, graph


@pytest.mark.parametrize("impl", ["gqa", "standard"])
@pytest.mark.parametrize("model_name", ["tiny-random", "window-8"])
def test_lowering_matches_eager_over_chunked_prefill_and_32_decode_steps(impl, model_name, tmp_path):
    section, session, graph = _lower(_model(model_name), tmp_path, impl)
    ops = Counter(n.op_type for n in graph.node)
    if impl == "gqa":
        assert ops["GroupQueryAttention"] == 2 and ops["ScatterND"] == 0 and ops["Transpose"] == 0
        assert ops["SkipSimplifiedLayerNormalization"] == 3 and ops["MatMul"] == 2 * 5 + 1  # packed q/k/v
        # ... fed to GQA whole: no Split, key and value inputs empty
        assert ops["Split"] == 0 and section["lowering_rules"]["packed_qkv"] == 2
        assert all(list(n.input[1:3]) == ["", ""] for n in graph.node if n.op_type == "GroupQueryAttention")
    else:
        assert ops["Attention"] == 2 and ops["ScatterND"] == 4 and ops["RMSNormalization"] == 5
        assert not [n for n in graph.node if n.domain == "com.microsoft"]
        cache_inputs = {c["input"] for c in section["caches"]}
        assert not [n for n in graph.node if n.op_type == "Transpose" and set(n.input) & cache_inputs]
    reference = _model(model_name)
    reference.setup_cache(1, CONTEXT)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 200, size=(1, 14))
    worst, position = 0.0, 0
    with torch.no_grad():
        for chunk in (prompt[:, :5], prompt[:, 5:6], prompt[:, 6:14]):  # the prompt fed in pieces
            positions = np.arange(position, position + chunk.shape[1])
            expected = reference(torch.from_numpy(chunk), torch.from_numpy(positions)).numpy()[:, -1:]
            logits = session.run(chunk, positions)
            worst = max(worst, float(np.abs(logits - expected).max()))
            position += chunk.shape[1]
        for _ in range(32):
            token = np.array([[int(expected[0, -1].argmax())]])
            expected = reference(torch.from_numpy(token), torch.tensor([position])).numpy()[:, -1:]
            logits = session.run(token, np.array([position]))
            worst = max(worst, float(np.abs(logits - expected).max()))
            position += 1
    assert worst <= 1e-4


def test_window_survives_lowering(tmp_path):
    section, _, graph = _lower(_model("window-8"), tmp_path, "gqa")
    windows = [a.i for n in graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
               if a.name == "local_window_size"]
    assert windows == [8, 8]


def test_decode_is_zero_copy_and_greedy_tokens_equal_eager(tmp_path, tiny_engine_dir):
    from agentopt_compiler.runtime.engine import load_engine
    from tests.conftest import TINY_CONTEXT, eager_greedy

    engine = load_engine(tiny_engine_dir)
    session = engine.session
    assert session.in_place
    before = session.cache_addresses()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    tokens = engine.generate_ids(prompt, max_new_tokens=33, ignore_eos=True)
    assert session.cache_addresses() == before  # the same buffers throughout
    # the presents were written into the past buffers: rows 0..len-1 are filled, the rest untouched
    key = session.read_cache(session.capacity)["past.0.key"]
    filled = np.abs(key[0, 0]).sum(axis=-1) > 0
    assert filled[: len(prompt) + 32].all() and not filled[len(prompt) + 32:].any()
    assert tokens == eager_greedy(load_model("tiny-random").model, prompt, 33, TINY_CONTEXT)


def test_packed_qkv_rule_needs_a_packed_split_feeding_gqa_directly(tmp_path, tiny_model):
    from agentopt_compiler.passes.pipeline import default_pipeline as pipeline

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    unpacked, _ = pipeline().run(capture(tiny_model, CONTEXT), skip={"pack_qkv_projections"})
    assert lower_to_onnx(unpacked, tmp_path / "a", attention_impl="gqa")["lowering_rules"]["packed_qkv"] == 0
    half, _ = pipeline(kv_cache_dtype="fp16").run(capture(tiny_model, CONTEXT))  # casts between Split and GQA
    assert lower_to_onnx(half, tmp_path / "b", attention_impl="gqa")["lowering_rules"]["packed_qkv"] == 0


@pytest.mark.parametrize("x_shape, skip_shape, fused", [
    ([1, 3, 8], [8], 0),  # x + bias broadcasts: the contrib op adds equal shapes only
    ([1, 2, 3, 8], [1, 2, 3, 8], 0),  # 4-D, e.g. RoPE's add on (B, H, S, D) before a q/k norm: its kernel refuses it
    ([1, 3, 8], [1, 3, 8], 1),  # a residual add, as in every decoder layer
])
def test_skip_rms_norm_rule_fires_only_on_an_equal_shape_2d_or_3d_add(x_shape, skip_shape, fused):
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from agentopt_compiler.backends.onnxruntime.skip_rms_norm import fuse_skip_rms_norm

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "skip"], ["h"]),
         helper.make_node("RMSNormalization", ["h", "w"], ["y"], epsilon=1e-6)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
              helper.make_tensor_value_info("skip", TensorProto.FLOAT, skip_shape),
              helper.make_tensor_value_info("w", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert fuse_skip_rms_norm(model) == fused
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(x_shape, dtype=np.float32), "skip": rng.standard_normal(skip_shape, np.float32),
             "w": rng.standard_normal(8, dtype=np.float32)}
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    h = feeds["x"] + feeds["skip"]  # what is left runs, and computes the eager RMS norm
    want = h / np.sqrt((h * h).mean(-1, keepdims=True) + 1e-6) * feeds["w"]
    np.testing.assert_allclose(session.run(["y"], feeds)[0], want, rtol=1e-5, atol=1e-5)
