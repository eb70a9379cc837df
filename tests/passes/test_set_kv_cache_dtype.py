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
    with pytest.raises(AgentOptError, match="'int8' is not available"):
        SetKVCacheDtype("int8")


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
    session.reset()
    rng = np.random.default_rng(1)
    start, worst = 0, 0.0
    for size in (12, 60 if sparse else 1, 1, 7, 1, 1):  # chunked prefill, then decode steps
        ids = rng.integers(0, 300, size=(1, size))
        expected = _logits(reference.module, ids, start)
        logits = session.run(ids, np.arange(start, start + size))
        worst = max(worst, float(np.abs(logits - expected).max() / np.abs(expected).max()))
        start += size
    assert worst <= 1e-2
    if not sparse:  # (ring caches hold sinks + window + spare slots)
        rows = session.read_cache(start)
        assert all(a.dtype == np.float16 and a.shape[2] == start for a in rows.values())
    assert engine.manifest["passes"][-2]["stats"] == {"fp16_caches": 4}


def test_half_cache_gqa_passes_the_cuda_kernel_check(tmp_path, tiny_model):
    program, _ = default_pipeline(kv_cache_dtype="fp16").run(capture(tiny_model, 16))
    section = lower_to_onnx(program, tmp_path, attention_impl="gqa", device="cuda")
    assert {layer["op"] for layer in section["attention"]["layers"]} == {"GroupQueryAttention"}
