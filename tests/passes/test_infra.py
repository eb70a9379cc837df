import pytest
import torch

from agentopt_compiler.capture.export import capture
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.passes.infra import GraphPass, PassPipeline, PassResult
from agentopt_compiler.passes.remove_noop_ops import RemoveNoopOps


class CountLinears(GraphPass):
    """Changes nothing; reports how many linears it saw."""
    name = "count_linears"

    def call(self, gm):
        n = sum(1 for node in gm.graph.nodes if node.target == torch.ops.aten.linear.default)
        return PassResult(False, {"linears": n})


class Broken(GraphPass):
    name = "broken"

    def call(self, gm):
        raise RuntimeError("boom")


def test_pipeline_runs_in_order_records_stats_and_dumps(tiny_model, tmp_path):
    program = capture(tiny_model, context_length=16)
    pipeline = PassPipeline([CountLinears(), RemoveNoopOps()])
    new_program, records = pipeline.run(program, debug_dump=tmp_path)
    assert [r.name for r in records] == ["count_linears", "remove_noop_ops"]
    assert records[0].stats == {"linears": 15}
    assert records[1].stats["to"] == 10 and records[1].ops_after < records[1].ops_before
    assert new_program is not program  # re-exported after a change
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps == ["00-captured.txt", "01-count_linears.txt", "02-remove_noop_ops.txt"]
    assert "aten.to.dtype" in (tmp_path / "00-captured.txt").read_text()
    assert "aten.to.dtype" not in (tmp_path / "02-remove_noop_ops.txt").read_text()


def test_skipped_pass_is_recorded_and_unchanged_program_is_not_reexported(tiny_model):
    program = capture(tiny_model, context_length=16)
    new_program, records = PassPipeline([CountLinears(), RemoveNoopOps()]).run(program, skip={"remove_noop_ops"})
    assert records[1].skipped and records[1].stats == {}
    assert new_program is program


def test_unknown_skip_names_the_passes(tiny_model):
    program = capture(tiny_model, context_length=16)
    with pytest.raises(AgentOptError, match="unknown pass to skip: nope; passes are: count_linears"):
        PassPipeline([CountLinears()]).run(program, skip={"nope"})


def test_failing_pass_error_names_the_passes_before_it(tiny_model):
    program = capture(tiny_model, context_length=16)
    with pytest.raises(AgentOptError, match="pass broken failed.*boom.*ran before it: count_linears"):
        PassPipeline([CountLinears(), Broken()]).run(program)
