"""passes/attention_cores.py: SDPA and eager (soft-capped) attention read as one AttentionCore; other additive masks
are refused with the reason."""

import math

import pytest
import torch

from agentopt_compiler.passes.attention_cores import NoMatch, attention_core, candidates

MIN = torch.finfo(torch.float32).min


class Eager(torch.nn.Module):
    def __init__(self, softcap: float = 0.0, bias_value: float = MIN):
        super().__init__()
        self.softcap, self.bias_value = softcap, bias_value

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.25
        if self.softcap:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        bias = torch.where(mask, 0.0, self.bias_value)
        return torch.matmul(torch.softmax(scores + bias, dim=-1), v)


class Sdpa(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)


def _graph(module):
    q, k, v = (torch.randn(1, 2, 3, 16) for _ in range(3))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    return torch.export.export(module, (q, k, v, mask), strict=False).module().graph


@pytest.mark.parametrize("module, softcap", [(Sdpa(), 0.0), (Eager(), 0.0), (Eager(softcap=2.0), 2.0)])
def test_sdpa_and_eager_attention_read_alike(module, softcap):
    (node,) = candidates(_graph(module))
    core = attention_core(node)
    assert math.isclose(core.scale, 0.25) and math.isclose(core.softcap, softcap)
    assert core.mask is not None and core.mask.op == "placeholder"  # the boolean mask behind the additive one


def test_an_additive_mask_that_does_not_mask_is_refused():
    (node,) = candidates(_graph(Eager(bias_value=-5.0)))  # -5 only lowers scores: not a causal mask
    with pytest.raises(NoMatch):  # never read as a mask, so the sum is not a product of queries and keys
        attention_core(node)
