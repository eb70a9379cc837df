"""agent_tiny.interpolate: the weights on the line between two runs, and clear errors for pairs that have no line."""

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from safetensors.torch import load_file, save_file  # noqa: E402

from agentopt_compiler.agent_tiny.interpolate import interpolate, main  # noqa: E402
from agentopt_compiler.errors import AgentOptError  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "agentopt_compiler" / "models" / "agent_tiny"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The shipped folder and a copy with every weight moved by a seeded random step (as a fine-tune would)."""
    tuned = tmp_path_factory.mktemp("tuned")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SHIPPED / name, tuned / name)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in
             load_file(str(SHIPPED / "model.safetensors")).items()}
    save_file(state, str(tuned / "model.safetensors"))
    return SHIPPED, tuned


def test_interpolation_is_the_weighted_mean_with_both_ends_exact(pair, tmp_path):
    base, tuned = pair
    a, b = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    for weight in (0.0, 0.3, 1.0):
        out = interpolate(base, tuned, weight, tmp_path / f"w{weight}")
        got = load_file(str(out / "model.safetensors"))
        for k in a:
            want = a[k] if weight == 0.0 else b[k] if weight == 1.0 else 0.7 * a[k] + 0.3 * b[k]
            torch.testing.assert_close(got[k], want, rtol=0, atol=0 if weight in (0.0, 1.0) else 1e-6)
    meta = json.loads((tmp_path / "w0.3" / "interpolation.json").read_text())
    assert meta["weight"] == 0.3 and meta["tuned"] == str(tuned)
    assert (tmp_path / "w0.3" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_pairs_without_a_line_between_them_are_refused(pair, tmp_path):
    base, tuned = pair
    other = tmp_path / "other"
    shutil.copytree(tuned, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["added_tokens"] = tok["added_tokens"][:-1]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(AgentOptError, match="different tokenizers"):
        interpolate(base, other, 0.5, tmp_path / "x")
    cfg = json.loads((base / "config.json").read_text())
    shutil.copyfile(base / "tokenizer.json", other / "tokenizer.json")
    (other / "config.json").write_text(json.dumps({**cfg, "num_layers": cfg["num_layers"] + 1}))
    with pytest.raises(AgentOptError, match="different shapes"):
        interpolate(base, other, 0.5, tmp_path / "x")
    with pytest.raises(AgentOptError, match="from 0"):
        interpolate(base, tuned, 1.5, tmp_path / "x")
    with pytest.raises(AgentOptError, match="no config.json, model.safetensors"):
        interpolate(base, tmp_path, 0.5, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(SHIPPED), str(tmp_path), "--weight", "0.5", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
