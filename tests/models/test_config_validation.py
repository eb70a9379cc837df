"""Fuzzing the checkpoint edge: malformed variants of a valid Hugging Face folder (config.json fields of the wrong
type or range, broken JSON, safetensors files that are empty, truncated, foreign or of other shapes) given to
``agentopt compile``. Each must end in exit status 2, one ``error:`` line naming the problem, no traceback and
nothing written."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest

from tests.helpers import cli_error_line, tree

NAN = math.nan
COUNT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")
# values of the wrong type or range for each kind of field (every one must be refused)
BAD_COUNTS = ("sixty-four", 0, -3, 2.5, True, [64], {"n": 64}, NAN)
BAD_POSITIVE_NUMBERS = ("small", 0, -1e-6, [1e-6], True, NAN, math.inf)
BAD_BOOLS = ("yes", 1, [True], None)
BAD_VALUES = {
    **{name: BAD_COUNTS for name in COUNT_FIELDS},
    "rms_norm_eps": BAD_POSITIVE_NUMBERS,
    "rope_theta": BAD_POSITIVE_NUMBERS,
    "tie_word_embeddings": BAD_BOOLS,
    "eos_token_id": ("</s>", -1, [1, "x"], {"id": 1}, 2.5),
    "bos_token_id": ("<s>", -1, [1], 2.5),
    "rope_scaling": ("linear", [1], {"rope_type": "llama3", "factor": 8.0}, {"rope_type": "no-such-type", "factor": 2.0},
                     {"type": 3}, {"rope_type": "linear", "factor": "x"}),
    "architectures": ("LlamaForCausalLM", [1], {}),
    "hidden_act": (5, ["silu"]),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """tiny-random saved as a Hugging Face folder (config.json + model.safetensors)."""
    from agentopt_compiler.models.hf_loader import save_as_hf_folder
    from agentopt_compiler.models.registry import load_model

    return save_as_hf_folder(load_model("tiny-random").model, tmp_path_factory.mktemp("hf") / "tiny")


def _variant(checkpoint: Path, folder: Path, config=None, config_text=None, weights: bytes | None = None) -> Path:
    folder.mkdir()
    if config_text is None:
        config_text = json.dumps(config if config is not None else json.loads((checkpoint / "config.json").read_text()))
    (folder / "config.json").write_text(config_text)
    if weights is None:
        os.link(checkpoint / "model.safetensors", folder / "model.safetensors")  # no copy: the test only reads it
    else:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def _assert_refused(capsys, tmp_path: Path, model: Path) -> str:
    before = tree(tmp_path)
    line = cli_error_line(capsys, ["compile", "--model", str(model), "--out", str(model) + "-engine", "--quiet",
                                   "--context-length", "16"])
    assert tree(tmp_path) == before  # no engine, no staging folder
    return line


def _words(text: str) -> str:
    return text.lower().replace("_", " ")  # "rope_scaling" and "RoPE scaling" name the same thing


def _config_variants(valid: dict):
    for name, values in BAD_VALUES.items():
        for value in values:
            # transformers (issue 30's capture path) may name RoPE fields its own way: "rope_parameters"
            yield f"{name}={value!r}", {**valid, name: value}, "rope" if name == "rope_scaling" else name
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        yield f"without {name}", {k: v for k, v in valid.items() if k != name}, name
    # valid types, but not the checkpoint's shapes
    yield "intermediate_size doubled", {**valid, "intermediate_size": 2 * valid["intermediate_size"]}, "shape"
    yield "one layer more", {**valid, "num_hidden_layers": valid["num_hidden_layers"] + 1}, "missing"
    yield "heads not dividing", {**valid, "num_key_value_heads": 3}, "num_key_value_heads"
    # a stop token the model cannot write (generation_config.json's are checked the same way)
    yield "eos outside the vocabulary", {**valid, "eos_token_id": valid["vocab_size"]}, "eos_token_id"
    yield "eos list outside", {**valid, "eos_token_id": [1, valid["vocab_size"] + 5]}, "eos_token_id"
    yield "bos outside", {**valid, "bos_token_id": valid["vocab_size"]}, "bos_token_id"


def test_malformed_config_fields_are_one_clear_error(checkpoint, tmp_path, capsys):
    valid = json.loads((checkpoint / "config.json").read_text())
    cases = list(_config_variants(valid))
    assert len(cases) > 80
    failures = []
    for index, (label, config, expected) in enumerate(cases):
        model = _variant(checkpoint, tmp_path / f"m{index}", config)
        try:
            line = _assert_refused(capsys, tmp_path, model)
            assert _words(expected) in _words(line), line
        except AssertionError as failure:  # all of them, not only the first
            failures.append(f"{label}: {str(failure)[-300:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("text, expected", [
    ("[1, 2]", "must be an object"), ("null", "must be an object"), ('"text"', "must be an object"),
    ('{"hidden_size": 64,', "not valid JSON"), ("", "not valid JSON"), ("\udcff".encode("utf-8", "surrogatepass"),
                                                                       "not UTF-8"),
    ("[" * 100_000, "nests too deeply"),
])
def test_config_json_of_the_wrong_shape(checkpoint, tmp_path, capsys, text, expected):
    model = tmp_path / "m"
    _variant(checkpoint, model, config_text="")
    (model / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    line = _assert_refused(capsys, tmp_path, model)
    assert "config.json" in line and expected in line


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_broken_weights_are_refused_before_loading(checkpoint, tmp_path, capsys):
    weights = (checkpoint / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    renamed = {("model.renamed" if k == name else k): v for k, v in header.items()}
    as_int = {k: ({**v, "dtype": "I32"} if k == name else v) for k, v in header.items()}
    cases = {
        "empty": (b"", "empty"),
        "a few bytes": (b"\x01\x02", "truncated"),
        "garbage": (os.urandom(4096), "not a safetensors file"),
        "header cut": (weights[:length // 2], "not a safetensors file"),
        "data cut": (weights[:-100], "truncated"),
        "header not JSON": (struct.pack("<Q", 8) + b"\xff" * 8 + weights[8 + length:], "not a safetensors file"),
        "header a list": (_safetensors([1]), "not a JSON object"),  # type: ignore[arg-type]
        "bad entry": (_safetensors({name: {"dtype": "F32", "shape": [2], "data_offsets": [0, 3]}}), "malformed"),
        "renamed tensor": (_safetensors(renamed) + weights[8 + length:], "missing"),
        "int weights": (_safetensors(as_int, weights[8 + length:]), "I32"),
    }
    for index, (label, (data, expected)) in enumerate(cases.items()):
        model = _variant(checkpoint, tmp_path / f"w{index}", weights=data)
        line = _assert_refused(capsys, tmp_path, model)
        assert expected in line and str(model) in line, (label, line)


def test_shard_index_of_the_wrong_shape(checkpoint, tmp_path, capsys):
    for index, text in enumerate(["{", '{"weight_map": []}', '{"weight_map": {"a": "../../etc/passwd"}}', "[]"]):
        model = _variant(checkpoint, tmp_path / f"s{index}")
        (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")  # else it holds the weights
        (model / "model.safetensors.index.json").write_text(text)
        assert "index.json" in _assert_refused(capsys, tmp_path, model)


def test_fields_as_released_checkpoints_write_them_load(checkpoint, tmp_path):
    """sliding_window 0 means no window (Qwen2-MoE's config writes it so); a declared 10 M positions (Llama 4 Scout)
    is a fact about the model, not a table to build: both load."""
    from agentopt_compiler.models.llama import ROPE_TABLE_POSITIONS
    from agentopt_compiler.models.registry import load_model

    config = json.loads((checkpoint / "config.json").read_text())
    folder = _variant(checkpoint, tmp_path / "m", {**config, "model_type": "mistral", "architectures": [
        "MistralForCausalLM"], "sliding_window": 0, "max_position_embeddings": 10485760})
    loaded = load_model(str(folder), "reference")
    assert loaded.config.sliding_window is None and loaded.config.max_position_embeddings == 10485760
    assert loaded.model.rope_cos.shape[0] == ROPE_TABLE_POSITIONS
