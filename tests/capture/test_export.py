import pytest
import torch

from agentopt_compiler.capture.export import CaptureError, capture
from agentopt_compiler.passes.infra import op_histogram


def test_captured_program_matches_eager_over_prefill_and_decode(tiny_model):
    program = capture(tiny_model, context_length=32)
    captured = program.module  # owns its own cache buffers
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    tiny_model.setup_cache(1, 32)
    with torch.no_grad():
        for a, b in [(0, 6), (6, 7), (7, 9)]:  # a prompt, one decode step, a 2-token chunk: S is dynamic
            last = torch.tensor([[b - a - 1]])
            expected = tiny_model(ids[:, a:b], torch.arange(a, b), last)
            assert torch.equal(captured(ids[:, a:b], torch.arange(a, b)[None], last), expected)
    assert expected.shape == (1, 1, 320)  # last-token logits only


def test_captured_program_returns_the_logits_of_several_picked_tokens(tiny_model):
    """logits_index (B, L): what prompt-lookup decoding uses to check drafted tokens in one call."""
    program = capture(tiny_model, context_length=32)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    tiny_model.setup_cache(1, 32)
    with torch.no_grad():
        every = tiny_model(ids, torch.arange(7))  # (1, 7, V): all positions
        picked = program.module(ids, torch.arange(7)[None], torch.tensor([[1, 4, 6]]))
    assert picked.shape == (1, 3, 320)
    assert torch.allclose(picked, every[:, [1, 4, 6]], atol=1e-5)


def test_capture_keeps_the_cache_writes_in_the_graph(tiny_model):
    ops = op_histogram(capture(tiny_model, context_length=16).module)
    assert ops["aten.scatter_.src"] == 4  # k and v of 2 layers
    assert ops["aten.scaled_dot_product_attention.default"] == 2


def test_untraceable_model_gets_a_capture_error(tiny_model):
    def data_dependent(self, input_ids, positions=None):
        if input_ids.sum() > 0:  # Python control flow on tensor values cannot be exported
            return input_ids
        return input_ids

    tiny_model.forward = data_dependent.__get__(tiny_model)
    with pytest.raises(CaptureError, match="torch.export could not capture LlamaDecoder"):
        capture(tiny_model, context_length=16)
