import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from agentopt_compiler.backends.onnxruntime.lower import lower_to_onnx
from agentopt_compiler.backends.onnxruntime.session import OrtSession, create_inference_session
from agentopt_compiler.capture.export import capture
from agentopt_compiler.errors import ProviderUnavailableError, UnsupportedOpError


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    from agentopt_compiler.models.registry import load_model

    folder = tmp_path_factory.mktemp("lowered")
    model = load_model("tiny-random").model
    section = lower_to_onnx(capture(model, context_length=32), folder)
    return folder, section


def test_caches_become_past_inputs_and_present_outputs(lowered):
    folder, section = lowered
    model = onnx.load(str(folder / section["graph"]))
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    assert inputs == ["input_ids", "positions", "logits_index", "past.0.key", "past.0.value", "past.1.key",
                      "past.1.value"]
    assert outputs[0] == "logits" and sorted(outputs[1:]) == sorted(n.replace("past", "present") for n in inputs[3:])
    assert not [i.name for i in model.graph.initializer if "kv_cache" in i.name]  # no cache frozen as a constant
    assert [c["shape"] for c in section["caches"]] == [[1, 2, 32, 32]] * 4


def test_decode_reads_the_cache_written_by_prefill(lowered, tiny_model):
    """Fails if a cache mutation is dropped: decode would then attend to zeros instead of the prompt."""
    folder, section = lowered
    session = OrtSession(folder, {**section, "context_length": 32, "batch_size": 1})
    tiny_model.setup_cache(1, 32)
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 10))
    worst = 0.0
    with torch.no_grad():
        for a, b in [(0, 4), (4, 5), (5, 8), (8, 9), (9, 10)]:  # chunked prefill and single decode steps
            positions = np.arange(a, b)
            expected = tiny_model(torch.from_numpy(ids[:, a:b]), torch.from_numpy(positions)).numpy()[:, -1:]
            worst = max(worst, float(np.abs(session.run(ids[:, a:b], positions) - expected).max()))
    assert worst <= 1e-4
    # and the same decode step without the prompt in the cache gives different logits
    session.reset()
    fresh = session.run(ids[:, 9:10], np.array([9]))
    assert np.abs(fresh - expected).max() > 1e-2


class WeirdActivation(torch.nn.Module):
    def forward(self, x):
        return torch.ops.agentopt_test.weird(x)


@torch.library.custom_op("agentopt_test::weird", mutates_args=())
def weird(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@weird.register_fake
def _(x):
    return torch.empty_like(x)


def test_unsupported_op_is_named_with_its_layer(tiny_model, tmp_path):
    mlp = tiny_model.layers[1].mlp
    mlp.forward = lambda x: mlp.down_proj(WeirdActivation()(mlp.gate_proj(x)) * mlp.up_proj(x))
    with pytest.raises(UnsupportedOpError, match=r"op agentopt_test.weird.default \(in layer 'layers.1.mlp'\)"):
        lower_to_onnx(capture(tiny_model, context_length=16), tmp_path)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_request_without_cuda_fails_instead_of_running_on_cpu(lowered):
    folder, section = lowered
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider.*agentopt-compiler\\[gpu\\]"):
        create_inference_session(folder / section["graph"], "cuda")


def test_cuda_lowering_refuses_attention_ort_cuda_cannot_run(tmp_path, tiny_model):
    """ORT's CUDA GroupQueryAttention is fp16/bf16 only: an fp32 one would be placed on the CPU, silently."""
    from agentopt_compiler import backends
    from agentopt_compiler.errors import AgentOptError
    from agentopt_compiler.passes.pipeline import default_pipeline

    program, _ = default_pipeline().run(capture(tiny_model, context_length=16))
    with pytest.raises(AgentOptError, match=r"GroupQueryAttention .*FLOAT16 / BFLOAT16.* is FLOAT;.*standard"):
        lower_to_onnx(program, tmp_path / "gqa", attention_impl="gqa", device="cuda")
    (tmp_path / "standard").mkdir()
    section = lower_to_onnx(program, tmp_path / "standard", attention_impl="standard", device="cuda")
    assert {layer["op"] for layer in section["attention"]["layers"]} == {"Attention"}
    assert lower_to_onnx(program, tmp_path, attention_impl="gqa", device="cpu")["attention"]["impl"] == "gqa"
    entry = backends.get_backend("onnxruntime")
    assert entry.default_attention_impl("cuda") == "standard" and entry.default_attention_impl("cpu") == "gqa"


def test_constant_slices_are_folded_and_runtime_slices_kept():
    import onnx_ir as ir

    from agentopt_compiler.backends.onnxruntime.constant_slices import fold_constant_slices

    rng = np.random.default_rng(0)
    table, big = rng.standard_normal((64, 8)).astype(np.float32), rng.standard_normal((300, 4)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Slice", ["table", "s0", "e0", "a0"], ["half"]),  # constant: folded
         onnx.helper.make_node("Cast", ["half"], ["half16"], to=onnx.TensorProto.FLOAT16),  # constant after the fold
         onnx.helper.make_node("Slice", ["table", "s0", "e0", "a0"], ["half_again"]),  # the same slice: shared
         onnx.helper.make_node("Cast", ["half_again"], ["half16_again"], to=onnx.TensorProto.FLOAT16),
         onnx.helper.make_node("Slice", ["x", "s1", "e1"], ["x_rows"]),  # a runtime value: kept
         onnx.helper.make_node("Gather", ["half16", "positions"], ["rows"]),
         onnx.helper.make_node("Gather", ["half16_again", "positions"], ["rows_again"]),
         onnx.helper.make_node("Cast", ["x_rows"], ["x16"], to=onnx.TensorProto.FLOAT16),
         onnx.helper.make_node("Add", ["rows", "x16"], ["sum"]),
         onnx.helper.make_node("Add", ["sum", "rows_again"], ["y"]),
         # a big slice of a table another node still reads in full: folding would store both, so it is kept
         onnx.helper.make_node("Slice", ["big", "s2", "e2"], ["big_rows"]),
         onnx.helper.make_node("Gather", ["big", "positions"], ["big_gathered"]),
         onnx.helper.make_node("Gather", ["big_rows", "positions"], ["big_sliced_gathered"]),
         onnx.helper.make_node("Add", ["big_gathered", "big_sliced_gathered"], ["z"])],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5, 4]),
              onnx.helper.make_tensor_value_info("positions", onnx.TensorProto.INT64, [3])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [3, 4]),
         onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [3, 4])],
        [onnx.numpy_helper.from_array(table, "table"), onnx.numpy_helper.from_array(big, "big"),
         *(onnx.numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
           [("s0", [0, 0]), ("e0", [16, 4]), ("a0", [0, 1]), ("s1", [2]), ("e1", [5]), ("s2", [0]), ("e2", [290])])])
    before = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 23)])
    model = ir.serde.deserialize_model(before)
    import agentopt_compiler.backends.onnxruntime.constant_slices as constant_slices

    constant_slices.SMALL_BYTES = 1024  # (4.6 KB of "big" stands for a big table)
    try:
        assert fold_constant_slices(model) == 4
    finally:
        constant_slices.SMALL_BYTES = 64 * 1024
    after = ir.serde.serialize_model(model)
    assert [n.op_type for n in after.graph.node] == ["Slice", "Gather", "Gather", "Cast", "Add", "Add", "Slice",
                                                     "Gather", "Gather", "Add"]
    assert {i.name: list(i.dims) for i in after.graph.initializer if i.name.startswith("table")} == {
        "table_16x4_float16": [16, 4]}  # the (64, 8) table is gone, its two slices share one table
    feeds = {"x": np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32),
             "positions": np.array([0, 7, 15])}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    for got, want in zip(run(after), run(before)):
        np.testing.assert_array_equal(got, want)


def test_gqa_engine_stores_rope_tables_for_its_capacity_only(tmp_path):
    """A 4096-position, 64-wide RoPE table (too big for the exporter's own folding) is stored as (capacity, 32), and
    the engine still equals eager up to the last slot of its cache."""
    from agentopt_compiler.models.config import ModelConfig
    from agentopt_compiler.models.llama import LlamaDecoder
    from agentopt_compiler.passes.pipeline import default_pipeline

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=4096)
    model = LlamaDecoder(config).eval()
    capacity = 24
    program, _ = default_pipeline().run(capture(model, context_length=capacity))
    section = lower_to_onnx(program, tmp_path)
    assert section["lowering_rules"]["constant_slices"] == 2
    graph = onnx.load(str(tmp_path / section["graph"])).graph
    assert sorted(list(i.dims) for i in graph.initializer if i.name.startswith("rope_")) == [[capacity, 32]] * 2
    session = OrtSession(tmp_path, {**section, "context_length": capacity, "batch_size": 1})
    model.setup_cache(1, capacity)
    ids = np.random.default_rng(0).integers(0, 300, size=(1, capacity))
    worst = 0.0
    with torch.no_grad():
        for a, b in [(0, 16)] + [(i, i + 1) for i in range(16, capacity)]:  # decode into the last slot
            positions = np.arange(a, b)
            expected = model(torch.from_numpy(ids[:, a:b]), torch.from_numpy(positions)).numpy()[:, -1:]
            worst = max(worst, float(np.abs(session.run(ids[:, a:b], positions) - expected).max()))
    assert worst <= 1e-4


def test_reset_clears_every_row_written_and_the_next_run_repeats_the_first(tiny_engine):
    session = tiny_engine.session
    ids = np.random.default_rng(3).integers(0, 300, size=(1, 12))

    def run_all():
        session.reset()
        first = session.run(ids[:, :10], np.arange(10))
        return first, [session.run(ids[:, i:i + 1], np.array([i])) for i in (10, 11)]

    first, steps = run_all()
    assert any(np.abs(c).max() > 0 for c in session.read_cache(12).values())
    session.write_cache({name: np.ones_like(rows) for name, rows in session.read_cache(20).items()})  # rows 12-19 too
    session.reset()
    assert all(not np.abs(c).any() for c in session.read_cache(session.capacity).values())
    again, again_steps = run_all()
    np.testing.assert_array_equal(first, again)
    for a, b in zip(steps, again_steps):
        np.testing.assert_array_equal(a, b)
