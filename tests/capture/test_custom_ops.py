"""The fused attention op's ring cache is a memory layout, not new math: it must equal the full-length cache with
the same window, for any way of feeding the tokens."""

import pytest
import torch

from agentopt_compiler.capture.custom_ops import cached_attention, ring_slot_positions

B, HQ, HKV, D, T = 2, 4, 2, 8, 64


def test_slot_positions():
    held = ring_slot_positions(torch.tensor([0, 3, 6, 9]), sinks=2, ring=4)
    assert held.tolist() == [[-1] * 6, [0, 1, 2, -1, -1, -1], [0, 1, 2, 3, 4, 5], [0, 1, 6, 7, 8, 5]]


@pytest.mark.parametrize("window, sinks", [(5, 2), (4, 0), (1, 0), (3, 1)])
@pytest.mark.parametrize("spare", [0, 3])  # ring slots beyond the window
@pytest.mark.parametrize("chunks", [[1] * 20, [12, 1, 1, 9, 3, 1], [30], [2, 3, 4, 5, 6, 7]])
def test_ring_cache_equals_a_full_cache(window, sinks, spare, chunks):
    def run(ring):
        generator = torch.Generator().manual_seed(1)
        cache = torch.zeros(B, HKV, sinks + window + spare if ring else T, D)
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


@pytest.mark.parametrize("written_past_end, spare, equal", [(3, 3, True), (1, 3, True), (5, 3, False)])
def test_spare_ring_slots_absorb_tokens_written_past_the_end(written_past_end, spare, equal):
    # 16 tokens, then `written_past_end` junk tokens (rejected drafts, padding) at positions 16..; then the real
    # tokens from 16 on: with at most `spare` junk tokens the ring gives what a ring that never saw them gives
    # (spare + 1 would still be safe: the slot of position 16 holds one out of the window already; spare + 2 is not)
    window, sinks = 4, 1
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, 24, h * D, generator=generator) for h in (HQ, HKV, HKV))
    junk = [torch.randn(B, written_past_end, h * D, generator=generator) for h in (HQ, HKV, HKV)]

    def feed(state, tensors, start):
        positions = torch.arange(start, start + tensors[0].shape[1]).expand(B, -1)
        return cached_attention(*tensors, *state, positions, None, None, HQ, HKV, window, 0.0, False, sinks, 0, True)

    def run(with_junk):
        cache = torch.zeros(B, HKV, sinks + window + spare, D)
        state = feed((cache, cache.clone()), [t[:, :16] for t in (q, k, v)], 0)[1:]
        if with_junk:
            state = feed(state, junk, 16)[1:]
        return feed(state, [t[:, 16:] for t in (q, k, v)], 16)[0]

    assert torch.allclose(run(True), run(False), atol=1e-6) == equal


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


def test_softcap_and_partial_rotary_follow_their_formulas():
    # softcap: scores -> c * tanh(scores / c) before the softmax; a (T, R) table rotates the first R of D dims only
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 6, h * D, generator=generator) for h in (HQ, HKV, HKV))
    cache, positions = torch.zeros(1, HKV, 16, D), torch.arange(6)[None]
    angles = torch.outer(torch.arange(16).float(), torch.tensor([1.0, 0.1]))  # R = 4 of D = 8
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    out = cached_attention(q, k, v, cache, cache.clone(), positions, cos, sin, HQ, HKV, -1, 0.0, True, 0, 0, False,
                           None, 2.0)[0]

    def rope(x):  # (1, H, 6, D): the reference rotation of the first 4 dims
        turned = x[..., :4]
        rotated = torch.cat([-turned[..., 2:], turned[..., :2]], -1)
        return torch.cat([turned * cos[:6] + rotated * sin[:6], x[..., 4:]], -1)

    q4, k4, v4 = (t.view(1, 6, -1, D).transpose(1, 2) for t in (q, k, v))
    q4, k4 = rope(q4), rope(k4).repeat_interleave(HQ // HKV, 1)
    scores = 2.0 * torch.tanh(q4 @ k4.transpose(-1, -2) / D ** 0.5 / 2.0)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    expected = (scores.softmax(-1) @ v4.repeat_interleave(HQ // HKV, 1)).transpose(1, 2).reshape(1, 6, HQ * D)
    assert (out - expected).abs().max().item() <= 1e-5
