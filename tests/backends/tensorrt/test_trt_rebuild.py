"""agentopt rebuild: refuses cleanly without TensorRT; with a fake builder, the folder is rewritten atomically."""

import importlib.util
import json
import shutil

import pytest

from agentopt_compiler.backends.tensorrt import builder, rebuild
from agentopt_compiler.cli.main import main
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.runtime.manifest import read_manifest
from tests.backends.tensorrt.trt_fakes import FAKE_TARGET, fake_build
from tests.helpers import cli_error_line

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_rebuild_without_tensorrt_refuses_and_changes_nothing(trt_engine_dir, tmp_path, capsys):
    folder = tmp_path / "eng"
    shutil.copytree(trt_engine_dir, folder)
    before = _snapshot(folder)
    line = cli_error_line(capsys, ["rebuild", str(folder)])
    assert "TensorRT is not installed" in line and "pip install 'agentopt-compiler[tensorrt]'" in line
    assert _snapshot(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]  # no temporary folder left


def test_rebuild_refuses_an_engine_with_contrib_ops(tiny_engine_dir, capsys):
    line = cli_error_line(capsys, ["rebuild", str(tiny_engine_dir)])
    assert "contrib ops TensorRT cannot run" in line and "--attention-impl standard" in line


@pytest.fixture()
def fake_tensorrt(monkeypatch):
    monkeypatch.setattr(builder, "import_tensorrt", lambda: None)
    monkeypatch.setattr(builder, "require_cuda", lambda: None)
    monkeypatch.setattr(builder, "build_plan_file", fake_build)


def test_rebuild_rewrites_plan_and_manifest(trt_engine_dir, tmp_path, fake_tensorrt, capsys):
    folder = tmp_path / "eng"
    shutil.copytree(trt_engine_dir, folder)
    old = json.loads((folder / "manifest.json").read_text())
    assert main(["rebuild", str(folder), "--precision", "fp16", "--typing", "constraints", "--workspace-gib", "1",
                 "--timing-cache", "off", "--quiet"]) == 0
    assert "rebuilt" in capsys.readouterr().out
    manifest = read_manifest(folder)  # hashes of every file verified, the new plan included
    engine = manifest["engine"]
    assert engine["backend"] == "tensorrt" and engine["tensorrt"]["target"] == FAKE_TARGET
    plan = engine["tensorrt"]["plan"]
    assert (plan["precision"], plan["typing"], plan["workspace_bytes"], plan["timing_cache"]) == \
        ("fp16", "constraints", 1 << 30, None)
    assert "rebuilt" in manifest and manifest["model"] == old["model"] and manifest["passes"] == old["passes"]
    assert manifest["files"]["model.onnx"] == old["files"]["model.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["eng"]


def test_rebuild_converts_a_standard_onnxruntime_engine(tmp_path, fake_tensorrt):
    import agentopt_compiler as ao

    folder = tmp_path / "eng"
    ao.compile("tiny-random", out=folder, attention_impl="standard", context_length=32)
    manifest = rebuild.rebuild_engine(folder, {"timing_cache": "off"})
    assert manifest["engine"]["backend"] == "tensorrt" and manifest["engine"]["device"] == "cuda"
    assert (folder / "model.plan").is_file() and read_manifest(folder)["engine"]["plan_file"] == "model.plan"


def test_failed_build_keeps_the_old_engine(trt_engine_dir, tmp_path, fake_tensorrt, monkeypatch):
    folder = tmp_path / "eng"
    shutil.copytree(trt_engine_dir, folder)
    before = _snapshot(folder)

    def failing_build(onnx_path, plan, out_file):
        out_file.write_bytes(b"half")
        raise AgentOptError("TensorRT could not build model.onnx: out of memory")

    monkeypatch.setattr(builder, "build_plan_file", failing_build)
    with pytest.raises(AgentOptError, match="out of memory"):
        rebuild.rebuild_engine(folder)
    assert _snapshot(folder) == before and [p.name for p in tmp_path.iterdir()] == ["eng"]
