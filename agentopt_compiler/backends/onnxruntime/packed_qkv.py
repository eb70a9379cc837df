"""ORT lowering rule: feed GroupQueryAttention the packed q/k/v projection instead of its three slices.

Before:                                          After:
    qkv = MatMul(x, W_qkv)                           qkv = MatMul(x, W_qkv)
    q, k, v = Split(qkv, axis=-1)                    out, k', v' = GroupQueryAttention(qkv, None, None, past_k,
    out, k', v' = GroupQueryAttention(q, k, v,                                        past_v, ...)
                                      past_k, past_v, ...)

Why: ``pack_qkv_projections`` already makes one matmul per layer; GroupQueryAttention accepts that packed tensor
(key and value omitted: ``query`` holds Hq + 2 * Hkv heads) and splits it while it applies RoPE, so the Split node
and its three copies of the projection disappear from every decode step (what onnxruntime-genai's builder emits).

Written in onnxscript's pattern / check / rewrite form (its own ``PackedQKVForGQAFusion`` matches three Slices and
a GroupQueryAttention without windows or soft-capping; ours are one Split and carry every attribute over). Fires only
when the three GQA inputs are, in order, the only uses of the three outputs of one last-axis Split whose sizes are
the q, k and v widths. Not with fp16 caches (casts sit between the Split and GQA) and not for standard ONNX engines
(GroupQueryAttention is an ORT contrib op).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


class PackedQkv(pattern.RewriteRuleClassBase):
    def pattern(self, op, packed, sizes):
        q, k, v = op.Split(packed, sizes, _allow_other_attributes=True, _outputs=["q", "k", "v"])
        return op.GroupQueryAttention(q, k, v, _domain="com.microsoft", _allow_other_inputs=True,
                                      _allow_other_attributes=True, _outputs=["out", "present_k", "present_v"])

    def check(self, context, packed, sizes, q, k, v, out, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if any(len(value.uses()) != 1 for value in (q, k, v)):
            return result.fail("a slice has other uses than the attention", [q, k, v])
        split = q.producer()
        rank = len(packed.shape) if packed.shape is not None else None
        if rank is None or split.attributes.get_int("axis", 0) not in (-1, rank - 1):
            return result.fail("the split is not over the last axis", packed)
        attention = out.producer()
        heads, kv_heads = attention.attributes.get_int("num_heads"), attention.attributes.get_int("kv_num_heads")
        widths = sizes.const_value.numpy().tolist() if sizes.const_value is not None else None
        if widths is None or len(widths) != 3 or widths[1] != widths[2] or widths[0] * kv_heads != widths[1] * heads:
            return result.fail(f"split sizes {widths} are not the q, k and v widths", sizes)
        return result

    def rewrite(self, op, packed, out, **_):
        attention = out.producer()
        return op.GroupQueryAttention(packed, None, None, *attention.inputs[3:], _domain="com.microsoft",
                                      _outputs=3, **{name: attr for name, attr in attention.attributes.items()})


def feed_packed_qkv(model: ir.Model) -> int:
    """Rewrite every matching Split + GroupQueryAttention in ``model``; how many."""
    return PackedQkv.rule().apply_to_model(model)
