"""copy_rows_in_reshapes: a head view whose target shape spells the batch as a constant reads it from its input,
numerically the same at the compiled batch and right at others; a Concat whose Reshape input does not lead with the
batch is left alone."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from agentopt_compiler.backends.onnxruntime.dynamic_rows import ROWS, copy_rows_in_reshapes, make_rows_symbolic


def _view_model(data_shape, batch: int = 2) -> ir.Model:
    """y = Reshape(x, Concat([batch], [-1], [2]))  (as torch.onnx writes view(B, -1, 2) for a static batch B)."""
    nodes = [helper.make_node("Constant", [], ["b"], value_ints=[batch]),
             helper.make_node("Constant", [], ["rest"], value_ints=[-1, 2]),
             helper.make_node("Concat", ["b", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]
    graph = helper.make_graph(nodes, "view", [helper.make_tensor_value_info("x", TensorProto.FLOAT, data_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_a_batch_constant_in_a_view_becomes_the_input_rows():
    model = _view_model([2, 4, 6])
    assert copy_rows_in_reshapes(model, 2) == 1
    assert [n.op_type for n in model.graph].count("Shape") == 1
    make_rows_symbolic(model, 2)
    assert model.graph.inputs[0].shape[0] == ir.SymbolicDim(ROWS)
    for rows in (1, 2, 5):  # the compiled batch, and others
        x = np.arange(rows * 24, dtype=np.float32).reshape(rows, 4, 6)
        np.testing.assert_array_equal(_run(model, x), x.reshape(rows, -1, 2))


def test_a_reshape_whose_input_does_not_lead_with_the_batch_is_left_alone():
    model = _view_model([3, 4])  # the 2 in the target is not this value's leading dimension
    assert copy_rows_in_reshapes(model, 2) == 0
    assert "Shape" not in [n.op_type for n in model.graph]
    np.testing.assert_array_equal(_run(model, np.ones((3, 4), np.float32)), np.ones((2, 3, 2), np.float32))
