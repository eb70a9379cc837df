"""The fused attention op's ring cache is a memory layout, not new math: it must equal the full-length cache with
the same window, for any way of feeding the tokens."""

import pytest
import torch

from agentopt_compiler.capture.custom_ops import cached_attention, ring_slot_positions

B, HQ, HKV, D, T = 2, 4, 2, 8, 64


def test_slot_positions():
    held = ring_slot_positions(torch.tensor([0, 3, 6, 9]), sinks=2, window=4)
    assert held.tolist() == [[-1] * 6, [0, 1, 2, -1, -1, -1], [0, 1, 2, 3, 4, 5], [0, 1, 6, 7, 8, 5]]


@pytest.mark.parametrize("window, sinks", [(5, 2), (4, 0), (1, 0), (3, 1)])
@pytest.mark.parametrize("chunks", [[1] * 20, [12, 1, 1, 9, 3, 1], [30], [2, 3, 4, 5, 6, 7]])
def test_ring_cache_equals_a_full_cache(window, sinks, chunks):
    def run(ring):
        generator = torch.Generator().manual_seed(1)
        cache = torch.zeros(B, HKV, sinks + window if ring else T, D)
        k_cache, v_cache, outputs, start = cache, cache.clone(), [], 0
        for n in chunks:
            q, k, v = (torch.randn(B, n, h * D, generator=generator) for h in (HQ, HKV, HKV))
            positions = torch.arange(start, start + n).expand(B, n)
            out, k_cache, v_cache = cached_attention(q, k, v, k_cache, v_cache, positions, None, None, HQ, HKV,
                                                     window, 0.0, False, sinks, 0, ring)
            outputs.append(out)
            start += n
        return torch.cat(outputs, 1)

    assert (run(True) - run(False)).abs().max().item() <= 1e-5
