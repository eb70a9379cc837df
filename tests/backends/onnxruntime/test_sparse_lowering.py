"""Sparse attention through lowering: on inputs longer than the window the engine differs from dense and equals the
eager reference under the same mask; a pattern lost in lowering fails the compile."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

import agentopt_compiler as ao
from agentopt_compiler.backends.ring_caches import ring_spare_slots
from agentopt_compiler.backends.onnxruntime.lower import check_attention_patterns
from agentopt_compiler.capture.export import capture
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.models.config import ModelConfig
from agentopt_compiler.models.registry import BUILTIN_MODELS, build_model, load_model
from agentopt_compiler.passes.insert_sparse_attention import RING_SPARE_SLOTS, SparseAttentionPlan
from agentopt_compiler.passes.pipeline import default_pipeline
from tests.conftest import eager_greedy

CONTEXT = 64
PROMPT = list(range(60, 90))  # 30 tokens: far longer than the windows below


@pytest.mark.parametrize("impl", ["gqa", "standard"])
def test_window_engine_equals_a_windowed_eager_model_and_differs_from_dense(impl, tmp_path):
    engine = ao.compile("tiny-random", out=tmp_path / "w", context_length=CONTEXT, attention_impl=impl,
                        sparse_attention="window=6")
    windowed = build_model(ModelConfig(**{**BUILTIN_MODELS["tiny-random"].config.to_dict(), "eos_token_ids": (),
                                          "sliding_window": 6}), seed=0)  # the model's own mask: independent
    ours = engine.generate_ids(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert ours == eager_greedy(windowed, PROMPT, 24, CONTEXT)
    assert ours != eager_greedy(load_model("tiny-random").model, PROMPT, 24, CONTEXT)  # dense differs


@pytest.mark.parametrize("spec", ["window=5,sinks=3", "window=4,stride=3,layers=0", "window=4,kv_heads=1,layers=1"])
def test_sinks_strided_and_per_head_patterns_equal_the_fused_ops_reference(spec, tmp_path):
    engine = ao.compile("tiny-random", out=tmp_path / "s", context_length=CONTEXT, sparse_attention=spec)
    # GQA cannot express these: standard-op lowering for those layers
    assert {layer["op"] for layer in engine.manifest["engine"]["attention"]["layers"] if layer["sinks"] or
            layer["stride"] or layer.get("dense_kv_heads")} == {"Attention"}
    program, _ = default_pipeline(SparseAttentionPlan.parse(spec)).run(capture(load_model("tiny-random").model,
                                                                               CONTEXT))
    reference = program.module  # eager run of agentopt.cached_attention with the same pattern
    session = engine.session
    session.reset()
    worst, position = 0.0, 0
    with torch.no_grad():
        for size in (30, 1, 1, 5, 1):
            ids = np.array([PROMPT[:size]]) if size > 1 else np.array([[7]])
            positions = np.arange(position, position + size)[None]
            expected = reference(torch.from_numpy(ids), torch.from_numpy(positions), torch.tensor([[size - 1]]))
            worst = max(worst, float(np.abs(session.run(ids, positions) - expected.numpy()).max()))
            position += size
    assert worst <= 1e-4


def test_a_pattern_lost_in_lowering_fails_the_compile(tmp_path):
    spec = "window=6,bounded=0"  # full caches: the window goes to GroupQueryAttention's local_window_size
    engine = ao.compile("tiny-random", out=tmp_path / "w", context_length=CONTEXT, sparse_attention=spec)
    model = ir.load(str(tmp_path / "w" / "model.onnx"))
    program, _ = default_pipeline(SparseAttentionPlan.parse(spec)).run(
        capture(load_model("tiny-random").model, CONTEXT))
    fused = [n for n in program.exported.graph.nodes if "cached_attention" in str(n.target)]
    assert len(check_attention_patterns(model.graph, fused)) == 2
    for node in model.graph:
        if node.op_type == "GroupQueryAttention":
            node.attributes.pop("local_window_size")  # what a lossy exporter would do
    with pytest.raises(AgentOptError, match="lost in lowering"):
        check_attention_patterns(model.graph, fused)
    assert engine.manifest["sparse_attention"] == {
        "layers": {"all": {"window": 6, "sinks": 0, "stride": 0, "bounded": False, "kv_heads": []}}}


@pytest.mark.parametrize("impl", ["gqa", "standard"])
def test_ring_caches_bound_memory_and_equal_full_caches(impl, tmp_path):
    spec = "window=6,sinks=2"
    ring = ao.compile("tiny-random", out=tmp_path / "ring", context_length=128, attention_impl=impl,
                      sparse_attention=spec)
    full = ao.compile("tiny-random", out=tmp_path / "full", context_length=128, attention_impl=impl,
                      sparse_attention=spec + ",bounded=0")
    assert [c["shape"][2] for c in ring.manifest["engine"]["caches"]] == [8 + RING_SPARE_SLOTS] * 4  # + spare
    assert [c["shape"][2] for c in full.manifest["engine"]["caches"]] == [128] * 4
    longer = ao.compile("tiny-random", out=tmp_path / "ring512", context_length=512, attention_impl=impl,
                        sparse_attention=spec)
    assert longer.manifest["engine"]["caches"] == ring.manifest["engine"]["caches"]  # memory does not grow
    # each ring cache is updated in place by one ScatterND of the new rows (no full-ring Where / gather)
    graph = onnx.load(str(tmp_path / "ring" / "model.onnx")).graph
    producers = {out: n.op_type for n in graph.node for out in n.output}
    assert {producers[o.name] for o in graph.output if o.name.startswith("present.")} == {"ScatterND"}
    assert not [n for n in graph.node if n.op_type == "Where" and n.output[0] in
                {i for m in graph.node if m.op_type == "ScatterND" for i in m.input}]
    before = ring.session.cache_addresses()
    prompt = list(range(10, 100))  # 90 tokens: longer than one ring call (65), so the session splits the prefill
    tokens = ring.generate_ids(prompt, max_new_tokens=30, ignore_eos=True)  # 120 positions through 72 slots
    assert tokens == full.generate_ids(prompt, max_new_tokens=30, ignore_eos=True)
    assert ring.manifest["engine"]["attention"]["ring_call_tokens"] == RING_SPARE_SLOTS + 1
    ring_keys = ring.session.read_cache(ring.session.capacity)["past.0.key"]
    assert ring.session.cache_addresses() == before and np.abs(ring_keys).sum() > 0
    windowed = build_model(ModelConfig(**{**BUILTIN_MODELS["tiny-random"].config.to_dict(), "eos_token_ids": (),
                                          "sliding_window": 6}), seed=0)
    assert tokens[:10] != eager_greedy(windowed, prompt, 10, 128)  # sinks matter: not a plain window


def test_conversations_on_ring_caches(tmp_path):
    from agentopt_compiler.runtime.engine import GenerationConfig

    engine = ao.compile("tiny-random", out=tmp_path / "ring", context_length=256, sparse_attention="window=6,sinks=2")
    greedy = GenerationConfig(max_new_tokens=5, ignore_eos=True)
    conversation = engine.conversation()
    history = list(range(30, 60))
    for turn in range(3):
        before = conversation.prefilled_tokens
        reply = list(conversation.generate(conversation.prefill_to(history), greedy))
        assert reply == engine.generate_ids(history, greedy)
        if turn:
            assert conversation.prefilled_tokens - before == 1 + 4  # appending stays cheap
        history = history + reply + [70 + turn, 71, 72, 73]
    before = conversation.prefilled_tokens
    edited = history[:20] + [5, 6]  # going back into the ring: recomputed from the start, still correct
    assert list(conversation.generate(conversation.prefill_to(edited), greedy)) == engine.generate_ids(edited, greedy)
    assert conversation.prefilled_tokens - before == len(edited)
    conversation.rewind(10)  # an explicit rewind into the ring also recomputes
    again = history[:10] + [9, 9]
    assert list(conversation.generate(conversation.prefill_to(again), greedy)) == engine.generate_ids(again, greedy)


def test_ring_caches_take_padding_and_drafts_up_to_their_spare_slots(tmp_path):
    from agentopt_compiler.runtime.engine import GenerationConfig

    engine = ao.compile("tiny-random", out=tmp_path / "ring", context_length=128, sparse_attention="window=6,sinks=2",
                        batch_size=2)
    greedy = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    assert engine.session.ring_spare_slots == RING_SPARE_SLOTS and not engine.session.rewindable
    # a batch whose prompts differ by more than the spare slots: each row prefills alone (the 80-token prefill in
    # two ring calls), and the shorter row's dummy tokens while the other prefills land only in its spare slots
    rows = [list(range(10, 90)), list(range(30, 30 + 80 - RING_SPARE_SLOTS - 9))]
    assert [c.token_ids for c in engine.generate_batch(rows, greedy)] == [engine.generate_ids(r, greedy) for r in rows]
    # prompt lookup: rejected drafts are written into the ring and stepped back over; same tokens as without
    repetitive, longer = [7] * 5, GenerationConfig(max_new_tokens=40, ignore_eos=True)
    plain = engine.generate_ids(repetitive, longer)
    conversation = engine.conversation()
    drafted = GenerationConfig(max_new_tokens=40, ignore_eos=True, prompt_lookup=RING_SPARE_SLOTS)
    assert list(conversation.generate(conversation.prefill_to(repetitive), drafted)) == plain
    assert conversation.drafted_tokens > conversation.accepted_draft_tokens > 0  # some drafts rejected, some kept
    with pytest.raises(AgentOptError, match=f"keep {RING_SPARE_SLOTS} spare slots for that; use a prompt lookup of "
                                            f"at most {RING_SPARE_SLOTS}"):
        list(engine.conversation().generate(conversation.prefill_to(repetitive),
                                            GenerationConfig(max_new_tokens=4, prompt_lookup=RING_SPARE_SLOTS + 1)))


def _manifest_engine(layers, slots):
    caches = [{"input": f"past.{i}.{kind}", "shape": [1, 2, n, 8]} for i, n in enumerate(slots)
              for kind in ("key", "value")]
    return {"attention": {"layers": layers}, "caches": caches}


def test_spare_slots_are_the_fewest_of_any_ring_layer():
    dense = {"op": "GroupQueryAttention", "window": -1, "sinks": 0, "ring": False}
    ring = {"op": "Attention", "window": 6, "sinks": 2, "ring": True}
    assert ring_spare_slots(_manifest_engine([dense, dense], [64, 64])) is None  # no ring: nothing to protect
    assert ring_spare_slots(_manifest_engine([dense, ring], [64, 16])) == 8
    assert ring_spare_slots(_manifest_engine([ring, {**ring, "window": 10}], [16, 16])) == 4
    assert ring_spare_slots(_manifest_engine([ring], [8])) == 0  # compiled before rings had spare slots


def test_layers_computing_the_same_tensors_share_them_and_keep_their_own_caches():
    from onnx import TensorProto, helper

    from agentopt_compiler.backends.onnxruntime.shared_subexpressions import share_common_subexpressions

    table = np.arange(1088, dtype=np.int64)  # a ring's slot table: above the exporter's own 1024-element limit
    initializers = [helper.make_tensor(name, TensorProto.INT64, [1088], values)
                    for name, values in (("t0", table), ("t1", table), ("t2", table + 1))]
    nodes = [helper.make_node("Add", ["positions", t], [f"held{i}"]) for i, t in enumerate(("t0", "t1", "t2"))]
    nodes += [helper.make_node("Add", [f"cache{i}", f"held{i}"], [f"present{i}"]) for i in range(3)]
    graph = helper.make_graph(
        nodes, "layers", [helper.make_tensor_value_info(n, TensorProto.INT64, [1088])
                          for n in ("positions", "cache0", "cache1", "cache2")],
        [helper.make_tensor_value_info(f"present{i}", TensorProto.INT64, [1088]) for i in range(3)], initializers)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    assert share_common_subexpressions(model) == 1  # layers 0 and 1 share held; layer 2's table differs
    adds = [n for n in model.graph if n.op_type == "Add"]
    assert len(adds) == 5 and len({n.inputs[0].name for n in adds if n.inputs[0].name.startswith("cache")}) == 3
