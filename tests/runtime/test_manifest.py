import json
import shutil

import pytest

import agentopt_compiler as ao
from agentopt_compiler.errors import EngineError


@pytest.fixture()
def engine_copy(tiny_engine_dir, tmp_path):
    return shutil.copytree(tiny_engine_dir, tmp_path / "engine")


def test_manifest_describes_the_engine(tiny_engine_dir):
    manifest = json.loads((tiny_engine_dir / "manifest.json").read_text())
    assert manifest["format"] == "agentopt-engine" and manifest["format_version"] == 1
    assert manifest["engine"]["backend"] == "onnxruntime" and manifest["engine"]["context_length"] == 96
    assert {"torch", "onnx", "onnxruntime", "agentopt-compiler"} <= set(manifest["dependencies"])
    assert manifest["model"]["config"]["num_layers"] == 2
    assert [p["name"] for p in manifest["passes"]] == ["remove_noop_ops", "fuse_kv_cache", "pack_qkv_projections",
                                                     "insert_sparse_attention", "set_kv_cache_dtype",
                                                     "assign_layer_precision"]
    assert manifest["engine"]["attention"]["fused_layers"] == 2 and manifest["engine"]["attention"]["impl"] == "gqa"
    assert manifest["sparse_attention"] is None
    assert manifest["engine"]["cache_update"] == "in_place"
    # 2 layers x 2 norms, less the first; one packed q/k/v per layer
    # tiny-random's RoPE tables are small enough for the exporter's own folding: nothing left for constant_slices
    # dynamic_rows 1: the batch dimension is symbolic, and running it proved rows independent; the reference module
    # writes no batch-sized head shapes (rows_copied_in_reshapes: 0)
    assert manifest["engine"]["lowering_rules"] == {"rows_copied_in_reshapes": 0, "skip_rms_norm": 3,
                                                  "packed_qkv": 2, "constant_slices": 0,
                                                  "shared_subexpressions": 0, "dynamic_rows": 1}
    assert manifest["engine"]["rows"] == "dynamic"
    assert set(manifest["files"]) == {p.name for p in tiny_engine_dir.iterdir()} - {"manifest.json"}
    assert all(len(info["sha256"]) == 64 for info in manifest["files"].values())


def test_a_flipped_byte_is_caught(engine_copy):
    graph = engine_copy / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(EngineError, match="corrupt: model.onnx does not match its sha256"):
        ao.load_engine(engine_copy)


def test_a_missing_file_is_caught(engine_copy):
    (engine_copy / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="incomplete: tokenizer.json is missing"):
        ao.load_engine(engine_copy)


def test_folders_that_are_not_engines(tmp_path, engine_copy):
    with pytest.raises(EngineError, match="does not exist"):
        ao.load_engine(tmp_path / "nothing")
    with pytest.raises(EngineError, match="not an engine folder"):
        ao.load_engine(tmp_path)
    (engine_copy / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EngineError, match="not an agentopt engine"):
        ao.load_engine(engine_copy)
    (engine_copy / "manifest.json").write_text("{ truncated")
    with pytest.raises(EngineError, match="corrupt"):
        ao.load_engine(engine_copy)


def test_a_newer_format_asks_for_an_upgrade(engine_copy):
    manifest = json.loads((engine_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (engine_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="format 99.*upgrade"):
        ao.load_engine(engine_copy)
