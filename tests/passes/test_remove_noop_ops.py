import torch

from agentopt_compiler.capture.export import capture
from agentopt_compiler.passes.infra import op_histogram
from agentopt_compiler.passes.remove_noop_ops import RemoveNoopOps


def test_removes_identity_casts_and_asserts_and_keeps_numerics(tiny_model):
    program = capture(tiny_model, context_length=32)
    gm = program.module
    before = op_histogram(gm)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        args = (ids, torch.arange(7)[None], torch.tensor([[6]]))
        expected = program.module(*args)
        result = RemoveNoopOps()(gm)
        after = op_histogram(gm)
        actual = gm(*args)
    assert before["aten.to.dtype"] == 10 and after["aten.to.dtype"] == 0
    assert before["aten._assert_tensor_metadata.default"] == 10 and after["aten._assert_tensor_metadata.default"] == 0
    assert result.stats == {"_assert_tensor_metadata": 10, "to": 10}
    assert sum(before.values()) - sum(after.values()) == 20
    assert torch.equal(actual, expected)


class CastsAndCopies(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("state", torch.zeros(4))

    def forward(self, x):
        half = x.to(torch.float16)  # a real cast: must stay
        same = x.to(torch.float32)  # identity cast: goes
        snapshot = self.state.clone()  # snapshot of a buffer that is mutated below: must stay
        self.state.add_(x)
        return half.float() + same + snapshot


def test_does_not_touch_real_casts_or_needed_copies():
    module = CastsAndCopies()
    gm = torch.export.export(module, (torch.ones(4),)).module()
    before = op_histogram(gm)
    result = RemoveNoopOps()(gm)
    after = op_histogram(gm)
    assert result.stats.get("to") == 1  # only the fp32 -> fp32 cast
    assert after["aten.clone.default"] == before["aten.clone.default"] == 1
    assert any("float16" in note for note in result.notes)
    assert any("mutated in place" in note for note in result.notes)
    out1, out2 = gm(torch.ones(4)), gm(torch.ones(4))
    assert torch.equal(out1, torch.full((4,), 2.0)) and torch.equal(out2, torch.full((4,), 3.0))  # snapshot kept
