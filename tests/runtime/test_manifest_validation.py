"""Fuzzing the engine-folder edge: malformed variants of a valid engine's manifest.json (wrong inner types, missing
or empty sections, files missing from the list or the folder, names pointing outside it) and stray files. Each
must make ``agentopt inspect`` / ``agentopt run`` end in exit status 2 with one ``error:`` line and no traceback,
and ``load_engine`` raise one EngineError."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

import agentopt_compiler as ao
from agentopt_compiler.errors import EngineError
from agentopt_compiler.runtime.manifest import sealed
from tests.helpers import cli_error_line, tree

# wrong-typed replacements by the type of the valid value
WRONG = {dict: ["x", [], 3], list: ["x", {}, 3], str: [5, [], None], int: ["5", -1, 2.5, True, None],
         bool: ["yes", 1, None], float: ["x", None]}
# paths into the manifest whose values the runtime, the sessions or inspect read
READ_PATHS = [("model",), ("model", "name"), ("model", "config"), ("model", "config", "num_layers"),
              ("model", "config", "eos_token_ids"), ("model", "config", "num_kv_heads"), ("engine",),
              ("engine", "backend"), ("engine", "context_length"), ("engine", "batch_size"), ("engine", "graph"),
              ("engine", "inputs"), ("engine", "logits"), ("engine", "caches"), ("engine", "caches", 0),
              ("engine", "caches", 0, "shape"), ("engine", "caches", 0, "input"), ("engine", "attention"),
              ("engine", "attention", "layers"), ("engine", "attention", "layers", 0, "window"), ("passes",),
              ("passes", 0, "stats"), ("files",), ("files", "model.onnx"), ("files", "model.onnx", "sha256"),
              ("files", "model.onnx", "bytes"), ("format_version",), ("dependencies",), ("tokenizer",)]


def _set(document, path, value):
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def _get(document, path):
    for key in path:
        document = document[key]
    return document


def _variants(valid: dict):
    for path in READ_PATHS:
        value = _get(valid, path)
        for bad in WRONG[type(value)]:
            if path[-1] == "window" and bad == -1:
                continue  # a valid value (-1: no window)
            variant = copy.deepcopy(valid)
            _set(variant, path, bad)
            yield f"{'.'.join(map(str, path))}={bad!r}", variant
    for section in ("engine", "model", "files"):
        yield f"no {section}", {k: v for k, v in valid.items() if k != section}
    yield "files empty", {**valid, "files": {}}
    for name in valid["files"]:
        yield f"{name} unlisted", {**valid, "files": {k: v for k, v in valid["files"].items() if k != name}}
    for name in ("../model.onnx", "/etc/passwd", "sub/model.onnx", "manifest.json", ""):
        yield f"file name {name!r}", {**valid, "files": {**valid["files"], name: valid["files"]["model.onnx"]}}
    yield "graph not listed", {**valid, "engine": {**valid["engine"], "graph": "other.onnx"}}
    yield "sha256 not hex", {**valid, "files": {**valid["files"], "model.onnx": {
        **valid["files"]["model.onnx"], "sha256": "z" * 64}}}
    yield "cache shape rank 3", _replaced(valid, ("engine", "caches", 0, "shape"), [1, 2, 3])
    yield "cache dtype unknown", _replaced(valid, ("engine", "caches", 0, "dtype"), "float99")
    yield "config heads not dividing", _replaced(valid, ("model", "config", "num_kv_heads"), 3)
    yield "config layer_types a number", _replaced(valid, ("model", "config", "layer_types"), 5)
    yield "engine dtype unknown", _replaced(valid, ("engine", "dtype"), "x")
    for key, bad in (("layer", []), ("layer", "x"), ("ring", "x")):
        yield f"cache {key}={bad!r}", _replaced(valid, ("engine", "caches", 0, key), bad)


def _replaced(valid, path, value):
    variant = copy.deepcopy(valid)
    _set(variant, path, value)
    return variant


def _engine_with(source: Path, folder: Path, manifest, seal: bool = True) -> Path:
    """A copy of ``source`` (files hard-linked: the tests only read them) with another manifest.json; a dict is
    sealed (its manifest_sha256 recomputed, as a writer that means it would) unless ``seal`` is False, so the checks
    behind the seal are what the test meets."""
    folder.mkdir()
    for path in source.iterdir():
        if path.name != "manifest.json":
            os.link(path, folder / path.name)
    if isinstance(manifest, dict):
        manifest = json.dumps(sealed(manifest) if seal else manifest)
    (folder / "manifest.json").write_text(manifest)
    return folder


def test_malformed_manifests_are_one_clear_error(tiny_engine_dir, tmp_path, capsys):
    valid = json.loads((tiny_engine_dir / "manifest.json").read_text())
    cases = list(_variants(valid))
    assert len(cases) > 80
    failures = []
    for index, (label, manifest) in enumerate(cases):
        folder = _engine_with(tiny_engine_dir, tmp_path / f"e{index}", manifest)
        before = tree(tmp_path)
        try:
            line = cli_error_line(capsys, ["inspect", str(folder)])
            assert "manifest" in line or "engine" in line, line
            with pytest.raises(EngineError):
                ao.load_engine(folder)
            assert tree(tmp_path) == before
        except AssertionError as failure:  # all of them, not only the first
            failures.append(f"{label}: {str(failure)[-300:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("text", ["[]", "{", "", "null", '{"format": "agentopt-engine", "format_version": "1"}'])
def test_manifest_json_of_the_wrong_shape(tiny_engine_dir, tmp_path, capsys, text):
    folder = _engine_with(tiny_engine_dir, tmp_path / "e", text)
    for command in (["run", str(folder), "--prompt", "hi"], ["inspect", str(folder)]):
        assert str(folder) in cli_error_line(capsys, command)


def test_a_stray_file_or_folder_in_the_engine_is_refused(tiny_engine_dir, tmp_path, capsys):
    manifest = (tiny_engine_dir / "manifest.json").read_text()
    for index, make in enumerate([lambda f: (f / "notes.txt").write_text("x"), lambda f: (f / "sub").mkdir(),
                                  lambda f: (f / ".manifest.json.tmp").write_text("{}")]):
        folder = _engine_with(tiny_engine_dir, tmp_path / f"e{index}", manifest)
        make(folder)
        line = cli_error_line(capsys, ["run", str(folder), "--prompt", "hi"])
        assert "does not list" in line and "remove it" in line


def test_a_file_given_as_the_engine_folder(tiny_engine_dir, capsys):
    assert "is a file" in cli_error_line(capsys, ["inspect", str(tiny_engine_dir / "model.onnx")])


def _with_sha256(manifest: dict, folder: Path, name: str) -> dict:
    import hashlib

    data = (folder / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return manifest


def test_a_manifest_edited_after_it_was_written_is_refused(tiny_engine_dir, tmp_path, capsys):
    """Edits no schema or graph check can see (the cache names of a layer's key and value swapped ran, and gave
    other text): the manifest's own sha256 refuses them all at load, naming the fix."""
    valid = json.loads((tiny_engine_dir / "manifest.json").read_text())
    swapped = copy.deepcopy(valid)
    first = swapped["engine"]["caches"]
    first[0]["input"], first[1]["input"] = first[1]["input"], first[0]["input"]
    edits = {"swapped cache names": swapped,
             "a window": _replaced(valid, ("engine", "attention", "layers", 0, "window"), 16),
             "eos": _replaced(valid, ("model", "config", "eos_token_ids"), [5])}
    for index, (label, manifest) in enumerate(edits.items()):
        folder = _engine_with(tiny_engine_dir, tmp_path / f"e{index}", manifest, seal=False)
        line = cli_error_line(capsys, ["run", str(folder), "--prompt", "hi", "--max-new-tokens", "2"])
        assert "was edited after the engine was written" in line and "recompile" in line, (label, line)
    unsealed = {k: v for k, v in valid.items() if k != "manifest_sha256"}  # an engine from before the seal: loads
    assert ao.load_engine(_engine_with(tiny_engine_dir, tmp_path / "old", unsealed, seal=False)).generate_ids(
        [1, 2], max_new_tokens=2, ignore_eos=True)


def test_a_manifest_that_does_not_describe_its_graph_is_refused_at_load(tiny_engine_dir, tmp_path, capsys):
    """Well-typed values that the graph contradicts (written by a faulty writer, so sealed): one EngineError naming
    the mismatch at load, not an ONNX Runtime error (or an internal error) at the first call."""
    valid = json.loads((tiny_engine_dir / "manifest.json").read_text())
    engine = valid["engine"]
    cases = {"logits": ("engine", "logits", "nologits"), "no caches": ("engine", "caches", []),
             "a cache output as logits": ("engine", "logits", engine["caches"][0]["output"]),
             "caches left out": ("engine", "caches", engine["caches"][:1]),
             "inputs": ("engine", "inputs", ["foo"]),
             "context": ("engine", "context_length", engine["caches"][0]["shape"][2] + 1),
             "cache shape": ("engine", "caches", [{**c, "shape": [*c["shape"][:3], c["shape"][3] + 1]}
                                                  for c in engine["caches"]]),
             "cache update": ("engine", "cache_update", "sometimes"),
             "cache dtype": ("engine", "caches", [{**c, "dtype": "int8"} for c in engine["caches"]])}
    for index, (label, (*path, value)) in enumerate(cases.items()):
        folder = _engine_with(tiny_engine_dir, tmp_path / f"e{index}", _replaced(valid, tuple(path), value))
        line = cli_error_line(capsys, ["run", str(folder), "--prompt", "hi", "--max-new-tokens", "2"])
        assert "manifest" in line and ("recompile" in line or "cache_update" in line), (label, line)


def test_a_chat_template_that_does_not_parse_fails_at_load(chat_engine, tmp_path, capsys):
    manifest = json.loads((chat_engine.folder / "manifest.json").read_text())
    folder = tmp_path / "e"
    folder.mkdir()
    for path in chat_engine.folder.iterdir():
        if path.name not in ("manifest.json", "tokenizer_config.json"):
            os.link(path, folder / path.name)
    config = json.loads((chat_engine.folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "{% for m in messages %}"}))
    (folder / "manifest.json").write_text(json.dumps(sealed(_with_sha256(manifest, folder, "tokenizer_config.json"))))
    line = cli_error_line(capsys, ["run", str(folder), "--task", "hi"])
    assert "tokenizer_config.json" in line and "does not parse" in line
    with pytest.raises(EngineError, match="chat template"):
        ao.load_engine(folder)
