import json

import pytest
import torch

from agentopt_compiler.capture.custom_ops import CachedAttentionArgs
from agentopt_compiler.capture.export import capture
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.passes.fuse_kv_cache import FuseKVCache
from agentopt_compiler.passes.infra import op_histogram
from agentopt_compiler.passes.insert_sparse_attention import (RING_SPARE_SLOTS, InsertSparseAttention,
                                                              SparseAttentionPlan, SparsePattern)
from agentopt_compiler.passes.remove_noop_ops import RemoveNoopOps


def test_plan_specs():
    plan = SparseAttentionPlan.parse("window=1024,sinks=4,layers=2-4; window=64,stride=8,layers=0,7")
    assert plan.resolve(8) == {2: SparsePattern(1024, 4), 3: SparsePattern(1024, 4), 4: SparsePattern(1024, 4),
                               0: SparsePattern(64, 0, 8), 7: SparsePattern(64, 0, 8)}
    assert SparseAttentionPlan.parse("window=16").resolve(3) == {i: SparsePattern(16) for i in range(3)}
    assert SparseAttentionPlan.parse("window=16,bounded=0").resolve(1) == {0: SparsePattern(16, bounded=False)}
    with pytest.raises(AgentOptError, match="layer\\(s\\) \\[9\\].*layers 0-7"):
        SparseAttentionPlan.parse("window=8,layers=9").resolve(8)
    with pytest.raises(AgentOptError, match="expected window=W"):
        SparseAttentionPlan.parse("sinks=4")
    with pytest.raises(AgentOptError, match="window must be >= 1"):
        SparseAttentionPlan.parse("window=0")
    per_head = SparseAttentionPlan.parse("window=64,kv_heads=0,2,layers=1-2").resolve(4)
    assert per_head == {1: SparsePattern(64, kv_heads=(0, 2)), 2: SparsePattern(64, kv_heads=(0, 2))}
    assert per_head[1].ring_slots(1024) == 0  # the layer's dense heads need every position


def test_plan_file_round_trip(tmp_path):
    plan = SparseAttentionPlan.parse("window=32,sinks=2,layers=1; window=8,kv_heads=1,layers=0")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan.to_dict()))
    assert SparseAttentionPlan.load(path) == plan
    with pytest.raises(AgentOptError, match="does not exist"):
        SparseAttentionPlan.load(tmp_path / "missing.json")


def _fused(model, context=128):  # longer than a ring (sinks + window + spare slots)
    program = capture(model, context)
    gm = program.module
    RemoveNoopOps()(gm)
    FuseKVCache()(gm)
    return gm


def test_sets_the_pattern_on_the_named_layers_only(tiny_model):
    gm = _fused(tiny_model)
    before = op_histogram(gm)
    result = InsertSparseAttention(SparseAttentionPlan.parse("window=4,sinks=2,layers=1"))(gm)
    assert result.stats == {"window4+sinks2": 1, "ring_caches": 1} and op_histogram(gm) == before
    ops = [n for n in gm.graph.nodes if "cached_attention" in str(n.target)]
    first, second = (CachedAttentionArgs.of(n) for n in ops)
    assert first.window == -1 and (second.window, second.sinks, second.ring) == (4, 2, True)
    buffers = dict(gm.named_buffers())
    assert buffers["layers.1.self_attn.kv_cache.key"].shape[2] == 6 + RING_SPARE_SLOTS  # sinks + window + spare
    assert buffers["layers.0.self_attn.kv_cache.key"].shape[2] == 128
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    dense = _fused(tiny_model)
    with torch.no_grad():
        args = (ids, torch.arange(12)[None], torch.tensor([[11]]))
        assert not torch.allclose(gm(*args), dense(*args), atol=1e-4)  # 12 tokens > window 4: the mask matters


def test_no_plan_changes_nothing_and_a_plan_needs_fused_attention(tiny_model):
    gm = _fused(tiny_model)
    assert not InsertSparseAttention(None)(gm).modified
    unfused = capture(tiny_model, 32).module
    with pytest.raises(AgentOptError, match="do not skip fuse_kv_cache"):
        InsertSparseAttention(SparseAttentionPlan.parse("window=4"))(unfused)


def test_per_kv_head_pattern_leaves_the_other_heads_dense(tiny_model):
    gm = _fused(tiny_model)
    result = InsertSparseAttention(SparseAttentionPlan.parse("window=4,kv_heads=1,layers=1"))(gm)
    assert result.stats == {"window4@kv1": 1}  # no ring cache: head 0 still reads every position
    ops = [n for n in gm.graph.nodes if "cached_attention" in str(n.target)]
    first, second = (CachedAttentionArgs.of(n) for n in ops)
    assert (second.window, second.dense_kv_heads) == (4, [0]) and first.dense_kv_heads is None
    assert dict(gm.named_buffers())["layers.1.self_attn.kv_cache.key"].shape[2] == 128
    all_heads = _fused(tiny_model)
    InsertSparseAttention(SparseAttentionPlan.parse("window=4,layers=1"))(all_heads)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    args = (ids, torch.arange(12)[None], torch.tensor([[11]]))
    with torch.no_grad():
        per_head, windowed, dense = gm(*args), all_heads(*args), _fused(tiny_model)(*args)
    assert not torch.allclose(per_head, windowed, atol=1e-4) and not torch.allclose(per_head, dense, atol=1e-4)
    with pytest.raises(AgentOptError, match="kv_heads \\[5\\].*KV heads 0-1"):
        InsertSparseAttention(SparseAttentionPlan.parse("window=4,kv_heads=5"))(_fused(tiny_model))
