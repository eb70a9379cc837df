import json
import os

import pytest

import agentopt_compiler as ao
from agentopt_compiler.errors import AgentOptError, OutputPathError


def test_compile_report_and_files(tmp_path):
    logged = []
    engine = ao.compile("tiny-random", out=tmp_path / "eng", context_length=32, progress=logged.append)
    report = engine.compile_report
    assert [r.name for r in report.passes] == ["remove_noop_ops", "fuse_kv_cache", "pack_qkv_projections",
                                               "insert_sparse_attention", "set_kv_cache_dtype",
                                               "assign_layer_precision"]
    assert report.passes[0].stats["to"] == 10 and report.passes[1].stats == {"fused_attention": 2, "with_rope": 2}
    assert {"model.onnx", "tokenizer.json", "manifest.json"} <= set(report.files)
    assert any(line.startswith("lower done") for line in logged)
    assert "remove_noop_ops" in "\n".join(report.lines())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    assert (tmp_path / "eng").stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_skip_pass_is_recorded_and_output_is_unchanged(tmp_path):
    skipped = ao.compile("tiny-random", out=tmp_path / "a", context_length=32, skip_passes=["remove_noop_ops"])
    assert skipped.manifest["passes"][0]["skipped"] is True
    assert skipped.manifest["passes"][1]["stats"]["fused_attention"] == 2  # fuses the raw graph just as well
    default = ao.load_engine(tmp_path / "a")
    assert default.generate_ids([1, 2, 3], max_new_tokens=5, ignore_eos=True) == \
        ao.compile("tiny-random", out=tmp_path / "b", context_length=32).generate_ids([1, 2, 3], max_new_tokens=5,
                                                                                      ignore_eos=True)
    with pytest.raises(AgentOptError, match="unknown pass to skip: fuse_everything"):
        ao.compile("tiny-random", out=tmp_path / "c", skip_passes=["fuse_everything"])


def test_debug_dump_writes_one_file_per_pass(tmp_path):
    ao.compile("tiny-random", out=tmp_path / "eng", context_length=16, debug_dump=tmp_path / "dump")
    assert sorted(p.name for p in (tmp_path / "dump").iterdir()) == [
        "00-captured.txt", "01-remove_noop_ops.txt", "02-fuse_kv_cache.txt", "03-pack_qkv_projections.txt",
        "04-insert_sparse_attention.txt", "05-set_kv_cache_dtype.txt", "06-assign_layer_precision.txt"]


def test_interrupted_compile_leaves_nothing_behind(tmp_path, monkeypatch):
    from agentopt_compiler.backends.onnxruntime import lower

    def half_written(program, folder, **options):
        (folder / "model.onnx").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(lower, "lower_to_onnx", half_written)
    with pytest.raises(KeyboardInterrupt):
        ao.compile("tiny-random", out=tmp_path / "eng", context_length=16)
    assert list(tmp_path.iterdir()) == []


def test_existing_outputs(tmp_path):
    ao.compile("tiny-random", out=tmp_path / "eng", context_length=16)
    with pytest.raises(OutputPathError, match="already holds an engine; pass --overwrite"):
        ao.compile("tiny-random", out=tmp_path / "eng", context_length=16)
    engine = ao.compile("tiny-random", out=tmp_path / "eng", context_length=24, overwrite=True)
    assert json.loads((tmp_path / "eng" / "manifest.json").read_text())["engine"]["context_length"] == 24
    assert engine.context_length == 24
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="non-empty folder that is not an engine"):
        ao.compile("tiny-random", out=tmp_path / "other", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        ao.compile("tiny-random", out=tmp_path / "file" / "eng")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere; the read-only mount case below covers it")
def test_unwritable_parent_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputPathError, match="cannot write the engine"):
        ao.compile("tiny-random", out=locked / "eng")


def test_read_only_location_is_refused_before_any_work():
    read_only = next((p for p in ("/proc", "/sys") if os.path.isdir(p)), None)
    if read_only is None:
        pytest.skip("no read-only mount on this machine")
    with pytest.raises(OutputPathError, match="cannot write the engine"):
        ao.compile("tiny-random", out=f"{read_only}/agentopt-eng")


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this machine has CUDA")
def test_compile_for_a_device_this_machine_lacks_writes_a_complete_engine(tmp_path):
    """Compile for CUDA on a CPU machine: the folder is complete (with the GPU lowering: fp16 regions, standard
    attention), using it here fails loudly, and it still runs on the CPU when asked to."""
    import numpy as np
    import torch

    from agentopt_compiler.capture.export import capture
    from agentopt_compiler.errors import ProviderUnavailableError
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.pipeline import default_pipeline
    from agentopt_compiler.passes.precision_plan import PrecisionPlan

    plan = PrecisionPlan({"layers.0.mlp_down": "fp16", "lm_head": "fp16"})
    engine = ao.compile("tiny-random", out=tmp_path / "gpu", device="cuda", context_length=32, precision_plan=plan)
    assert "CUDAExecutionProvider" in engine.compile_report.not_loaded
    assert "not loaded here" in "\n".join(engine.compile_report.lines())
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider"):
        engine.generate_ids([1, 2, 3], max_new_tokens=2)
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert manifest["engine"]["device"] == "cuda" and manifest["engine"]["attention"]["impl"] == "standard"
    assert next(p for p in manifest["passes"] if p["name"] == "assign_layer_precision")["stats"] == {
        "fp16_linears": 2}
    from agentopt_compiler.backends.tensorrt.lower import check_onnx_for_tensorrt, check_standard_engine

    check_standard_engine(manifest["engine"])  # what `agentopt rebuild` takes to TensorRT on the GPU machine
    check_onnx_for_tensorrt(tmp_path / "gpu" / "model.onnx")

    here = ao.load_engine(tmp_path / "gpu", device="cpu")
    reference, _ = default_pipeline(precision=plan, half_precision=True).run(
        capture(load_model("tiny-random").model, 32))
    ids = np.random.default_rng(3).integers(0, 300, size=(1, 9))
    with torch.no_grad():
        expected = reference.module(torch.from_numpy(ids), torch.arange(9)[None], torch.tensor([[8]])).numpy()
    assert np.abs(here.session.run(ids, np.arange(9)) - expected).max() <= 1e-2 * np.abs(expected).max()


def _qwen2_checkpoint(folder, dtype: str) -> None:
    """A one-layer Qwen2 of vocabulary 96 saved with transformers in ``dtype``, no tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.Qwen2ForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(folder)


def test_a_bf16_checkpoint_compiles_and_the_report_says_what_the_engine_holds(tmp_path):
    _qwen2_checkpoint(tmp_path / "ckpt", "bfloat16")
    engine = ao.compile(tmp_path / "ckpt", out=tmp_path / "eng", context_length=32)
    weights = engine.compile_report.weights
    assert weights.startswith("checkpoint bfloat16, ") and "-> engine float32, " in weights and "upcast" in weights
    assert f"weights: {weights}" in engine.compile_report.lines()
    assert engine.manifest["model"]["weights"] == weights and engine.manifest["model"]["capture"] == "reference"
    # this checkpoint has no tokenizer: the report says what that means, and text in says how to fix it
    assert any("WARNING:" in line and "no tokenizer.json" in line for line in engine.compile_report.lines())
    with pytest.raises(AgentOptError, match="recompile"):
        engine.complete("hi", max_new_tokens=1)
    assert engine.complete([1, 2], max_new_tokens=1).token_ids
    from agentopt_compiler.runtime.agent import Agent

    with pytest.raises(AgentOptError, match="has no tokenizer"):
        Agent(engine).run("hi")


def test_attention_the_passes_left_unfused_is_refused_unless_the_pass_was_skipped():
    from agentopt_compiler.capture.export import capture
    from agentopt_compiler.compiler import check_attention_fused
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.infra import PassRecord

    program = capture(load_model("tiny-random").model, 16)  # SDPA as captured: nothing fused it
    ran = PassRecord("fuse_kv_cache", False, {}, ("sdpa: the attention mask is not causal",), 0.0, 1, 1)
    with pytest.raises(AgentOptError, match="2 attention layer.*could not be fused.*not causal.*--skip-pass"):
        check_attention_fused(program, [ran])
    check_attention_fused(program, [PassRecord("fuse_kv_cache", True, {}, (), 0.0, 1, 1)])  # asked for: allowed


def test_a_context_past_the_trained_positions_is_built_with_a_warning(tmp_path):
    engine = ao.compile("tiny-random", out=tmp_path / "long", context_length=300)  # tiny-random: 256 positions
    assert engine.context_length == 300
    assert any(line.startswith("WARNING: --context-length 300 goes past the 256 positions")
               for line in engine.compile_report.lines())
    assert not ao.compile("tiny-random", out=tmp_path / "short", context_length=256).compile_report.warnings


def test_size_errors_name_the_python_argument_too(tmp_path):
    for options, says in (({"context_length": 1}, "context_length in Python"), ({"batch_size": 0}, "batch_size in Python")):
        with pytest.raises(AgentOptError, match=says):
            ao.compile("tiny-random", out=tmp_path / "e", **options)
    assert not (tmp_path / "e").exists()


def test_a_broken_tokenizer_is_refused_before_anything_is_written(tmp_path):
    from agentopt_compiler.models.hf_loader import save_as_hf_folder
    from agentopt_compiler.models.registry import load_model

    loaded = load_model("tiny-random")
    save_as_hf_folder(loaded.model, tmp_path / "ckpt", loaded.tokenizer_dir)
    (tmp_path / "ckpt" / "tokenizer.json").write_text('{"broken": ')
    with pytest.raises(AgentOptError, match=f"cannot read {tmp_path / 'ckpt' / 'tokenizer.json'}"):
        ao.compile(tmp_path / "ckpt", out=tmp_path / "eng", context_length=32)
    assert not (tmp_path / "eng").exists() and list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


def test_a_debug_dump_inside_the_output_folder_is_refused(tmp_path):
    with pytest.raises(AgentOptError, match="inside --out.*would be deleted"):
        ao.compile("tiny-random", out=tmp_path / "eng", debug_dump=tmp_path / "eng" / "dump", context_length=32)
    assert list(tmp_path.iterdir()) == []


def test_a_tokenizer_larger_than_the_vocabulary_gets_a_warning(tmp_path):
    import shutil

    from agentopt_compiler.models.registry import load_model

    _qwen2_checkpoint(tmp_path / "ckpt", "float32")
    builtin = load_model("tiny-random")  # its tokenizer folder lives as long as it does
    shutil.copy(builtin.tokenizer_dir / "tokenizer.json", tmp_path / "ckpt")  # 300+ tokens
    report = ao.compile(tmp_path / "ckpt", out=tmp_path / "eng", context_length=32).compile_report
    assert any("the tokenizer has" in w and "vocabulary 96" in w for w in report.warnings), report.warnings


@pytest.mark.parametrize("option, skipped", [
    (dict(sparse_attention="window=8,sinks=4"), "insert_sparse_attention"),
    (dict(kv_cache_dtype="fp16"), "set_kv_cache_dtype"),
])
def test_an_option_whose_pass_is_skipped_is_refused(tmp_path, option, skipped):
    """The engine would not hold what its manifest and inspect say (dense attention under a sparse plan's name)."""
    with pytest.raises(AgentOptError, match=f"applied by the pass {skipped}, which --skip-pass {skipped} skips"):
        ao.compile("tiny-random", out=tmp_path / "e", context_length=64, skip_passes=[skipped], **option)
    assert not (tmp_path / "e").exists()


def test_an_engine_that_loads_but_cannot_run_is_refused_and_removed(tmp_path, monkeypatch):
    """A lowering the backend accepts at load but fails when run (as a contrib op fused onto inputs of a rank its
    kernel refuses did for HunYuan): the compile runs the engine once and says so, leaving no engine behind."""
    from agentopt_compiler.errors import UnsupportedOpError
    from agentopt_compiler.runtime.engine import Engine

    def fails(self, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running "
                           "SkipSimplifiedLayerNormalization node: input is expected to have 3 or 2 dimensions")

    monkeypatch.setattr(Engine, "generate_ids", fails)
    with pytest.raises(UnsupportedOpError, match="fails when run .*SkipSimplifiedLayerNormalization.*"
                                                 "--attention-impl standard"):
        ao.compile("tiny-random", out=tmp_path / "engine", context_length=64)
    assert not (tmp_path / "engine").exists()
