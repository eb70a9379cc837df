"""Block-wise weight-only quantization, and ``agentopt::weight_only_linear``, the op that carries it in a graph.

Format (the one ONNX Runtime's ``com.microsoft.MatMulNBits`` reads, so lowering is a rename):
    weight W (N, K) is cut into blocks of ``block`` values along K; per (n, block):
        scale = (max - min) / (2^bits - 1),  zero point zp = round(-min / scale)  (clamped to [0, 2^bits - 1])
        q = clamp(round(w / scale) + zp, 0, 2^bits - 1)           dequantized: (q - zp) * scale
    qweight uint8 (N, K/block, block*bits/8): 4-bit values two per byte, element 2i in the low nibble
    scales float32 (N, K/block)
    zero_points uint8 (N, ceil(K/block * bits / 8)): packed the same way

``weight_only_linear(x, qweight, scales, zero_points, bits, block, K)`` = x @ dequantize(...)^T, in fp32: the
reference every lowering of it is checked against.
"""

from __future__ import annotations

import torch


def quantize_blockwise(weight: torch.Tensor, bits: int, block: int, symmetric: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) fp32 -> (qweight, scales, zero_points) in MatMulNBits' layout. K must be a multiple of ``block``.

    Asymmetric (default): each block maps [min, max] (0 included) onto all 2^bits levels, with a zero point.
    Symmetric: each block maps [-absmax, absmax] around the fixed zero point 2^(bits-1) (MatMulNBits' default when
    the zero-point input is absent); ``zero_points`` is then empty, and the engine stores none."""
    n, k = weight.shape
    if k % block:
        raise ValueError(f"in_features {k} is not a multiple of the block size {block}")
    levels = (1 << bits) - 1
    blocks = weight.float().reshape(n, k // block, block)
    if symmetric:
        middle = 1 << (bits - 1)
        scales = (blocks.abs().amax(-1) / (middle - 1)).clamp(min=1e-12)
        q = torch.clamp(torch.round(blocks / scales[..., None]) + middle, 0, levels).to(torch.uint8)
        return _pack(q, bits), scales.contiguous(), torch.empty(0, dtype=torch.uint8)
    low = blocks.amin(-1).clamp(max=0.0)  # include 0 so that zero stays exact
    high = blocks.amax(-1).clamp(min=0.0)
    scales = ((high - low) / levels).clamp(min=1e-12)
    zero = torch.round(-low / scales).clamp(0, levels)
    q = torch.clamp(torch.round(blocks / scales[..., None]) + zero[..., None], 0, levels).to(torch.uint8)
    return _pack(q, bits), scales.contiguous(), _pack(zero.to(torch.uint8), bits)


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values (..., M) -> bytes (..., ceil(M*bits/8)); 4-bit: element 2i in the low nibble."""
    if bits == 8:
        return values.contiguous()
    if values.shape[-1] % 2:
        values = torch.cat([values, torch.zeros_like(values[..., :1])], -1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).contiguous()


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    if bits == 8:
        return packed[..., :count]
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], -1).reshape(*packed.shape[:-1], -1)[..., :count]


def dequantize_blockwise(qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, bits: int,
                         block: int, k: int) -> torch.Tensor:
    n, num_blocks = scales.shape
    q = _unpack(qweight, bits, block).float()  # (N, K/block, block)
    if zero_points.numel() == 0:  # symmetric: MatMulNBits' default zero point
        zero = torch.full((n, num_blocks), float(1 << (bits - 1)))
    else:
        zero = _unpack(zero_points, bits, num_blocks).float()  # (N, K/block)
    return ((q - zero[..., None]) * scales[..., None]).reshape(n, num_blocks * block)[:, :k]


@torch.library.custom_op("agentopt::weight_only_linear", mutates_args=())
def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                       bits: int, block: int, in_features: int) -> torch.Tensor:
    weight = dequantize_blockwise(qweight, scales, zero_points, bits, block, in_features)  # (N, K)
    return x @ weight.t()


@weight_only_linear.register_fake
def _(x, qweight, scales, zero_points, bits, block, in_features):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))
