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


def quantize_blockwise(weight: torch.Tensor, bits: int, block: int, symmetric: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) fp32 -> (qweight, scales, zero_points) in MatMulNBits' layout. K must be a multiple of ``block``.

    Asymmetric (``symmetric=False``): each block maps [min, max] (0 included) onto all 2^bits levels, with a zero
    point. Symmetric (the default, as in plans): levels q - 2^(bits-1) around the fixed zero point 2^(bits-1)
    (MatMulNBits' default when the zero-point input is absent); ``zero_points`` is then empty, and the engine stores
    none. See _symmetric_scales."""
    n, k = weight.shape
    if k % block:
        raise ValueError(f"in_features {k} is not a multiple of the block size {block}")
    levels = (1 << bits) - 1
    blocks = weight.float().reshape(n, k // block, block)
    if symmetric:
        middle = 1 << (bits - 1)
        scales = _symmetric_scales(blocks, bits)
        q = torch.clamp(torch.round(blocks / scales[..., None]) + middle, 0, levels).to(torch.uint8)
        return _pack(q, bits), scales.contiguous(), torch.empty(0, dtype=torch.uint8)
    low = blocks.amin(-1).clamp(max=0.0)  # include 0 so that zero stays exact
    high = blocks.amax(-1).clamp(min=0.0)
    scales = ((high - low) / levels).clamp(min=1e-12)
    zero = torch.round(-low / scales).clamp(0, levels)
    q = torch.clamp(torch.round(blocks / scales[..., None]) + zero[..., None], 0, levels).to(torch.uint8)
    return _pack(q, bits), scales.contiguous(), _pack(zero.to(torch.uint8), bits)


# clip ratios tried per block: a slightly smaller step that clips a few outliers often lowers the block's error
CLIP_RATIOS = tuple(0.7 + 0.025 * i for i in range(17))  # 0.70 ... 1.10


def _symmetric_scales(blocks: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-block scale (N, K/block) of symmetric quantization, the one of least squared error among CLIP_RATIOS.

    The levels are -2^(bits-1) ... 2^(bits-1) - 1: one more below zero than above. The block's largest-magnitude
    value, with its sign, is mapped onto -2^(bits-1) (the scale is negative when that value is positive), so the
    longer side of the range always meets the block's extreme value: 16 usable levels for int4 instead of the 15 of
    absmax / 7 (ORT's quantizer does the same). Each ratio shrinks or widens that step; a block keeps the best."""
    middle, levels = 1 << (bits - 1), (1 << bits) - 1
    extreme = torch.gather(blocks, -1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)  # (N, K/block), signed
    base = extreme / -middle
    base = torch.where(base.abs() < 1e-12, torch.full_like(base, 1e-12), base)  # all-zero blocks
    best, best_error = base, None
    work = torch.empty_like(blocks)  # one buffer, updated in place: the search is most of a quantization's time
    for ratio in CLIP_RATIOS:
        scale = base * ratio
        step = scale[..., None]
        # ((clamp(round(x / s) + m, 0, L) - m) * s - x)^2, with the clamp shifted by m (exact on integers)
        torch.div(blocks, step, out=work)
        work.round_().clamp_(-middle, levels - middle).mul_(step).sub_(blocks).square_()
        error = work.sum(-1)
        if best_error is None:
            best, best_error = scale, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, scale, best), torch.where(better, error, best_error)
    return best


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
