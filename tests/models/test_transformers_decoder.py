"""The transformers capture path against transformers itself: unmodified modules of each family (random weights, real
config fields) compiled to ONNX Runtime engines must give transformers' logits (<= 1e-4) over a prompt and 8 greedy
decode steps from the engine's caches, transformers' greedy tokens, and one fused attention op per layer."""

import json

import numpy as np
import pytest
import torch

import agentopt_compiler as ao
from agentopt_compiler.errors import AgentOptError, UnsupportedModelError

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

SMALL = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128,
             num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
PROMPT, STEPS, CONTEXT = 10, 8, 32

FAMILIES = {
    # QK-norm on each head before the head transpose; YaRN RoPE
    "qwen3-yarn": (transformers.Qwen3Config, dict(head_dim=16, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0})),
    # interleaved local/global layers (window 6 < the 18 tokens), QK-norm after the transpose, (1 + w) norms,
    # scaled embeddings, GeLU-tanh MLP, pre/post feed-forward norms, final logit soft-capping
    "gemma3": (transformers.Gemma3TextConfig, dict(
        head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=24,
        final_logit_softcapping=5.0)),
    # fused qkv and gate_up projections, partial rotary (half of head dim 32), longrope (short factors: the context
    # stays within original_max_position_embeddings)
    "phi3-longrope": (transformers.Phi3Config, dict(
        num_attention_heads=2, num_key_value_heads=1, original_max_position_embeddings=64, rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 64, "short_factor": [1.0 + i / 16 for i in range(8)],
            "long_factor": [2.0 + i / 8 for i in range(8)]})),
    # rotary dims 8 of head dim 16: GroupQueryAttention takes R/2 only in multiples of 8, so RoPE runs before it
    "phi3-narrow-rotary": (transformers.Phi3Config, dict(partial_rotary_factor=0.5)),
    # layers without RoPE (no_rope_layers: 0 = no RoPE)
    "smollm3": (transformers.SmolLM3Config, dict(no_rope_layers=[1, 0])),
    # an existing family through transformers: dynamic NTK RoPE (plain RoPE within max_position_embeddings)
    # soft-capped attention scores (transformers runs them in eager attention), alternating windows
    "gemma2": (transformers.Gemma2Config, dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=5.0)),
    "llama-dynamic": (transformers.LlamaConfig, dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                      "rope_theta": 10000.0})),
    # a window on every layer's module, used only where is_sliding; full layers without RoPE
    "exaone4-hybrid": (transformers.Exaone4Config, dict(sliding_window=6,
                                                        layer_types=["sliding_attention", "full_attention"])),
    # q/k RMS norms after RoPE, on (B, H, S, D): no residual-add fusion on them
    "hunyuan-dense": (transformers.HunYuanDenseV1Config, dict(head_dim=16)),
    # Qwen2 windowed on layer 1 only (max_window_layers), through the reference module (auto picks it)
    "qwen2-window-layer-1": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=6,
                                                             max_window_layers=1)),
}


def _checkpoint(name, folder):
    config_class, extra = FAMILIES[name]
    return _save(config_class(**{**SMALL, **extra}), folder)


def _save(config, folder):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger than transformers' init so that differences show
        for p in hf.parameters():
            p.normal_(0.0, 0.2)
    hf.save_pretrained(folder)
    return hf


def _engine_greedy(folder, prompt, steps):
    """Run the engine's graph with ONNX Runtime (its optimizations off, so it cannot hide a missed fusion):
    the prompt in one call, then one call per greedy token; the logits of each call's last token."""
    manifest = json.loads((folder / "manifest.json").read_text())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    caches = {c["input"]: np.zeros(c["shape"], np.float32) for c in manifest["engine"]["caches"]}
    names = [o.name for o in session.get_outputs()]
    tokens, logits, position, call = [], [], 0, np.array([prompt])
    for _ in range(steps + 1):
        s = call.shape[1]
        feeds = {"input_ids": call, "positions": np.arange(position, position + s)[None],
                 "logits_index": np.array([[s - 1]]), **caches}
        result = dict(zip(names, session.run(names, feeds)))
        caches.update({c["input"]: result[c["output"]] for c in manifest["engine"]["caches"]})
        logits.append(result["logits"][0, -1])
        tokens.append(int(logits[-1].argmax()))
        position += s
        call = np.array([[tokens[-1]]])
    return tokens[:steps], np.stack(logits[:steps]), manifest


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_transformers_through_the_engine(name, tmp_path):
    hf = _checkpoint(name, tmp_path / "ckpt")
    engine = ao.compile(tmp_path / "ckpt", out=tmp_path / "engine", context_length=CONTEXT)
    prompt = torch.randint(3, SMALL["vocab_size"], (PROMPT,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, logits, manifest = _engine_greedy(tmp_path / "engine", prompt, STEPS)
    with torch.no_grad():  # transformers' own masks and RoPE, the whole sequence each step
        expected = list(prompt)
        for _ in range(STEPS):
            expected.append(int(hf(torch.tensor([expected])).logits[0, -1].argmax()))
        reference = hf(torch.tensor([prompt + tokens])).logits[0, PROMPT - 1:-1].numpy()  # (STEPS, V)
    assert expected[PROMPT:] == tokens
    assert np.abs(logits - reference).max() <= 1e-4
    layers = SMALL["num_hidden_layers"]
    attention = manifest["engine"]["attention"]
    assert attention["fused_layers"] == layers and [layer["op"] for layer in attention["layers"]] == [
        "GroupQueryAttention"] * layers
    assert [c["layer"] for c in manifest["engine"]["caches"]] == [0, 0, 1, 1]
    capture = "reference" if name.startswith("qwen2") else "transformers"
    report = engine.compile_report
    assert report.capture.startswith(capture) and manifest["model"]["capture"] == capture
    fused = next(r for r in report.passes if r.name == "fuse_kv_cache")
    assert fused.stats["fused_attention"] == layers
    if name == "smollm3":
        assert fused.stats["with_rope"] == 1  # layer 1 has no RoPE
    if name in ("gemma3", "gemma2", "qwen2-window-layer-1"):  # the window is on the sliding layers only
        windows = [layer["window"] for layer in attention["layers"]]
        assert windows == ([0, 6] if name.startswith("qwen2") else [6, 0])
    if name in ("qwen3-yarn", "gemma3"):  # QK-norms between projections and op: the named q/k/v linears are packed
        packed = next(r for r in report.passes if r.name == "pack_qkv_projections")
        assert packed.stats["packed_projections"] == layers
    if name.startswith("phi3"):  # the fused qkv projection's slices become a split, read packed by the kernel
        packed = next(r for r in report.passes if r.name == "pack_qkv_projections")
        assert packed.stats["packed_slices"] == layers
        assert report.lowering_rules["packed_qkv"] == (layers if name == "phi3-longrope" else 0)  # RoPE between
    if name == "gemma2":  # soft-capped scores, matched in transformers' eager attention, carried into the op
        assert fused.stats["softcapped"] == layers and {layer["softcap"] for layer in attention["layers"]} == {2.0}


@pytest.mark.parametrize("name", ["qwen3-yarn", "gemma3"])
def test_per_head_views_get_dynamic_rows_and_batched_sessions_keep_their_tokens(name, tmp_path):
    # transformers' QK-norm head views spell the batch as a constant; the lowering reads it from the input instead
    hf = _checkpoint(name, tmp_path / "ckpt")
    engine = ao.compile(tmp_path / "ckpt", out=tmp_path / "engine", context_length=CONTEXT, batch_size=2)
    assert engine.manifest["engine"]["rows"] == "dynamic"
    assert engine.compile_report.lowering_rules["rows_copied_in_reshapes"] == 4 * SMALL["num_hidden_layers"]
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, SMALL["vocab_size"], (PROMPT - i,), generator=generator).tolist() for i in range(3)]
    slotted = ao.load_engine(tmp_path / "engine", slots=3)  # three sessions on three rows, decoding together
    batch = slotted.generate_batch(prompts, max_new_tokens=STEPS, ignore_eos=True)
    with torch.no_grad():
        for prompt, completion in zip(prompts, batch):
            expected = list(prompt)
            for _ in range(STEPS):
                expected.append(int(hf(torch.tensor([expected])).logits[0, -1].argmax()))
            assert completion.token_ids == expected[len(prompt):]


@pytest.mark.parametrize("name, context, reason", [
    ("phi3-longrope", 100, "RoPE 'longrope' changes its frequencies with the sequence length.*--context-length 64"),
    ("llama-dynamic", 200, "RoPE 'dynamic' changes its frequencies with the sequence length.*--context-length 128"),
])
def test_rope_that_depends_on_the_sequence_length_is_refused_past_its_original_context(name, context, reason,
                                                                                        tmp_path):
    _checkpoint(name, tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError, match=reason):
        ao.compile(tmp_path / "ckpt", out=tmp_path / "engine", context_length=context)


def test_bidirectional_attention_is_refused_with_the_reason(tmp_path):
    config = transformers.Gemma3TextConfig(**SMALL, head_dim=16, use_bidirectional_attention=True)
    transformers.Gemma3ForCausalLM(config).save_pretrained(tmp_path / "encoder")
    with pytest.raises(UnsupportedModelError, match="attends bidirectionally"):
        ao.compile(tmp_path / "encoder", out=tmp_path / "engine")


def test_an_activation_transformers_does_not_know_is_refused_in_one_line(tmp_path, capsys):
    from tests.helpers import cli_error_line

    _checkpoint("qwen3-yarn", tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**config, "hidden_act": "wiggle"}))
    line = cli_error_line(capsys, ["compile", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine")])
    assert "hidden_act 'wiggle' is not an activation transformers knows" in line


def test_weights_transformers_cannot_load_are_one_line_errors(tmp_path, capsys):
    """A truncated file, a tensor of another shape (named, with both shapes), NaN weights, integer weights (a quantized
    checkpoint's, which transformers casts to garbage floats): exit status 2 and what to fix, not an internal error
    from inside safetensors or transformers."""
    from safetensors.torch import load_file, save_file

    from tests.helpers import cli_error_line

    _checkpoint("qwen3-yarn", tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    whole = weights.read_bytes()
    compile_it = ["compile", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine")]
    weights.write_bytes(whole[:len(whole) // 2])
    assert "is truncated" in cli_error_line(capsys, compile_it)
    weights.write_bytes(whole)
    state = load_file(str(weights))
    name = next(n for n in state if n.endswith("mlp.up_proj.weight"))
    for broken, says in [(state[name][:-1].clone(), f"wrong shape ['{name} [95, 64] where the config needs [96, 64]'"),
                         (state[name].clone().fill_(float("inf")), "NaN or infinite"),
                         (state[name].to(torch.int32), "are stored as I32; only float weights")]:
        save_file({**state, name: broken}, str(weights), metadata={"format": "pt"})
        assert says in cli_error_line(capsys, compile_it)
    assert not (tmp_path / "engine").exists()


def test_reference_capture_refuses_what_only_transformers_implements(tmp_path):
    _checkpoint("smollm3", tmp_path / "ckpt")
    with pytest.raises(UnsupportedModelError, match="SmolLM3ForCausalLM' is not supported.*--capture transformers"):
        ao.compile(tmp_path / "ckpt", out=tmp_path / "engine", capture="reference")


def test_the_precision_planner_measures_the_transformers_module_and_the_engine_computes_its_plan(tmp_path, capsys):
    """Phi-3's fused qkv and gate_up projections are planned units; the engine built from the plan gives the logits
    of the eager transformers module with the same units quantized."""
    from agentopt_compiler.analysis.precision import unit_at_precision, unit_linears
    from agentopt_compiler.cli.main import main
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.precision_plan import PrecisionPlan, units_of_model

    _checkpoint("phi3-longrope", tmp_path / "ckpt")
    assert main(["plan", "precision", "--model", str(tmp_path / "ckpt"), "--max-kl", "0.05", "--sequences", "2",
                 "--length", "16", "--candidates", "fp32,int8,int4", "--block-size", "16",
                 "--out", str(tmp_path / "plan.json")]) == 0
    table = capsys.readouterr().out  # one row per measured unit
    assert all(f"| {unit} |" in table for unit in units_of_model(SMALL["num_hidden_layers"]))
    assert json.loads((tmp_path / "plan.json").read_text())["measurements"]["sensitivity"] == "exact, whole forwards"
    # the planner's own plan (with its budget) compiles, and the built engine is measured against it
    assert main(["compile", "--model", str(tmp_path / "ckpt"), "--precision-plan", str(tmp_path / "plan.json"),
                 "--context-length", str(CONTEXT), "--out", str(tmp_path / "planned"), "--quiet"]) == 0
    measured = json.loads((tmp_path / "planned" / "manifest.json").read_text())["precision_plan"]["measured"]
    assert measured["kl"] >= 0 and measured["decode_tokens_per_s"] > 0
    # a mixed plan (the fixed test costs make the planner pick a uniform one), compiled and run
    plan = PrecisionPlan({"layers.0.attn_qkv": "int8", "layers.0.mlp_gate_up": "int4", "layers.1.mlp_down": "int4",
                          "lm_head": "int8"}, block_size=16)
    engine = ao.compile(tmp_path / "ckpt", out=tmp_path / "engine", context_length=CONTEXT, precision_plan=plan)
    stats = next(r for r in engine.compile_report.passes if r.name == "assign_layer_precision").stats
    assert (stats["int8_linears"], stats["int4_linears"]) == (2, 2)  # qkv_proj + lm_head, gate_up_proj + down_proj
    loaded = load_model(tmp_path / "ckpt")
    units = unit_linears(loaded.model)
    prompt = torch.randint(3, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), unit_at_precision(units["layers.0.attn_qkv"], "int8", 16), \
            unit_at_precision(units["layers.0.mlp_gate_up"], "int4", 16), \
            unit_at_precision(units["layers.1.mlp_down"], "int4", 16), unit_at_precision(units["lm_head"], "int8", 16):
        expected = loaded.model(prompt)[0].numpy()
    with torch.no_grad():
        full = loaded.model(prompt)[0].numpy()
    logits = engine.session.run(prompt.numpy(), np.arange(12)[None], np.arange(12)[None])[0]
    # MatMulNBits at accuracy level 4 also quantizes activations per block: the engine moves away from fp32 the
    # way the plan's weights move the eager module (the two shifts point the same way), and stays close to it
    shift, planned = (logits - full).ravel(), (expected - full).ravel()
    assert shift @ planned / (np.linalg.norm(shift) * np.linalg.norm(planned)) > 0.8
    assert np.abs(logits - expected).max() <= 1e-2 * np.abs(expected).max()


def test_the_sparse_planner_measures_a_transformers_module_as_it_measures_the_reference_one(tmp_path):
    """A Llama checkpoint through both modules: the same per-layer KL and per-head attention mass outside the
    pattern (transformers' eager attention probabilities against the reference's recomputed softmax)."""
    from agentopt_compiler.analysis.sparse import measure_sparse_costs
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.insert_sparse_attention import SparsePattern

    _save(transformers.LlamaConfig(**SMALL), tmp_path / "ckpt")
    batches = [torch.randint(3, SMALL["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    pattern = SparsePattern(6, sinks=2)
    measured = [measure_sparse_costs(load_model(tmp_path / "ckpt", capture=capture).model, batches, pattern,
                                     context_length=CONTEXT) for capture in ("reference", "transformers")]
    reference, ours = (m.to_dict()["layers"] for m in measured)
    for a, b in zip(reference, ours):
        assert abs(a["kl"] - b["kl"]) <= 1e-6 and a["kl"] > 1e-4  # the pattern changes the outputs
        assert np.allclose(a["head_mass_outside"], b["head_mass_outside"], atol=1e-5)
        assert max(a["head_mass_outside"]) > 0.01
    assert measured[0].queries_beyond_window == measured[1].queries_beyond_window


def test_a_sparse_plan_of_a_transformers_module_compiles_to_what_the_planner_measured(tmp_path, capsys):
    """Gemma 3 (windowed and global layers) planned by the CLI, compiled with the plan: the engine's logits over a
    prompt longer than the window equal the eager module's with the plan's masks; a pattern that cannot narrow a
    windowed layer exactly is refused."""
    from agentopt_compiler.analysis.sparse import sparse_layers
    from agentopt_compiler.cli.main import main
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.insert_sparse_attention import SparseAttentionPlan

    from tests.helpers import cli_error_line

    _checkpoint("gemma3", tmp_path / "ckpt")  # layer 0 slides over 6 keys, layer 1 is global
    plan_sparse = ["plan", "sparse", "--model", str(tmp_path / "ckpt"), "--sinks", "1", "--max-kl", "10",
                   "--sequences", "2", "--length", "24", "--context-length", str(CONTEXT),
                   "--out", str(tmp_path / "plan.json")]
    # sinks inside a narrower window than the layer's own would show layer 0 keys it never saw
    assert "sliding window of 6 already" in cli_error_line(capsys, plan_sparse + ["--window", "4"])
    assert main(plan_sparse + ["--window", "8"]) == 0
    plan = SparseAttentionPlan.load(tmp_path / "plan.json")
    assert sorted(plan.layers) == [0, 1]  # a budget this loose takes every layer (layer 0 measured at KL 0)
    engine = ao.compile(tmp_path / "ckpt", out=tmp_path / "engine", context_length=CONTEXT, sparse_attention=plan)
    inserted = next(r for r in engine.compile_report.passes if r.name == "insert_sparse_attention")
    assert inserted.stats["window8+sinks1"] == 1 and "keeps its own window of 6" in inserted.unmet[0]
    assert inserted.unmet[0].startswith("layer 0: ")  # and the compile says so, as a warning
    assert any("WARNING: not applied: layer 0" in line for line in engine.compile_report.lines())
    with pytest.raises(AgentOptError, match="sliding window of 6 already"):  # the same pattern given by hand
        ao.compile(tmp_path / "ckpt", out=tmp_path / "refused", context_length=CONTEXT,
                   sparse_attention="window=4,sinks=1,layers=0")
    assert not (tmp_path / "refused").exists()
    model = load_model(tmp_path / "ckpt").model
    prompt = torch.randint(3, SMALL["vocab_size"], (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), sparse_layers(model, plan.resolve(SMALL["num_hidden_layers"])):
        expected = model(prompt)[0].numpy()
    with torch.no_grad():
        dense = model(prompt)[0].numpy()
    logits = engine.session.run(prompt.numpy(), np.arange(20)[None], np.arange(20)[None])[0]
    assert np.abs(logits - expected).max() <= 1e-4 < np.abs(logits - dense).max()


@pytest.mark.parametrize("config, says", [
    (lambda: transformers.Qwen3MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2), "mixture-of-experts"),
    (lambda: transformers.MixtralConfig(**SMALL, num_local_experts=4), "mixture-of-experts"),
    (lambda: transformers.OlmoConfig(**SMALL, clip_qkv=8.0), "clips q/k/v in place"),
])
def test_what_no_engine_implements_yet_is_refused_by_name_before_the_model_is_built(config, says, tmp_path, capsys):
    from tests.helpers import cli_error_line

    config().save_pretrained(tmp_path / "ckpt")  # the config is enough: nothing else is read
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"")
    line = cli_error_line(capsys, ["compile", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine")])
    assert says in line and ("not supported yet" in line or "torch.export cannot capture" in line)
