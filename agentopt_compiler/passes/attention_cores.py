"""The attention computations ``fuse_kv_cache`` starts from: one SDPA node, or the same math written out (eager).

    SDPA:   o = aten.scaled_dot_product_attention(q, k, v, mask, scale=s)
    eager:  scores = matmul(q, transpose(k, 2, 3)) * s                  transformers' eager_attention_forward
            scores = tanh(scores / c) * c                               (soft-capping, Gemma 2: c > 0)
            o = matmul(to(softmax(scores + bias, -1)), v)               bias = where(mask, 0, min): additive mask

Both become ``AttentionCore(query, key, value, mask, scale, softcap, output)`` with a boolean mask, so the
fusion matches one pattern whichever way a model wrote its attention. Eager attention is what transformers runs for
models SDPA cannot serve (soft-capped scores); its additive mask must be 0 where ``mask`` holds and at most
-1e30 elsewhere (what transformers and our wrapper build), so that it masks exactly as the boolean mask does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

aten = torch.ops.aten
Node = torch.fx.Node
_SOFTMAX = (aten._softmax.default, aten.softmax.int)
_MATMUL = (aten.matmul.default, aten.bmm.default)
_HUGE_NEGATIVE = -1e30


class NoMatch(Exception):
    """Why a candidate is not the fusable pattern."""


@dataclass
class AttentionCore:
    query: Node  # (B, Hq, S, D)
    key: Node  # (B, Hq, T, D): the cache after the write, heads expanded
    value: Node
    mask: Node | None  # boolean (B or 1, 1, S, T), True where a query sees a key
    scale: float  # 0: 1/sqrt(D)
    softcap: float  # 0: none
    output: Node  # (B, Hq, S, D)
    nodes: list[Node] = field(default_factory=list)  # matched nodes, erased once dead
    dropout: float = 0.0
    is_causal: bool = False


def is_call(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def require(condition: bool, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)


def candidates(graph: torch.fx.Graph) -> list[Node]:
    """SDPA nodes and the softmaxes of eager attention, in graph order."""
    return [n for n in graph.nodes if is_call(n, aten.scaled_dot_product_attention.default, *_SOFTMAX)]


def attention_core(node: Node) -> AttentionCore:
    if is_call(node, aten.scaled_dot_product_attention.default):
        return _sdpa_core(node)
    return _eager_core(node)


def _sdpa_core(sdpa: Node) -> AttentionCore:
    args = list(sdpa.args) + [None] * (7 - len(sdpa.args))
    query, key, value, mask, dropout, is_causal = args[:6]
    return AttentionCore(query, key, value, sdpa.kwargs.get("attn_mask", mask), float(sdpa.kwargs.get("scale") or 0.0),
                         0.0, sdpa, [sdpa], float(sdpa.kwargs.get("dropout_p", dropout) or 0.0),
                         bool(sdpa.kwargs.get("is_causal", is_causal) or False))


def _eager_core(softmax: Node) -> AttentionCore:
    """softmax(scores + bias) -> [to] -> [dropout] -> matmul(., v), scores as in the module docstring."""
    require(softmax.args[1] in (-1, 3), f"{softmax.name} is not a softmax over the keys")
    nodes = [softmax]
    weights = softmax
    while len(weights.users) == 1 and is_call(next(iter(weights.users)), aten.to.dtype, aten._to_copy.default,
                                            aten.dropout.default):
        weights = next(iter(weights.users))
        require(not (is_call(weights, aten.dropout.default) and weights.args[1] and weights.args[2]),
                 "attention with dropout")
        nodes.append(weights)
    users = list(weights.users)
    require(len(users) == 1 and is_call(users[0], *_MATMUL) and users[0].args[0] is weights,
             f"{softmax.name} is not attention (its weights do not multiply the values)")
    output, value = users[0], users[0].args[1]
    scores, bias = _split_bias(softmax.args[0])
    nodes += [softmax.args[0]] if bias is not None else []
    scores, softcap = _soft_cap(scores, nodes)
    raw, scale = _scaled(scores, nodes)
    require(is_call(raw, *_MATMUL), f"{softmax.name}'s scores are not a product of queries and keys")
    query, keys_t = raw.args
    require(is_call(keys_t, aten.transpose.int) and sorted(keys_t.args[1:3]) in ([2, 3], [-2, -1]),
             "the keys are not transposed for the score product")
    nodes += [raw, keys_t, output]
    return AttentionCore(query, keys_t.args[0], value, _boolean_mask(bias), scale, softcap, output, nodes)


def _split_bias(node: Node) -> tuple[Node, Node | None]:
    """scores + bias -> (scores, bias), the bias being the additive mask; (node, None) without one."""
    if is_call(node, aten.add.Tensor) and len(node.args) == 2:
        for scores, bias in (node.args, node.args[::-1]):
            if is_call(scores, aten.mul.Tensor, aten.div.Tensor, *_MATMUL) and _boolean_mask(bias, strict=False):
                return scores, bias
    return node, None


def _soft_cap(node: Node, nodes: list[Node]) -> tuple[Node, float]:
    """tanh(x / c) * c -> (x, c); (node, 0.0) when it is not soft-capped."""
    if is_call(node, aten.mul.Tensor) and isinstance(node.args[1], float) and is_call(node.args[0], aten.tanh.default):
        inner = node.args[0].args[0]
        cap = node.args[1]
        if is_call(inner, aten.div.Tensor) and inner.args[1] == cap:
            nodes += [node, node.args[0], inner]
            return inner.args[0], float(cap)
        if is_call(inner, aten.mul.Tensor) and isinstance(inner.args[1], float) and abs(inner.args[1] * cap - 1) < 1e-6:
            nodes += [node, node.args[0], inner]
            return inner.args[0], float(cap)
    return node, 0.0


def _scaled(node: Node, nodes: list[Node]) -> tuple[Node, float]:
    """x * s or x / d -> (x, s or 1/d); (node, 1.0) when the scores are not scaled (an explicit 1: SDPA's default
    would be 1/sqrt(D))."""
    if is_call(node, aten.mul.Tensor) and isinstance(node.args[1], (int, float)):
        nodes.append(node)
        return node.args[0], float(node.args[1])
    if is_call(node, aten.div.Tensor) and isinstance(node.args[1], (int, float)):
        nodes.append(node)
        return node.args[0], 1.0 / float(node.args[1])
    return node, 1.0


def _boolean_mask(bias, strict: bool = True):
    """The boolean mask behind an additive one: where(mask, 0, -huge) -> mask. ``strict=False``: just whether it is."""
    if (is_call(bias, aten.where.Scalar, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.self)
            and len(bias.args) == 3 and _is_zero(bias.args[1]) and _is_huge_negative(bias.args[2])):
        return bias.args[0] if strict else True
    if strict:
        raise NoMatch("the attention mask is not where(mask, 0, min): an additive mask that is not a causal mask")
    return False


def _is_zero(value) -> bool:
    return isinstance(value, (int, float)) and value == 0


def _is_huge_negative(value) -> bool:
    return isinstance(value, (int, float)) and value <= _HUGE_NEGATIVE
