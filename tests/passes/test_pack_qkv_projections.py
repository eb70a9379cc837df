import torch

from agentopt_compiler.capture.export import capture
from agentopt_compiler.models.config import ModelConfig
from agentopt_compiler.models.registry import build_model
from agentopt_compiler.passes.fuse_kv_cache import FuseKVCache
from agentopt_compiler.passes.infra import op_histogram
from agentopt_compiler.passes.pack_qkv_projections import PackQKVProjections
from agentopt_compiler.passes.remove_noop_ops import RemoveNoopOps


def _fused(model):
    program = capture(model, 32)
    gm = program.module
    RemoveNoopOps()(gm)
    FuseKVCache()(gm)
    return gm, program.module


def _same_outputs(a, b, vocab):
    ids = torch.randint(0, vocab, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s, e in [(0, 6), (6, 7), (7, 9)]:
            args = (ids[:, s:e], torch.arange(s, e)[None], torch.tensor([[e - s - 1]]))
            assert (a(*args) - b(*args)).abs().max().item() <= 1e-5  # float reassociation at most


def test_packs_each_layer_into_one_matmul(tiny_model):
    gm, reference = _fused(tiny_model)
    before = op_histogram(gm)
    params_before = {name for name, _ in gm.named_parameters()}
    result = PackQKVProjections()(gm)
    after = op_histogram(gm)
    assert result.stats == {"packed_projections": 2}
    assert before["aten.linear.default"] - after["aten.linear.default"] == 4  # 3 -> 1 in each of 2 layers
    assert after["aten.split_with_sizes.default"] == 2
    params_after = {name for name, _ in gm.named_parameters()}
    assert "layers.0.self_attn.q_proj.weight" in params_before and not any("q_proj" in p for p in params_after)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in reference.parameters())
    _same_outputs(gm, reference, 320)


def test_packs_biases_too():
    config = ModelConfig(family="qwen2", vocab_size=90, hidden_size=32, intermediate_size=48, num_layers=1,
                         num_heads=4, num_kv_heads=1, max_position_embeddings=64, qkv_bias=True)
    gm, reference = _fused(build_model(config, seed=4))
    assert PackQKVProjections()(gm).stats == {"packed_projections": 1}
    assert "layers.0.self_attn.qkv_proj.bias" in dict(gm.named_parameters())
    _same_outputs(gm, reference, 90)


def test_does_not_fire_without_fused_attention_or_when_a_projection_is_shared(tiny_model):
    program = capture(tiny_model, 32)
    plain = program.module
    assert not PackQKVProjections()(plain).modified  # nothing fused: nothing to pack
    gm, _ = _fused(tiny_model)
    attention = next(n for n in gm.graph.nodes if "cached_attention" in str(n.target))
    k_projection = attention.args[1]
    with gm.graph.inserting_after(k_projection):  # a second reader of k's projection
        extra = gm.graph.call_function(torch.ops.aten.sum.default, (k_projection,))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = ((output.args[0], extra),) if not isinstance(output.args[0], tuple) else output.args
    result = PackQKVProjections()(gm)
    assert result.stats == {"packed_projections": 1}  # the other layer still packs
    assert any("used outside the attention op" in note for note in result.notes)
