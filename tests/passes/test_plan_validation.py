"""Fuzzing the plan-file edge: malformed variants of valid precision and sparse-attention plans (wrong JSON,
unknown keys, wrong types, impossible values, units or layers the model lacks) given to ``agentopt compile``. Each
must end in exit status 2, one ``error:`` line naming the file and the field, no traceback and nothing written."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import cli_error_line, tree

PRECISION_PLAN = {"format": "agentopt-precision-plan", "version": 1, "block_size": 32, "symmetric": True,
                  "units": {"lm_head": "int8", "layers.0.mlp_down": "int4@64"}, "budget": {"max_kl": 0.1},
                  "predicted": {"kl": 0.01}}
SPARSE_PLAN = {"format": "agentopt-sparse-attention-plan",
               "layers": {"1": {"window": 8, "sinks": 2, "stride": 0, "bounded": True, "kv_heads": []}},
               "budget": {"max_kl": 0.1}}
WRONG_TYPES = ("text", 7, -1, 2.5, True, None, [1], {"a": 1}, math.nan)


def _precision_variants():
    for key, value in PRECISION_PLAN.items():
        for bad in WRONG_TYPES:
            if type(bad) is type(value) and isinstance(bad, (dict, bool)):
                continue  # a valid value, or a record (budget: below; predicted: free-form)
            yield f"{key}={bad!r}", {**PRECISION_PLAN, key: bad}, key
    for bad in ("int3", "int4@48", "fp16@64", "int4@", "INT8", "", 8, None, ["int8"]):
        yield f"unit precision {bad!r}", {**PRECISION_PLAN, "units": {"lm_head": bad}}, "lm_head"
    for unit in ("layers.9.mlp_down", "layer.0.mlp_down", "lm_head.weight", "layers.0.attention"):
        yield f"unit {unit}", {**PRECISION_PLAN, "units": {unit: "int8"}}, unit
    yield "unknown key", {**PRECISION_PLAN, "unit": {}}, "unknown field"
    yield "no format", {k: v for k, v in PRECISION_PLAN.items() if k != "format"}, "format"
    yield "no units", {k: v for k, v in PRECISION_PLAN.items() if k != "units"}, "units"
    yield "newer version", {**PRECISION_PLAN, "version": 2}, "version"
    for budget, says in [({"max_kl": "abc"}, "max_kl"), ({"max_kl": -1}, "max_kl"), ({"max_kl": math.nan}, "max_kl"),
                         ({"min_top1": 1.5}, "min_top1"), ({"target_bits": 0}, "target_bits"),
                         ({"max_kld": 0.1}, "unknown field")]:  # read after the compile measures the engine
        yield f"budget {budget}", {**PRECISION_PLAN, "budget": budget}, says


def _sparse_variants():
    for field in ("window", "sinks", "stride", "bounded", "kv_heads"):
        for bad in WRONG_TYPES:
            pattern = {**SPARSE_PLAN["layers"]["1"], field: bad}
            if (field == "window" and isinstance(bad, int) and not isinstance(bad, bool) and bad > 0) or (
                    field in ("sinks", "stride") and bad == 7) or (field == "bounded" and isinstance(bad, bool)) or (
                    field == "kv_heads" and bad == [1]):
                continue  # a valid value of that field
            yield f"{field}={bad!r}", {**SPARSE_PLAN, "layers": {"1": pattern}}, field
    for key in ("x", "-1", "1.0", " 1", "١"):  # the last is an Arabic-Indic digit one: isdigit(), not a layer index
        yield f"layer key {key!r}", {**SPARSE_PLAN, "layers": {key: {"window": 8}}}, "layer"
    yield "layer beyond the model", {**SPARSE_PLAN, "layers": {"7": {"window": 8}}}, "layer"
    yield "kv head beyond the model", {**SPARSE_PLAN, "layers": {"1": {"window": 8, "kv_heads": [5]}}}, "kv_heads"
    yield "no window", {**SPARSE_PLAN, "layers": {"1": {"sinks": 2}}}, "window"
    yield "unknown pattern key", {**SPARSE_PLAN, "layers": {"1": {"window": 8, "sink": 2}}}, "sink"
    yield "unknown key", {**SPARSE_PLAN, "layer": {}}, "unknown field"
    yield "layers a list", {**SPARSE_PLAN, "layers": [{"window": 8}]}, "layers"
    yield "wrong format", {**SPARSE_PLAN, "format": "agentopt-precision-plan"}, "format"


def _refused(capsys, tmp_path, option: str, plan, name: str) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(plan if isinstance(plan, str) else json.dumps(plan))
    before = tree(tmp_path)
    line = cli_error_line(capsys, ["compile", "--model", "tiny-random", "--out", str(tmp_path / "engine"),
                                   "--context-length", "16", "--quiet", option, str(path)])
    assert tree(tmp_path) == before
    return line


@pytest.mark.parametrize("option, variants", [("--precision-plan", _precision_variants),
                                              ("--sparse-attention", _sparse_variants)])
def test_malformed_plans_are_one_clear_error(tmp_path, capsys, option, variants):
    cases = list(variants())
    assert len(cases) > 25
    failures = []
    for index, (label, plan, expected) in enumerate(cases):
        try:
            line = _refused(capsys, tmp_path, option, plan, f"plan{index}")
            assert expected in line, line
        except AssertionError as failure:  # all of them, not only the first
            failures.append(f"{label}: {str(failure)[-300:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("option", ["--precision-plan", "--sparse-attention"])
@pytest.mark.parametrize("text, expected", [("[1]", "must be an object"), ("{", "not valid JSON"),
                                            ("", "not valid JSON"), ("\x00\xff", "not valid JSON")])
def test_plan_files_of_the_wrong_shape(tmp_path, capsys, option, text, expected):
    line = _refused(capsys, tmp_path, option, text, "plan")
    assert "plan.json" in line and expected in line


def test_binary_and_missing_plan_files(tmp_path, capsys):
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    for option in ("--precision-plan", "--sparse-attention"):
        assert "not UTF-8" in cli_error_line(capsys, ["compile", "--out", str(tmp_path / "e"), option,
                                                      str(tmp_path / "binary.json")])
        assert "does not exist" in cli_error_line(capsys, ["compile", "--out", str(tmp_path / "e"), option,
                                                           str(tmp_path / "missing.json")])
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("spec, expected", [("window=0", "window"), ("", "names no pattern"), (" ; ", "no pattern"), ("window=x", "numbers"),
                                            ("window=4,layers=0-999999999", "range"), ("window=4,layers=3-1", "range"),
                                            ("sinks=4", "expected window"), ("window=4,colour=2", "expected window"),
                                            ("window=4,layers=9", "layer"),
                                            ("window=8,layers=0-1;window=4,layers=1", "layer 1 two patterns"),
                                            ("window=8;window=4", "all layers two patterns")])
def test_malformed_sparse_specs(tmp_path, capsys, spec, expected):
    line = cli_error_line(capsys, ["compile", "--model", "tiny-random", "--out", str(tmp_path / "e"), "--quiet",
                                   "--context-length", "16", "--sparse-attention", spec])
    assert expected in line and not (tmp_path / "e").exists()
