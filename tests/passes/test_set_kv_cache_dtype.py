import numpy as np
import pytest
import torch

import agentopt_compiler as ao
from agentopt_compiler.backends.onnxruntime.lower import lower_to_onnx
from agentopt_compiler.capture.export import capture
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.models.registry import load_model
from agentopt_compiler.passes.infra import op_histogram
from agentopt_compiler.passes.pipeline import default_pipeline
from agentopt_compiler.passes.set_kv_cache_dtype import SetKVCacheDtype

CONTEXT = 48


def _logits(module, ids, start):
    positions = torch.arange(start, start + ids.shape[1])[None]
    with torch.no_grad():
        return module(torch.from_numpy(ids), positions, torch.tensor([[ids.shape[1] - 1]])).numpy()


def _worst_relative_error(session, module, sizes) -> tuple[float, int]:
    """Feed random calls of ``sizes`` tokens (chunked prefill, then decode steps) to a fresh ``session``; the worst
    logits error relative to ``module`` run on the same calls, and the tokens fed."""
    session.reset()
    rng = np.random.default_rng(1)
    start, worst = 0, 0.0
    for size in sizes:
        ids = rng.integers(0, 300, size=(1, size))
        expected = _logits(module, ids, start)
        logits = session.run(ids, np.arange(start, start + size))
        worst = max(worst, float(np.abs(logits - expected).max() / np.abs(expected).max()))
        start += size
    return worst, start


def test_half_caches_change_only_the_cache_dtype_and_the_attention_precision(tiny_model):
    full, _ = default_pipeline().run(capture(tiny_model, CONTEXT))
    half, records = default_pipeline(kv_cache_dtype="fp16").run(capture(tiny_model, CONTEXT))
    assert records[-2].name == "set_kv_cache_dtype" and records[-2].stats == {"fp16_caches": 4}
    assert op_histogram(half.module) == op_histogram(full.module)  # same ops; the fused op casts inside
    caches = {n: b.dtype for n, b in half.module.named_buffers() if "kv_cache" in n}
    assert len(caches) == 4 and set(caches.values()) == {torch.float16}
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 20))
    got, expected = _logits(half.module, ids, 0), _logits(full.module, ids, 0)
    assert got.dtype == np.float32
    assert 0 < np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()  # fp16 attention: close, not equal


def test_no_dtype_or_fp32_changes_nothing_and_half_needs_fused_attention(tiny_model):
    program, _ = default_pipeline().run(capture(tiny_model, CONTEXT))
    assert not SetKVCacheDtype(None)(program.module).modified
    assert not SetKVCacheDtype("fp32")(program.module).modified
    with pytest.raises(AgentOptError, match="needs fused attention"):
        SetKVCacheDtype("fp16")(capture(tiny_model, CONTEXT).module)
    with pytest.raises(AgentOptError, match="'int4' is not available"):
        SetKVCacheDtype("int4")


@pytest.mark.parametrize("impl, sparse", [("gqa", None), ("standard", None), ("gqa", "window=6,sinks=2")])
def test_half_cache_engine_tracks_its_eager_reference_over_prefill_and_decode(impl, sparse, tmp_path):
    context = 128 if sparse else CONTEXT  # room for a ring (sinks + window + spare slots) and for it to wrap
    engine = ao.compile("tiny-random", out=tmp_path / "e", context_length=context, attention_impl=impl,
                        kv_cache_dtype="fp16", sparse_attention=sparse)
    assert {c["dtype"] for c in engine.manifest["engine"]["caches"]} == {"float16"}
    assert any(layer["ring"] for layer in engine.manifest["engine"]["attention"]["layers"]) == bool(sparse)
    from agentopt_compiler.passes.insert_sparse_attention import SparseAttentionPlan

    reference, _ = default_pipeline(SparseAttentionPlan.load(sparse), kv_cache_dtype="fp16").run(
        capture(load_model("tiny-random").model, context))
    session = engine.session
    worst, start = _worst_relative_error(session, reference.module, (12, 60 if sparse else 1, 1, 7, 1, 1))
    assert worst <= 1e-2
    if not sparse:  # (ring caches hold sinks + window + spare slots)
        rows = session.read_cache(start)
        assert all(a.dtype == np.float16 and a.shape[2] == start for a in rows.values())
    assert engine.manifest["passes"][-2]["stats"] == {"fp16_caches": 4}


def test_half_cache_gqa_passes_the_cuda_kernel_check(tmp_path, tiny_model):
    program, _ = default_pipeline(kv_cache_dtype="fp16").run(capture(tiny_model, 16))
    section = lower_to_onnx(program, tmp_path, attention_impl="gqa", device="cuda")
    assert {layer["op"] for layer in section["attention"]["layers"]} == {"GroupQueryAttention"}


def _int8_scales(context=CONTEXT):
    from agentopt_compiler.analysis.calibration import calibration_batches
    from agentopt_compiler.analysis.kv_quantization import RANDOM_TOKEN_PEAK_LEVEL, kv_cache_scales

    loaded = load_model("tiny-random")  # what the compile calibrates on without --kv-calib
    return kv_cache_scales(loaded.model, calibration_batches(loaded, None, 4, context, seed=77), None,
                           RANDOM_TOKEN_PEAK_LEVEL)


def test_int8_caches_store_scaled_codes_and_change_nothing_else(tiny_model):
    scales = _int8_scales()
    full, _ = default_pipeline().run(capture(tiny_model, CONTEXT))
    quantized, records = default_pipeline(kv_cache_dtype="int8", kv_scales=scales).run(capture(tiny_model, CONTEXT))
    assert records[-2].stats == {"int8_caches": 4}
    assert op_histogram(quantized.module) == op_histogram(full.module)  # same ops; the fused op quantizes inside
    caches = {n: b.dtype for n, b in quantized.module.named_buffers() if "kv_cache" in n}
    assert len(caches) == 4 and set(caches.values()) == {torch.int8}
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 20))
    got, expected = _logits(quantized.module, ids, 0), _logits(full.module, ids, 0)
    assert 0 < np.abs(got - expected).max() <= 2e-2 * np.abs(expected).max()  # int8 K/V: close, not equal
    # K per head (one scale across a head's channels, sqrt(2) above its pre-RoPE peak), V per channel
    k_scale, v_scale = scales[0]
    assert k_scale.shape == v_scale.shape == (2 * 32,)
    assert torch.equal(k_scale.view(2, 32), k_scale.view(2, 32)[:, :1].expand(2, 32))
    assert len(set(v_scale.tolist())) > 2


def test_int8_codes_are_the_round_trip_of_the_values():
    from agentopt_compiler.capture.custom_ops import dequantize_kv, quantize_kv

    x = torch.randn(1, 2, 5, 8)
    scale = torch.rand(16) * 0.02 + 0.01
    codes = quantize_kv(x, scale)
    assert codes.dtype == torch.int8
    step = scale.view(1, 2, 1, 8)
    inside = (x / step).abs() <= 127
    error = (dequantize_kv(codes, scale, torch.float32) - x).abs()
    assert bool((error[inside] <= step.expand_as(x)[inside] / 2 + 1e-7).all())  # rounding, within half a step
    assert int(codes.max()) <= 127 and int(codes.min()) >= -128  # beyond the range: clipped


def test_int8_caches_need_scales_and_no_ring(tiny_model):
    program, _ = default_pipeline().run(capture(tiny_model, CONTEXT))
    with pytest.raises(AgentOptError, match="needs per-channel scales"):
        SetKVCacheDtype("int8")(program.module)
    with pytest.raises(AgentOptError, match="1 scale pairs for 2"):
        SetKVCacheDtype("int8", _int8_scales()[:1])(program.module)
    from agentopt_compiler.passes.insert_sparse_attention import SparseAttentionPlan

    with pytest.raises(AgentOptError, match="not available with ring caches"):
        default_pipeline(SparseAttentionPlan.load("window=6,sinks=2"), kv_cache_dtype="int8",
                         kv_scales=_int8_scales(128)).run(capture(tiny_model, 128))


@pytest.mark.parametrize("impl, op", [("gqa", "GroupQueryAttention"), ("standard", "Attention")])
def test_int8_cache_engine_matches_its_eager_reference(impl, op, tmp_path):
    """ORT's GroupQueryAttention stores and reads int8 caches itself (k/v_quant_type PER_CHANNEL); the standard
    lowering quantizes around ScatterND and Attention. Both compute what the eager op computes with the same scales."""
    engine = ao.compile("tiny-random", out=tmp_path / "e", context_length=CONTEXT, attention_impl=impl,
                        kv_cache_dtype="int8")
    assert {c["dtype"] for c in engine.manifest["engine"]["caches"]} == {"int8"}
    assert {layer["op"] for layer in engine.manifest["engine"]["attention"]["layers"]} == {op}
    reference, _ = default_pipeline(kv_cache_dtype="int8", kv_scales=_int8_scales()).run(
        capture(load_model("tiny-random").model, CONTEXT))
    session = engine.session
    worst, start = _worst_relative_error(session, reference.module, (12, 1, 1, 7, 1, 1))
    assert worst <= 1e-5
    rows = session.read_cache(start)
    assert all(a.dtype == np.int8 and a.shape[2] == start for a in rows.values())


def test_kv_calib_text_calibrates_the_scales_and_needs_int8(tmp_path):
    from agentopt_compiler.analysis.kv_quantization import kv_cache_scales

    text = tmp_path / "calib.txt"
    text.write_text("The agent reads the file, calls a tool and answers. " * 40)
    with pytest.raises(AgentOptError, match="add --kv-cache-dtype int8"):
        ao.compile("tiny-random", out=tmp_path / "x", context_length=32, kv_calib=text)
    engine = ao.compile("tiny-random", out=tmp_path / "e", context_length=32, kv_cache_dtype="int8", kv_calib=text)
    assert {c["dtype"] for c in engine.manifest["engine"]["caches"]} == {"int8"}
    model, batch = load_model("tiny-random").model, [torch.randint(0, 300, (1, 16))]
    one, two = kv_cache_scales(model, batch), kv_cache_scales(model, batch, peak_level=127 // 2)
    assert all(torch.allclose(b, 127 / 63 * a) for pair_one, pair_two in zip(one, two)
               for a, b in zip(pair_one, pair_two))


def test_inspect_reports_kv_bytes_per_token(tmp_path, capsys):
    from agentopt_compiler.cli.main import main

    per_token = {}
    for dtype in ("fp32", "fp16", "int8"):
        ao.compile("tiny-random", out=tmp_path / dtype, context_length=32, kv_cache_dtype=dtype)
        assert main(["inspect", str(tmp_path / dtype)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("kv/token"))
        per_token[dtype] = int(line.split()[1])
    # 2 layers x (K + V) x 2 KV heads x 32 dims: 4 bytes each in fp32, 2 in fp16, 1 in int8
    assert per_token == {"fp32": 1024, "fp16": 512, "int8": 256}
