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


def test_dense_kv_heads_attend_densely_and_the_others_keep_the_pattern():
    # per query head the output is either the dense or the windowed result: heads 0-1 read KV head 0, 2-3 KV head 1
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, 20, h * D, generator=generator) for h in (HQ, HKV, HKV))
    cache, positions = torch.zeros(B, HKV, T, D), torch.arange(20).expand(B, 20)

    def run(window, dense_kv_heads=None):
        out = cached_attention(q, k, v, cache, cache.clone(), positions, None, None, HQ, HKV, window, 0.0, False,
                               0, 0, False, dense_kv_heads)[0]
        return out.view(B, 20, HQ, D)

    mixed, dense, windowed = run(4, [0]), run(-1), run(4)
    assert torch.equal(mixed[:, :, :2], dense[:, :, :2]) and torch.equal(mixed[:, :, 2:], windowed[:, :, 2:])
    assert not torch.allclose(dense[:, :, 2:], windowed[:, :, 2:])  # 20 tokens > window 4: the split matters
