import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import agentopt_compiler as ao
from agentopt_compiler.capture.export import capture
from agentopt_compiler.capture.quantized_linear import dequantize_blockwise, quantize_blockwise
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.passes.assign_layer_precision import AssignLayerPrecision
from agentopt_compiler.passes.infra import op_histogram
from agentopt_compiler.passes.precision_plan import PrecisionPlan, unit_of
from agentopt_compiler.passes.pipeline import default_pipeline


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_quantization_round_trip(bits, symmetric):
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    qweight, scales, zeros = quantize_blockwise(weight, bits, 32, symmetric)
    assert qweight.shape == (6, 2, 32 * bits // 8) and scales.shape == (6, 2)
    assert (zeros.numel() == 0) == symmetric  # symmetric blocks store no zero points
    restored = dequantize_blockwise(qweight, scales, zeros, bits, 32, 64)
    if symmetric:  # a block may clip its outliers (see the next test); the others are within half a step
        assert (restored - weight).abs().max() <= scales.abs().max() * 4
        assert (restored - weight).abs().median() <= scales.abs().median() / 2
    else:
        assert (restored - weight).abs().max() <= scales.max() / 2 + 1e-6  # at most half a step per value


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_scales_use_all_levels_and_the_best_clip(bits):
    """Per block, the chosen scale's squared error is no worse than mapping the signed extreme onto the lowest level
    (ratio 1), and in total clearly better than the absmax / (2^(bits-1) - 1) scaling that wastes a level."""
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    middle = 1 << (bits - 1)

    def block_errors(scales):
        blocks = weight.reshape(64, 8, 32)
        q = torch.clamp(torch.round(blocks / scales[..., None]) + middle, 0, 2 * middle - 1)
        return ((q - middle) * scales[..., None] - blocks).square().sum(-1)

    qweight, scales, zeros = quantize_blockwise(weight, bits, 32, symmetric=True)
    chosen = ((dequantize_blockwise(qweight, scales, zeros, bits, 32, 256) - weight).reshape(64, 8, 32)
              .square().sum(-1))
    torch.testing.assert_close(chosen, block_errors(scales))
    blocks = weight.reshape(64, 8, 32)
    extreme = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
    assert (chosen <= block_errors(extreme / -middle) + 1e-12).all()
    absmax = block_errors(blocks.abs().amax(-1) / (middle - 1)).sum()
    assert chosen.sum() < (0.85 if bits == 4 else 1.0) * absmax  # int8: 255 vs 256 levels, the clip search helps


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [4, 8])
def test_our_layout_is_what_ort_matmul_nbits_reads(bits, symmetric):
    """One MatMulNBits node fed our packed weights equals x @ dequantized(W)^T (symmetric: no zero-point input,
    ORT's default zero point)."""
    from agentopt_compiler.backends.onnxruntime.contrib_schemas import register_ort_contrib_schema

    register_ort_contrib_schema("MatMulNBits")
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    qweight, scales, zeros = quantize_blockwise(weight, bits, 32, symmetric)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    inputs = ["x", "q", "s"] if symmetric else ["x", "q", "s", "z"]
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=64, N=16,
                            bits=bits, block_size=32, accuracy_level=0)
    initializers = [numpy_helper.from_array(qweight.numpy(), "q"), numpy_helper.from_array(scales.numpy(), "s")]
    if not symmetric:
        initializers.append(numpy_helper.from_array(zeros.numpy(), "z"))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 16])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(
        "com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = x @ dequantize_blockwise(qweight, scales, zeros, bits, 32, 64).numpy().T
    assert np.abs(session.run(None, {"x": x})[0] - expected).max() <= 1e-4


def test_units():
    assert unit_of("layers.3.self_attn.qkv_proj") == "layers.3.attn_qkv"
    assert unit_of("layers.3.mlp.up_proj") == "layers.3.mlp_gate_up" and unit_of("lm_head") == "lm_head"
    assert unit_of("embed_tokens") is None
    with pytest.raises(AgentOptError, match="unit lm_head: unknown precision 'int3'"):
        PrecisionPlan({"lm_head": "int3"})
    for bad in ("int4@48", "fp16@64", "int4@"):
        with pytest.raises(AgentOptError, match="int4@128"):  # the message shows the form that works
            PrecisionPlan({"lm_head": bad})
    plan = PrecisionPlan({"lm_head": "int4@128", "layers.0.mlp_down": "int8"}, block_size=64)
    assert (plan.precision_of("lm_head"), plan.block_of("lm_head")) == ("int4", 128)
    assert (plan.precision_of("layers.0.mlp_down"), plan.block_of("layers.0.mlp_down")) == ("int8", 64)
    assert PrecisionPlan.load(plan.to_dict()) == plan


def test_applies_the_plan_unit_by_unit(tiny_model):
    program, _ = default_pipeline().run(capture(tiny_model, 32))
    gm = program.module
    plan = PrecisionPlan({"layers.0.mlp_down": "int4", "layers.1.attn_qkv": "int8", "lm_head": "fp16"})
    before = op_histogram(gm)
    result = AssignLayerPrecision(plan)(gm)
    after = op_histogram(gm)
    assert result.stats == {"int4_linears": 1, "int8_linears": 1}
    assert before["aten.linear.default"] - after["aten.linear.default"] == 2
    assert after["agentopt.weight_only_linear.default"] == 2
    assert any("fp16 (it gives no speed" in request for request in result.unmet)
    assert not AssignLayerPrecision(None)(program.module).modified


def _engine_and_quantized_reference(engine, plan, seed: int):
    """Logits of a tiny-random engine compiled with ``plan`` and of its eager reference (the pipeline's graph, whose
    weight_only_linear computes with the same dequantized weights in fp32), on 10 random tokens; asserts they are
    close (MatMulNBits at accuracy level 4 quantizes activations to int8 per block: close, not bit-equal)."""
    from agentopt_compiler.models.registry import load_model

    program, _ = default_pipeline(precision=plan).run(capture(load_model("tiny-random").model, 32))
    ids = np.random.default_rng(seed).integers(0, 300, size=(1, 10))
    with torch.no_grad():
        expected = program.module(torch.from_numpy(ids), torch.arange(10)[None], torch.tensor([[9]])).numpy()
    logits = engine.session.run(ids, np.arange(10))
    assert np.abs(logits - expected).max() <= 0.05 * np.abs(expected).max()
    return logits, expected


def test_engine_with_a_plan_tracks_its_quantized_eager_reference(tmp_path, capsys):
    plan = PrecisionPlan.uniform("int4", 2, lm_head="int8")
    engine = ao.compile("tiny-random", out=tmp_path / "q", context_length=32, precision_plan=plan)
    ops = {layer["op"] for layer in engine.manifest["engine"]["attention"]["layers"]}
    assert ops == {"GroupQueryAttention"} and engine.manifest["precision_plan"]["units"]["lm_head"] == "int8"
    logits, expected = _engine_and_quantized_reference(engine, plan, seed=0)
    assert logits.argmax() == expected.argmax()
    from agentopt_compiler.cli.main import main

    assert main(["inspect", str(tmp_path / "q")]) == 0  # says what the weights are, not only "float32"
    assert "weights  precision plan: 8 x int4, 1 x int8 unit(s)" in capsys.readouterr().out


def test_symmetric_plan_engine_has_no_zero_points_and_tracks_its_reference(tmp_path):
    import onnx

    plan = PrecisionPlan.uniform("int4", 2, symmetric=True)
    assert PrecisionPlan.load(plan.to_dict()).symmetric
    engine = ao.compile("tiny-random", out=tmp_path / "s", context_length=32, precision_plan=plan)
    graph = onnx.load(str(tmp_path / "s" / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 5 + 1 and all(len(n.input) == 3 for n in nbits)  # (gate and up: two matmuls)
    _engine_and_quantized_reference(engine, plan, seed=2)


def test_a_unit_can_have_its_own_block_size(tmp_path):
    """int4@128 on one unit, the plan's block 32 on another: each gets its own scales, MatMulNBits block_size and the
    engine tracks the eager reference; a block that does not divide the in-features keeps that unit fp32."""
    import onnx

    plan = PrecisionPlan({"layers.0.mlp_down": "int4@128", "layers.1.mlp_down": "int4",
                          "layers.0.attn_qkv": "int4@128"})  # qkv in-features 64: no 128-blocks
    from agentopt_compiler.models.registry import load_model

    program, _ = default_pipeline().run(capture(load_model("tiny-random").model, 32))
    gm = program.module
    result = AssignLayerPrecision(plan)(gm)
    assert result.stats == {"int4_linears": 2}
    assert result.unmet == ("layers.0.attn_qkv: int4@128 (in_features 64 is not a multiple of block 128; kept "
                            "fp32: give it a block that divides 64, e.g. int4@16)",)
    blocks = sorted(n.args[5] for n in gm.graph.nodes if str(n.target) == "agentopt.weight_only_linear.default")
    assert blocks == [32, 128]

    engine = ao.compile("tiny-random", out=tmp_path / "b", context_length=32, precision_plan=plan)
    nbits = [n for n in onnx.load(str(tmp_path / "b" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert sorted(next(a.i for a in n.attribute if a.name == "block_size") for n in nbits) == [32, 128]
    _engine_and_quantized_reference(engine, plan, seed=3)


def test_standard_impl_refuses_quantized_units(tmp_path):
    with pytest.raises(AgentOptError, match="MatMulNBits.*--attention-impl gqa"):
        ao.compile("tiny-random", out=tmp_path / "q", context_length=32, attention_impl="standard",
                   precision_plan=PrecisionPlan.uniform("int8", 2))
    assert not (tmp_path / "q").exists()


class _HalfLinear(torch.nn.Module):
    """Eager reference for a half-precision region: the same casts around the same linear."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.linear, self.dtype = linear, dtype

    def forward(self, x):
        bias = None if self.linear.bias is None else self.linear.bias.to(self.dtype)
        return torch.nn.functional.linear(x.to(self.dtype), self.linear.weight.to(self.dtype), bias).float()


HALF_PLAN = {"layers.0.mlp_down": "fp16", "layers.1.attn_o": "bf16", "lm_head": "fp16"}


def _half_reference(plan_units: dict):
    import copy

    from agentopt_compiler.models.registry import load_model

    model = copy.deepcopy(load_model("tiny-random").model)
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for unit, precision in plan_units.items():
        if unit == "lm_head":
            model.lm_head = _HalfLinear(model.lm_head, dtypes[precision])
            continue
        _, index, group = unit.split(".")
        layer = model.layers[int(index)]
        owner, name = {"mlp_down": (layer.mlp, "down_proj"), "attn_o": (layer.self_attn, "o_proj")}[group]
        setattr(owner, name, _HalfLinear(getattr(owner, name), dtypes[precision]))
    model.setup_cache(1, 32)
    return model


def test_half_precision_regions_where_the_target_has_half_kernels(tiny_model):
    plan = PrecisionPlan(dict(HALF_PLAN))
    full, _ = default_pipeline().run(capture(tiny_model, 32))
    half, records = default_pipeline(precision=plan, half_precision=True).run(capture(tiny_model, 32))
    before, after = op_histogram(full.module), op_histogram(half.module)
    assert records[-1].stats == {"fp16_linears": 2, "bf16_linears": 1}
    assert after["aten.linear.default"] == before["aten.linear.default"]  # same matmuls, now typed
    assert after["aten._to_copy.default"] - before.get("aten._to_copy.default", 0) == 6  # a cast in, a cast out
    half_weights = {n: b.dtype for n, b in half.module.named_buffers() if b.dtype != torch.float32}
    assert sorted(str(d) for d in half_weights.values()) == ["torch.bfloat16", "torch.float16", "torch.float16"]

    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 300, size=(1, 10)))
    args = (ids, torch.arange(10)[None], torch.tensor([[9]]))
    with torch.no_grad():
        got, fp32 = half.module(*args), full.module(*args)
        expected = _half_reference(HALF_PLAN)(*args)
    # equal to the eager model with the same casts; measurably different from fp32 (the casts are real)
    assert (got - expected).abs().max() <= 1e-3 * expected.abs().max()
    assert (fp32 - expected).abs().max() > 10 * (got - expected).abs().max()


def test_half_regions_lower_to_typed_onnx_that_ort_runs(tmp_path, tiny_model):
    import onnx

    from agentopt_compiler.backends.onnxruntime.lower import lower_to_onnx
    from agentopt_compiler.backends.onnxruntime.session import OrtSession

    plan = PrecisionPlan({"layers.0.mlp_down": "fp16", "lm_head": "fp16"})  # ORT CPU has fp16 MatMul, not bf16
    program, _ = default_pipeline(precision=plan, half_precision=True).run(capture(tiny_model, 32))
    section = lower_to_onnx(program, tmp_path, attention_impl="gqa")
    graph = onnx.load(str(tmp_path / section["graph"])).graph
    to_half = [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT16]
    half_weights = [i for i in graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert len(to_half) == 2 and len(half_weights) == 2

    session = OrtSession(tmp_path, {**section, "context_length": 32, "batch_size": 1})
    ids = np.random.default_rng(1).integers(0, 300, size=(1, 10))
    with torch.no_grad():
        expected = program.module(torch.from_numpy(ids), torch.arange(10)[None], torch.tensor([[9]])).numpy()
    logits = session.run(ids, np.arange(10))
    assert np.abs(logits - expected).max() <= 1e-2 * np.abs(expected).max()
