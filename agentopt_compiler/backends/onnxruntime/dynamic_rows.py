"""Lowering rule: the batch dimension of the graph's inputs and outputs becomes symbolic, so one engine runs any
number of cache rows per call.

    input_ids [4, s]   past.0.key [4, Hkv, T, D]   logits [4, l, V]
 -> input_ids [rows, s] past.0.key [rows, Hkv, T, D] logits [rows, l, V]

Why: a server keeps S agent sessions in S rows of one cache buffer (runtime/slots.py). A decode step runs the rows of
every decoding session in one call, reading the weights once for all of them; a prefill runs one session's row alone,
bound zero-copy to that row's memory, because ONNX Runtime's GroupQueryAttention takes several new tokens after
cached ones only at batch 1. Both are calls of this one graph on one InferenceSession with different bindings, so the
weights are loaded once and a session's KV never moves.

A symbolic batch is only right if the graph computes every row on its own and holds no batch-sized constant (the
reference model's logits gather is written with expand(-1, ...) for that). ``rows_are_independent`` proves it by
running the graph: the logits of a row run alone must equal that row's logits run beside another row. Where they
differ the batch stays static, and the manifest says so (sessions then run all rows together, as one slot).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir

ROWS = "rows"  # the symbolic dimension's name


def make_rows_symbolic(model: ir.Model, batch: int) -> int:
    """Replace the leading dimension ``batch`` of the graph's inputs, outputs and intermediate values by ``rows``
    (ONNX Runtime checks bound outputs against the shapes it infers, value_info included); returns how many. A value
    whose leading dimension only happens to equal ``batch`` keeps its size: shape inference recomputes it."""
    values = [*model.graph.inputs, *model.graph.outputs, *(v for node in model.graph for v in node.outputs)]
    changed = 0
    for value in values:
        if value.shape is not None and len(value.shape) and value.shape[0] == batch:
            value.shape = ir.Shape([ROWS, *list(value.shape)[1:]])
            changed += 1
    return changed


def copy_rows_in_reshapes(model: ir.Model, batch: int) -> int:
    """Reshape targets that spell the batch as a constant read it from their input instead; returns how many.

        view(*hidden.shape[:-1], -1, head_dim)   exported at batch 2:   Reshape(x, Concat([2], [s], [-1, 16]))
     -> Reshape(x, Concat(Shape(x)[0:1], [s], [-1, 16]))                any number of rows

    transformers' attention modules (Qwen3, Gemma 3: the per-head QK-norm views) build their head shapes so; without
    this the graph holds a batch-sized constant and its rows stay static. (Not a 0 in the shape: the exporter's
    Reshapes set allowzero, where 0 means an empty dimension.)"""
    changed = 0
    for concat in list(model.graph):
        if concat.op_type != "Concat" or not concat.inputs or _int_constant(concat.inputs[0]) != [batch]:
            continue
        users = [use.node for use in concat.outputs[0].uses()]
        if not users or not all(_reshape_of_rows(user, concat.outputs[0], batch) for user in users):
            continue
        rows = ir.node("Shape", [users[0].inputs[0]], attributes={"start": 0, "end": 1},
                       name=f"{concat.name}_rows")  # all users reshape values with the batch first
        model.graph.insert_before(concat, rows)
        concat.replace_input_with(0, rows.outputs[0])
        changed += 1
    if changed:
        model.graph.sort()  # a Shape node may read a value computed after the Concat it feeds
    return changed


def _int_constant(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        if "value_ints" in producer.attributes:  # the exporter writes small shape pieces so
            return list(producer.attributes["value_ints"].value)
        attribute = producer.attributes.get("value")
        tensor = attribute.value if attribute is not None else None
    if tensor is None:
        return None
    array = tensor.numpy()
    return array.tolist() if array.dtype == np.int64 and array.ndim == 1 else None


def _reshape_of_rows(node: ir.Node, shape: ir.Value, batch: int) -> bool:
    """``node`` reshapes a value whose first dimension is the batch, with ``shape`` as its target (0 copies)."""
    if node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is not shape:
        return False
    data = node.inputs[0].shape if node.inputs[0] is not None else None
    return data is not None and len(data) > 0 and data[0] == batch


def rows_are_independent(path: Path, caches: list[dict], logits: str) -> bool:
    """Run the saved graph on 1 and on 2 rows (row 1 other tokens); True when row 0's logits agree. (Prefills from
    position 0: GroupQueryAttention takes several tokens per row after cached ones only at batch size 1.)

    Differences of rounding (kernels blocking their work by batch size) stay far below the tolerance; a graph that
    mixes rows or has a batch-sized constant fails by orders of magnitude, or does not run at all."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a graph that fails at 1 row is an answer here, not an error to print
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    vocab = next(o.shape[-1] for o in session.get_outputs() if o.name == logits)
    vocab_logits = []
    for rows in (1, 2):
        ids = np.array([[1, 2, 3], [4, 5, 6]][:rows], dtype=np.int64)
        positions = np.array([[0, 1, 2], [0, 1, 2]][:rows], dtype=np.int64)
        feeds = {"input_ids": ids, "positions": positions,
                 "logits_index": np.full((rows, 1), 2, dtype=np.int64)}
        for cache in caches:
            feeds[cache["input"]] = np.zeros((rows, *cache["shape"][1:]), dtype=cache.get("dtype", "float32"))
        binding = session.io_binding()  # preallocated logits, as sessions bind them: ORT checks their shape
        for name, array in feeds.items():
            if name in inputs:
                binding.bind_cpu_input(name, array)
        out = np.zeros((rows, 1, vocab), dtype=np.float32)
        binding.bind_ortvalue_output(logits, ort.OrtValue.ortvalue_from_numpy(out))
        for cache in caches:
            binding.bind_output(cache["output"], "cpu")
        try:
            session.run_with_iobinding(binding)
        except Exception:  # a graph with a batch-sized constant fails shape checks at 1 row
            return False
        vocab_logits.append(out[0])
    scale = float(np.abs(vocab_logits[1]).max()) or 1.0
    return bool(np.allclose(vocab_logits[0], vocab_logits[1], rtol=0, atol=1e-4 * scale))


def make_rows_static(path: Path, batch: int) -> None:
    """Undo ``make_rows_symbolic`` in a saved graph (its weights, in external data or not, are left as they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) and dims[0].dim_param == ROWS:
            dims[0].dim_value = batch
    onnx.save(model, str(path))
