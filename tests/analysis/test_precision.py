import json

import torch

import pytest

import agentopt_compiler as ao
from agentopt_compiler.analysis.calibration import calibration_batches
from agentopt_compiler.analysis.precision import (Option, choose, choose_greedily,
                                                  measure_fidelity, measure_sensitivity, plan_precision,
                                                  unit_at_precision, unit_linears)
from agentopt_compiler.cli.main import main
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.models.registry import load_model

# fixed, so the tests do not depend on a timing (fp16/bf16 fall back to fp32's, as on ORT CPU)
FLAT_COSTS = {"fp32": 4.0, "int8": 1.0, "int4": 0.5, "int4@128": 0.4}


def test_dynamic_programming_beats_greedy_where_greedy_is_wrong():
    # error budget 1.0. Greedy starts from the cheapest plan (A int4 + B int4: error 1.5) and takes the upgrade with
    # the best error saved per cost added: B -> int8 (0.1 for 0.2), then A -> fp32 (1.0 for 2.5): cost 4.7.
    # The optimum keeps A at int4 and puts B in fp32: error exactly 1.0, cost 4.0.
    options = [
        Option("A", "int4", 1.0, 1, 0, 1.0), Option("A", "fp32", 0.0, 1, 0, 3.5),
        Option("B", "int4", 0.5, 1, 0, 1.0), Option("B", "int8", 0.4, 1, 0, 1.2), Option("B", "fp32", 0.0, 1, 0, 3.0),
    ]
    spend, objective = (lambda o: o.kl), (lambda o: o.cost)
    greedy = choose_greedily(options, 1.0, spend, objective)
    exact = choose(options, 1.0, spend, objective)
    assert {u: o.precision for u, o in greedy.items()} == {"A": "fp32", "B": "int8"}
    assert {u: o.precision for u, o in exact.items()} == {"A": "int4", "B": "fp32"}
    assert sum(o.kl for o in exact.values()) <= 1.0
    assert sum(o.cost for o in exact.values()) == 4.0 < sum(o.cost for o in greedy.values())


def test_no_plan_within_an_impossible_budget():
    with pytest.raises(AgentOptError, match="no plan meets"):
        choose([Option("A", "int4", 0.5, 1, 0, 1.0)], 0.1, lambda o: o.kl, lambda o: o.cost)


@pytest.fixture(scope="module")
def tiny_plan():
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=2, length=48)
    return plan_precision(loaded.model, batches, max_kl=0.002, costs=FLAT_COSTS)


def test_plan_meets_its_budget_and_uses_cheaper_precisions(tiny_plan):
    plan, options = tiny_plan
    assert plan.predicted["kl"] <= 0.002
    assert set(plan.units.values()) & {"int8", "int4"}
    assert len({o.unit for o in options}) == 9  # 4 units x 2 layers + lm_head


def test_other_budgets():
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=1, length=32)
    plan, options = plan_precision(loaded.model, batches, target_bits=6.0, costs=FLAT_COSTS)
    weights = sum(o.bytes for o in options if o.precision == "fp32") / 4
    assert plan.predicted["bytes"] * 8 <= 6.0 * weights
    plan, _ = plan_precision(loaded.model, batches, min_top1=0.95, costs=FLAT_COSTS)
    assert plan.predicted["checked_top1"] >= 0.95
    with pytest.raises(AgentOptError, match="exactly one budget"):
        plan_precision(loaded.model, batches, max_kl=0.1, min_top1=0.9, costs=FLAT_COSTS)
    # without fp32 among the candidates (the weight count came from fp32's bytes: a zero budget), and at the edge
    plan, _ = plan_precision(loaded.model, batches, target_bits=6.0, candidates=["int8", "int4"], costs=FLAT_COSTS)
    assert plan.predicted["bytes"] * 8 <= 6.0 * weights
    edge, _ = plan_precision(loaded.model, batches, target_bits=5.0, costs=FLAT_COSTS)  # int4 + scales: exactly 5
    assert set(edge.units.values()) == {"int4"}
    with pytest.raises(AgentOptError, match="the fewest bits per weight these candidates reach is 5 "):
        plan_precision(loaded.model, batches, target_bits=4.0, costs=FLAT_COSTS)


def test_min_top1_holds_for_the_plan_as_checked_not_for_summed_unit_losses():
    # top-1 flips of different units overlap, so their sum overstates the plan's: the planner searches the per-unit
    # budget, keeping only plans whose checked top-1 meets the target
    loaded = load_model("agent-tiny")
    batches = calibration_batches(loaded, None, sequences=2, length=64)
    plan, options = plan_precision(loaded.model, batches, min_top1=0.97, costs=FLAT_COSTS)
    by_sum = choose(options, 1 - 0.97, lambda o: 1 - o.top1, lambda o: o.cost)
    assert plan.predicted["checked_top1"] >= 0.97
    assert plan.predicted["top1_loss"] > 1 - 0.97  # the units' summed losses: over the target, the plan within it
    assert plan.predicted["decode_matmul_seconds"] < sum(o.cost for o in by_sum.values())


def test_compiled_engine_keeps_the_budget_its_plan_claims(tiny_plan, tmp_path):
    plan, _ = tiny_plan
    engine = ao.compile("tiny-random", out=tmp_path / "q", context_length=96, precision_plan=plan)
    measured = engine.compile_report.fidelity
    assert "+int8/int4 blocks, " in engine.compile_report.weights  # what the engine holds, said
    assert measured["kl"] <= plan.budget["max_kl"], (measured, plan.predicted)
    assert ao.load_engine(tmp_path / "q").manifest["precision_plan"]["measured"] == measured  # recorded
    # ... next to the built engine's decode speed, every run kept
    assert len(measured["decode_runs"]) == 3 and measured["decode_tokens_per_s"] in measured["decode_runs"]
    assert any("tokens/s" in line for line in engine.compile_report.lines())
    full = ao.compile("tiny-random", out=tmp_path / "fp32", context_length=96)
    loaded = load_model("tiny-random")
    assert measure_fidelity(full, loaded.model, calibration_batches(loaded, None, 1, 32, seed=5))["kl"] < 1e-9
    # an engine of several cache rows, measured as one sequence, the same as the one-row engine (a planned compile
    # at --batch-size 3 failed at its end: one row of tokens for three cache rows)
    batched = ao.compile("tiny-random", out=tmp_path / "b3", context_length=96, precision_plan=plan, batch_size=3)
    assert batched.compile_report.fidelity["kl"] == pytest.approx(measured["kl"], rel=1e-3, abs=1e-7)


def test_cli_writes_plan_report_and_plot(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "precision", "--model", "tiny-random", "--max-kl", "0.01", "--sequences", "1",
                 "--length", "32", "--out", str(out), "--report", str(tmp_path / "report")]) == 0
    plan = json.loads(out.read_text())
    assert plan["format"] == "agentopt-precision-plan" and plan["budget"] == {"max_kl": 0.01}
    assert plan["symmetric"] is True  # the default; --asymmetric below
    assert "| unit | chosen |" in capsys.readouterr().out
    assert (tmp_path / "report" / "sensitivity.png").stat().st_size > 1000
    assert main(["compile", "--model", "tiny-random", "--out", str(tmp_path / "eng"), "--context-length", "64",
                 "--precision-plan",
                 str(out), "--quiet"]) == 0


def test_a_cost_model_timed_on_a_busy_machine_is_said_to_be_noisy(tmp_path, capsys, monkeypatch, fixed_cost_model):
    from agentopt_compiler.analysis.cost_model import CACHE_FILE

    entries = json.loads((fixed_cost_model / CACHE_FILE).read_text())
    for entry in entries.values():
        entry["noise"] = {"fp32": 0.04, "int8@32": 0.23}
    (tmp_path / CACHE_FILE).write_text(json.dumps(entries))
    monkeypatch.setenv("AGENTOPT_CACHE_DIR", str(tmp_path))
    assert main(["plan", "precision", "--model", "tiny-random", "--max-kl", "0.01", "--sequences", "1",
                 "--length", "32", "--out", str(tmp_path / "plan.json")]) == 0
    err = capsys.readouterr().err
    assert "noise 23.0% (over the 10% its measurement aims for" in err and "--refresh-cost-model" in err


def test_asymmetric_plans_measure_what_they_will_run(tmp_path):
    """--asymmetric: the plan says so, and sensitivity is measured with zero-point blocks (other errors, 1 more byte
    per block) rather than with the symmetric ones the default plan gets."""
    out = tmp_path / "plan.json"
    assert main(["plan", "precision", "--model", "tiny-random", "--max-kl", "0.01", "--sequences", "1",
                 "--length", "32", "--asymmetric", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["symmetric"] is False
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=1, length=32)
    by_mode = {mode: {(o.unit, o.precision): o for o in measure_sensitivity(loaded.model, batches, ["fp32", "int4"],
                                                                            costs=FLAT_COSTS, symmetric=mode)}
               for mode in (True, False)}
    unit = ("layers.0.mlp_down", "int4")
    assert by_mode[False][unit].kl != by_mode[True][unit].kl
    elements = sum(layer.weight.numel() for layer in unit_linears(loaded.model)["layers.0.mlp_down"])
    assert by_mode[False][unit].bytes - by_mode[True][unit].bytes == elements // 32


def test_a_zero_budget_keeps_only_free_options():
    options = [Option("A", "fp32", 0.0, 1, 0, 4.0), Option("A", "int4", 0.3, 1, 0, 1.0)]
    chosen = choose(options, 0.0, lambda o: o.kl, lambda o: o.cost)
    assert chosen["A"].precision == "fp32"


@pytest.mark.parametrize("precision, dtype", [("fp16", "float16"), ("bf16", "bfloat16")])
def test_half_units_compute_what_a_half_region_computes(precision, dtype):
    import torch

    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 64)
    x = torch.randn(3, 256)
    weight = layer.weight.data.clone()
    half = getattr(torch, dtype)
    native = torch.nn.functional.linear(x.to(half), layer.weight.to(half), layer.bias.to(half)).float()
    with unit_at_precision([layer], precision, 32):
        emulated = layer(x)
    assert emulated.dtype == torch.float32
    assert torch.allclose(emulated, native, rtol=2e-3, atol=1e-5)  # the region's math, on fp32 inputs
    assert not torch.equal(emulated, layer(x))  # ... which is not fp32's
    assert torch.equal(layer.weight.data, weight) and not layer._forward_hooks and not layer._forward_pre_hooks


def test_half_candidates_are_measured_not_assumed_lossless():
    # fp16/bf16 used to be scored as fp32 (KL 0): a plan could pick them for free
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=1, length=32)
    options = measure_sensitivity(loaded.model, batches, ("fp32", "fp16", "bf16", "int8"), costs=FLAT_COSTS)
    kl = {(o.unit, o.precision): o.kl for o in options}
    units = {o.unit for o in options}
    assert all(kl[u, "fp16"] > 0 for u in units)
    # bf16 keeps 8 mantissa bits to fp16's 11: its error is larger on every unit
    assert all(kl[u, "bf16"] > kl[u, "fp16"] for u in units)
    with pytest.raises(AgentOptError, match="unknown precision 'int2'"):
        measure_sensitivity(loaded.model, batches, ("fp32", "int2"), costs=FLAT_COSTS)


def test_units_can_be_planned_at_their_own_block_size():
    """int4@128 is measured with 128-blocks (more error than 32-blocks, fewer scale bytes), and a plan may pick it."""
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=1, length=32)
    options = measure_sensitivity(loaded.model, batches, ("fp32", "int4", "int4@128"), costs=FLAT_COSTS)
    by = {(o.unit, o.precision): o for o in options}
    down = ("layers.0.mlp_down", "int4"), ("layers.0.mlp_down", "int4@128")  # in-features 128
    elements = sum(layer.weight.numel() for layer in unit_linears(loaded.model)["layers.0.mlp_down"])
    assert by[down[0]].bytes - by[down[1]].bytes == elements // 32 * 4 - elements // 128 * 4
    assert by[down[1]].kl > by[down[0]].kl
    assert ("layers.0.attn_qkv", "int4@128") not in by  # in-features 64: 128-blocks do not tile it, no option
    plan, _ = plan_precision(loaded.model, batches, max_kl=1.0, candidates=("fp32", "int4", "int4@128"),
                             costs=FLAT_COSTS)
    assert "int4@128" in plan.units.values()  # the cheapest, and the budget allows it where it applies
    with pytest.raises(AgentOptError, match=r"no time for \['int4@64'\]"):
        measure_sensitivity(loaded.model, batches, ("fp32", "int4@64"), costs=FLAT_COSTS)


@pytest.mark.parametrize("symmetric", [True, False])
def test_cost_model_times_every_kernel_in_ort(symmetric):
    # the timing graphs carry MatMulNBits inputs in the engine's layout (ORT rejects a wrong scale or zero-point
    # shape); what the times are is the benchmark's business, not a test's
    from agentopt_compiler.analysis.cost_model import measure_cost_model

    model = measure_cost_model(1, symmetric, ("fp32", "int8@32", "int4@32", "int4@128"), weights_mib=2,
                               shape=(256, 512), repeats=4, attempts=2)
    assert set(model.seconds_per_weight) == {"fp32", "int8@32", "int4@32", "int4@128"}
    assert all(c > 0 for c in model.seconds_per_weight.values())
    assert model.machine["symmetric"] is symmetric


def test_cached_layer_inputs_measure_what_whole_forwards_measure():
    """Each unit is measured from its layer's cached input (and the lm_head from its own): the KL and top-1 equal
    the old whole-forward measurement in float64, for lossy, mild (fp16, KL ~1e-8) and lm_head units alike."""
    from agentopt_compiler.analysis.precision import Calibration, _compare, _log_probs

    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=2, length=32)
    calibration = Calibration(loaded.model, batches)
    assert calibration.partial and calibration.tokens == 64
    reference = _log_probs(loaded.model, batches)
    options = {(o.unit, o.precision): o for o in measure_sensitivity(
        loaded.model, batches, ("fp32", "fp16", "int8", "int4"), costs=FLAT_COSTS, calibration=calibration)}
    linears = unit_linears(loaded.model)
    for unit in ("layers.0.attn_qkv", "layers.1.mlp_down", "lm_head"):
        for precision in ("fp16", "int8", "int4"):
            with unit_at_precision(linears[unit], precision, 32):
                kl, top1 = _compare(reference, _log_probs(loaded.model, batches))
            option = options[unit, precision]
            assert option.kl == pytest.approx(kl, rel=1e-3, abs=1e-12), (unit, precision)
            assert option.top1 == top1
    assert options["layers.0.attn_qkv", "fp32"].kl == 0.0


def test_scaled_sensitivity_is_close_to_exact():
    """One propagation per layer unit (its most lossy candidate), the others scaled by their output error: close to
    propagating each (within 8% on ref-60m; here a 2-layer random model), and the probe itself exact."""
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=2, length=32)
    candidates = ("fp32", "int8", "int4", "int4@64")
    exact, scaled = ({(o.unit, o.precision): o.kl for o in measure_sensitivity(
        loaded.model, batches, candidates, costs={**FLAT_COSTS, "int4@64": 0.45}, method=method)}
        for method in ("exact", "scaled"))
    assert exact.keys() == scaled.keys()
    for key, kl in exact.items():
        assert scaled[key] == pytest.approx(kl, rel=0.3, abs=1e-9), key
    assert any(scaled[key] == exact[key] for key in exact if key[1] == "int4@64")  # probes are exact
    with pytest.raises(AgentOptError, match="unknown sensitivity method"):
        measure_sensitivity(loaded.model, batches, candidates, costs=FLAT_COSTS, method="guess")


def test_a_model_without_reusable_layers_is_measured_by_whole_forwards():
    from agentopt_compiler.analysis.precision import Calibration

    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=1, length=16)

    class Wrapped(torch.nn.Module):  # no .layers / .norm / .lm_head of its own: nothing to start from
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids)

    calibration = Calibration(Wrapped(loaded.model), batches)
    assert not calibration.partial
    assert calibration.divergence(0) == (0.0, 1.0)


def test_plan_records_its_measurements_and_is_the_same_twice():
    from agentopt_compiler.analysis.cost_model import CostModel

    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=2, length=32)
    model = CostModel({"fp32": 4e-10, "int8@32": 1.7e-10, "int4@32": 1.2e-10, "int4@64": 1.1e-10}, {"fp32": 0.01},
                      {"cpu": "test"}, "now")
    plans = [plan_precision(loaded.model, batches, max_kl=0.002, candidates=("fp32", "int8", "int4", "int4@64"),
                            cost_model=model, margin=0.0)[0] for _ in range(2)]
    first, second = (p.to_dict() for p in plans)
    for d in (first, second):
        for key in ("sensitivity_seconds", "planning_seconds"):
            d["measurements"].pop(key)
    assert first == second
    m = plans[0].measurements
    assert m["cost_model"]["seconds_per_weight"] == model.seconds_per_weight and m["cost_model"]["kind"] == "per-format"
    assert [u["precision"] for u in m["uniform"]] == ["int8", "int4", "int4@64"]
    assert plans[0].predicted["checked_kl"] <= 0.002  # checked end to end, within the budget
    assert m["sensitivity"] == "scaled, from cached layer inputs" and m["calibration_tokens"] == 64
    # each format costs what the model measured for it: int4@64 was given less time per weight than int4 (at 32)
    by = {u["precision"]: u for u in m["uniform"]}
    assert by["int4@64"]["decode_matmul_seconds"] < by["int4"]["decode_matmul_seconds"]
    with pytest.raises(AgentOptError, match=r"no time for \['int4@128'\]"):  # a format the model never timed
        plan_precision(loaded.model, batches, max_kl=0.002, candidates=("fp32", "int4@128"), cost_model=model)


def test_a_mixed_plan_no_faster_than_a_uniform_one_gives_way_to_it():
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=2, length=32)
    costs = {"fp32": 4.0, "int8": 1.0, "int4": 0.9}
    mixed, _ = plan_precision(loaded.model, batches, max_kl=0.01, costs=costs, margin=0.0)
    assert mixed.measurements["choice"] == "mixed" and len(set(mixed.units.values())) > 1
    # a uniform int8 plan has a lower KL; asked to be 50% faster than it, the mixed plan gives way
    uniform, _ = plan_precision(loaded.model, batches, max_kl=0.01, costs=costs, margin=0.5)
    assert uniform.measurements["choice"].startswith("uniform int8")
    assert set(uniform.units.values()) == {"int8"}
    assert uniform.predicted["checked_kl"] <= mixed.predicted["checked_kl"]


def test_a_plan_over_budget_end_to_end_is_chosen_again_tighter():
    """Per-unit errors are summed to choose; the plan is then checked with all units at once and, when that exceeds
    the budget, chosen again under a proportionally smaller per-unit budget."""
    loaded = load_model("tiny-random")
    batches = calibration_batches(loaded, None, sequences=2, length=32)
    plan, _ = plan_precision(loaded.model, batches, max_kl=0.01, costs=FLAT_COSTS, margin=0.0)
    assert plan.predicted["checked_kl"] <= 0.01
    assert plan.measurements["per_unit_kl_budget"] <= 0.01


def test_cost_model_is_measured_once_and_cached(tmp_path):
    from agentopt_compiler.analysis.cost_model import cached_cost_model

    path = tmp_path / "cost_model.json"
    small = dict(weights_mib=2, shape=(256, 256), repeats=4, attempts=2)
    first = cached_cost_model(1, path=path, formats=("fp32", "int4@32"), **small)
    assert first.source == "measured" and set(first.seconds_per_weight) == set(first.noise) == {"fp32", "int4@32"}
    assert all(v > 0 for v in first.seconds_per_weight.values())
    again = cached_cost_model(1, path=path, formats=("int4@32",))
    assert again.source.startswith("cached") and again.seconds_per_weight == first.seconds_per_weight
    # a format the cache lacks is measured with the cached ones and the entry rewritten
    more = cached_cost_model(1, path=path, formats=("int4@64",), **small)
    assert more.source == "measured" and set(more.seconds_per_weight) == {"fp32", "int4@32", "int4@64"}
    assert cached_cost_model(1, path=path, formats=("int4@64", "fp32")).source.startswith("cached")
    path.write_text("not json")  # a broken cache is measured again, not an error
    assert cached_cost_model(1, path=path, **small).source == "measured"
    with pytest.raises(AgentOptError, match="at least 4 repeats"):
        cached_cost_model(1, path=tmp_path / "other.json", refresh=True, repeats=2)


def test_formats_the_host_cannot_tell_apart_cost_the_same():
    from agentopt_compiler.analysis.cost_model import _tie_within, format_of

    measured = {"fp32": 4.3e-10, "int4@32": 1.04e-10, "int4@64": 0.93e-10, "int4@128": 1.21e-10, "int8@32": 1.6e-10}
    tied = _tie_within(dict.fromkeys(measured, 0.15), measured)
    assert tied["int4@32"] == tied["int4@64"] == pytest.approx((1.04e-10 + 0.93e-10) / 2)  # within 15% of the fastest
    assert tied["int4@128"] == 1.21e-10 and tied["fp32"] == 4.3e-10 and tied["int8@32"] == 1.6e-10
    noisy = _tie_within({**dict.fromkeys(measured, 0.1), "int4@128": 0.35}, measured)  # 30% apart, noise 35%
    assert noisy["int4@32"] == noisy["int4@64"] == noisy["int4@128"] == pytest.approx(1.04e-10)
    assert format_of("int4", 32) == "int4@32" and format_of("int4@128", 32) == "int4@128"
    assert format_of("fp16", 32) == format_of("fp32", 32) == "fp32"
    with pytest.raises(AgentOptError, match="int8@B or int4@B"):
        from agentopt_compiler.analysis.cost_model import measure_cost_model
        measure_cost_model(1, formats=("int4",))


def test_the_report_table_has_a_column_for_every_precision_any_unit_measured():
    from agentopt_compiler.cli.plan_cmd import _markdown

    rows = [{"unit": "layers.0.attn_qkv", "chosen": "fp32", "kl_fp32": 0.0, "top1_fp32": 1.0},  # 128 does not fit
            {"unit": "layers.0.attn_o", "chosen": "int4", "kl_fp32": 0.0, "top1_fp32": 1.0, "kl_int4": 1e-3,
             "top1_int4": 0.9}]
    table = _markdown(rows).splitlines()
    assert "KL int4 | top-1 int4" in table[0]
    assert table[2].endswith("| n/a | n/a |") and table[3].endswith("| 1.00e-03 | 0.900 |")


def test_a_large_calibration_file_is_read_only_as_far_as_the_tokens_needed(tmp_path, monkeypatch):
    """A 264 MB file was read and tokenized whole (24 GB of memory, then the OOM killer): only a prefix of a few
    bytes per token needed is, cut at a whole character."""
    from agentopt_compiler.runtime.tokenizer import Tokenizer

    path = tmp_path / "calib.txt"
    path.write_text("é voilà " * 400_000)  # 4 MB, with 2-byte characters
    seen, encode = [], Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, *a, **k: seen.append(len(text)) or encode(
        self, text, *a, **k))
    batches = calibration_batches(load_model("agent-tiny"), path, sequences=2, length=16)
    assert [b.shape for b in batches] == [(1, 16), (1, 16)]
    assert seen and max(seen) < (1 << 20)  # characters of the first MiB, not the file's 3.2 M
