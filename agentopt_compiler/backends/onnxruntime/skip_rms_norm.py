"""ORT lowering rule: residual add + RMSNormalization -> ``com.microsoft.SkipSimplifiedLayerNormalization``.

Before:                                  After:
    h = Add(x, attn_out)                     y, _, _, h = SkipSimplifiedLayerNormalization(x, attn_out, w,
    y = RMSNormalization(h, w, eps)                                                      epsilon=eps)

Why: every decoder layer has two of these pairs. ORT's CPU kernel does the add and the normalization in one pass over
the hidden state (and ORT's own optimizer does not fuse the opset-23 ``RMSNormalization`` op), so at decode time this
saves two kernel launches per layer. Runs on the ONNX graph because it is specific to ORT's contrib ops; it is
skipped for ``--attention-impl standard``, whose point is standard ONNX only.

Written in onnxscript's pattern / check / rewrite form (its own ``SkipRmsNormFusion`` matches ORT's
``SimplifiedLayerNormalization``, not the standard op we emit). Fires only on a last-axis RMSNormalization of an Add
whose two inputs have the same 2-D or 3-D shape (no broadcasting: the contrib op adds equal shapes only, of those
ranks).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern


class SkipRmsNorm(pattern.RewriteRuleClassBase):
    def pattern(self, op, x, skip, weight):
        residual = op.Add(x, skip, _outputs=["residual"])
        return op.RMSNormalization(residual, weight, _allow_other_attributes=True, _outputs=["normalized"]), residual

    def check(self, context, x, skip, residual, normalized, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if x.shape is None or skip.shape is None or list(x.shape) != list(skip.shape):
            return result.fail("the add broadcasts (or its shapes are unknown)", [x, skip])
        if len(x.shape) not in (2, 3):  # the kernel takes (tokens, hidden) or (batch, tokens, hidden): a 4-D add,
            # e.g. RoPE's on (B, H, S, D) before a q/k norm (HunYuan), stays as it is
            return result.fail(f"the add is {len(x.shape)}-D; the contrib op takes 2-D or 3-D inputs", [x, skip])
        axis = normalized.producer().attributes.get_int("axis", -1)
        if axis not in (-1, len(residual.shape or ()) - 1):
            return result.fail(f"normalizes over axis {axis}, not the last one", normalized)
        return result

    def rewrite(self, op, x, skip, weight, residual, normalized, **_):
        epsilon = normalized.producer().attributes.get_float("epsilon", 1e-5)
        out, _mean, _inv_std, summed = op.SkipSimplifiedLayerNormalization(
            x, skip, weight, epsilon=epsilon, _domain="com.microsoft", _outputs=4)
        for new, old in ((out, normalized), (summed, residual)):
            new.shape, new.type = old.shape, old.type  # later matches (the next layer's add) check shapes
        return out, summed


def fuse_skip_rms_norm(model: ir.Model) -> int:
    """Rewrite every matching pair in ``model``; how many."""
    fused = SkipRmsNorm.rule().apply_to_model(model)
    if fused:
        model.opset_imports.setdefault("com.microsoft", 1)
    return fused
