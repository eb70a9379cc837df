"""Lowering of ``agentopt::weight_only_linear`` to ORT's ``com.microsoft.MatMulNBits``.

    weight_only_linear(x, qW, scales, zero_points, bits, block, K)
        -> MatMulNBits(x, qW, scales, zero_points, K=K, N=N, bits=bits, block_size=block, accuracy_level=4)

The packed layout is already MatMulNBits' (capture/quantized_linear.py). ``accuracy_level=4`` (int8 compute of the
activations per block) is the fast CPU path: levels 0-3 run 4-bit slower and 8-bit over ten times slower than fp32
on ORT CPU (measured, see shared/notes). Standard ONNX has no equivalent op here, so ``--attention-impl standard``
engines refuse a precision plan with int8/int4 units instead of silently running them in fp32.
"""

from __future__ import annotations

import onnxscript

from ...errors import AgentOptError
from .contrib_schemas import register_ort_contrib_schema

msft = onnxscript.values.Opset("com.microsoft", 1)
ACCURACY_LEVEL = 4


def weight_only_linear_to_matmul_nbits(x, qweight, scales, zero_points, bits=4, block=32, in_features=0):
    out_features = scales.shape[0]
    if zero_points.shape[0] == 0:  # symmetric quantization: MatMulNBits' default zero point, no input
        return msft.MatMulNBits(x, qweight, scales, K=in_features, N=out_features, bits=bits, block_size=block,
                                accuracy_level=ACCURACY_LEVEL)
    return msft.MatMulNBits(x, qweight, scales, zero_points, K=in_features, N=out_features, bits=bits,
                            block_size=block, accuracy_level=ACCURACY_LEVEL)


def weight_only_linear_unsupported(*_args, **_kwargs):
    raise AgentOptError("int8/int4 weight-only layers need ONNX Runtime's MatMulNBits, a Microsoft contrib op; "
                        "compile with --attention-impl gqa or drop the precision plan")


def translation_table(attention_impl: str) -> dict:
    import torch

    from ...capture import quantized_linear  # noqa: F401  (registers the op)

    if attention_impl == "gqa":
        register_ort_contrib_schema("MatMulNBits")
        return {torch.ops.agentopt.weight_only_linear.default: weight_only_linear_to_matmul_nbits}
    return {torch.ops.agentopt.weight_only_linear.default: weight_only_linear_unsupported}
