"""The loader against the real thing: random-init transformers models saved with save_pretrained must give the same
logits as our decoder (fp32, max abs diff <= 1e-4) over a prompt and several cached decode steps."""

import json

import pytest
import torch

from agentopt_compiler.errors import ModelNotFoundError, UnsupportedModelError
from agentopt_compiler.models.hf_loader import save_as_hf_folder
from agentopt_compiler.models.registry import load_model

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128)

CASES = {
    # Llama-3 RoPE scaling, head_dim != hidden/heads, GQA, untied
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    # linear RoPE scaling, attention_bias on q/k/v/o, MHA
    "llama-linear-bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # q/k/v bias, MQA, tied embeddings
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    # sliding window shorter than the test sequence
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6)),
    # Qwen2's window only on layers >= max_window_layers (here layer 1 of 0-1)
    "qwen2-window-layer-1": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
        max_window_layers=1)),
    # use_sliding_window with max_window_layers >= the layer count: no layer is windowed
    "qwen2-window-no-layer": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=6,
        max_window_layers=2)),
}


def _hf_model(config_cls, model_cls, extra, seed=0):
    torch.manual_seed(seed)
    model = model_cls(config_cls(**SMALL, **extra)).eval()
    with torch.no_grad():  # larger than HF's default init so that differences show
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_loader_matches_transformers_over_prefill_and_decode(case, tmp_path):
    hf = _hf_model(*CASES[case])
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).model
    ids = torch.randint(0, SMALL["vocab_size"], (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(ids).logits  # (1, 12, V)
        ours.setup_cache(1, 32)
        pieces = [ours(ids[:, :7], torch.arange(7))]  # prompt
        pieces += [ours(ids[:, i:i + 1], torch.tensor([i])) for i in range(7, 12)]  # 5 decode steps
    assert (torch.cat(pieces, dim=1) - reference).abs().max().item() <= 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    hf = _hf_model(*CASES["llama"])
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(tmp_path).model
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_our_model_saved_as_hf_folder_loads_in_transformers(tmp_path):
    loaded = load_model("tiny-random")
    save_as_hf_folder(loaded.model, tmp_path, loaded.tokenizer_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert (hf(ids).logits - loaded.model(ids)).abs().max().item() <= 1e-4
    assert (tmp_path / "tokenizer.json").is_file()


def test_folder_without_config_json(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_name_lists_the_builtins():
    with pytest.raises(ModelNotFoundError, match="tiny-random, agent-tiny, ref-60m\\) and no such folder$"):
        load_model("no-such-model")
    with pytest.raises(ModelNotFoundError, match="did you mean 'agent-tiny'"):
        load_model("agent_tiny")
    with pytest.raises(ModelNotFoundError, match="no model given"):
        load_model("")  # not the current folder


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM.*LlamaForCausalLM, Qwen2ForCausalLM.*nor can it "
                                                    "be captured from transformers"):
        load_model(tmp_path)
    with pytest.raises(UnsupportedModelError, match="FooForCausalLM.*LlamaForCausalLM, Qwen2ForCausalLM"):
        load_model(tmp_path, capture="reference")


def test_pytorch_bin_weights_get_a_conversion_hint(tmp_path):
    hf = _hf_model(*CASES["qwen2"])
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match="safe_serialization"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_config(tmp_path):
    hf = _hf_model(*CASES["qwen2"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    config.pop("layer_types", None)  # transformers writes one per layer; let it follow the layer count
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match="missing.*layers.2"):
        load_model(tmp_path)


def test_qwen2_windows_follow_layer_types(tmp_path):
    hf = _hf_model(*CASES["qwen2-window-layer-1"])
    hf.save_pretrained(tmp_path)
    config = load_model(tmp_path).config
    assert config.layer_types == ("full_attention", "sliding_attention") == tuple(hf.config.layer_types)
    assert [config.window_of(i) for i in range(2)] == [None, 6]


def test_end_of_turn_ids_from_generation_config_are_stop_tokens(tmp_path):
    hf = _hf_model(*CASES["qwen2"])
    hf.config.eos_token_id = 3
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7], "bos_token_id": 1}))
    assert load_model(tmp_path).config.eos_token_ids == (3, 7)
    # a file that cannot say where turns end is refused, naming it, rather than dropped (and copied into the engine)
    for text, says in (("garbage{", "is not valid JSON"), ("[3]", "not an object"),
                       (json.dumps({"eos_token_id": [3, 99999]}), "eos_token_id 99999 is not a token id"),
                       (json.dumps({"eos_token_id": "3"}), "eos_token_id '3' is not a token id")):
        (tmp_path / "generation_config.json").write_text(text)
        with pytest.raises(ModelNotFoundError, match=says) as error:
            load_model(tmp_path)
        assert "generation_config.json" in str(error.value) and "remove it" in str(error.value)


def test_leftover_rotary_inv_freq_tensors_are_ignored(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_model(*CASES["llama"])
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    for layer in range(SMALL["num_hidden_layers"]):  # what checkpoints saved by transformers < 4.31 carry
        state[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.ones(12)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    ours = load_model(tmp_path).model
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_which_files_hold_the_weights_follows_transformers_and_ambiguity_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_model(*CASES["llama"])
    hf.save_pretrained(tmp_path)
    ids = torch.arange(10)[None]
    with torch.no_grad():
        reference = hf(ids).logits
    # a backup with other values beside model.safetensors: model.safetensors holds the weights, as in transformers
    other = {name: torch.randn_like(t) for name, t in load_file(str(tmp_path / "model.safetensors")).items()}
    save_file(other, str(tmp_path / "zz_backup.safetensors"))
    with torch.no_grad():
        assert (load_model(tmp_path).model(ids) - reference).abs().max().item() <= 1e-4
    # without model.safetensors (or an index) two files are ambiguous
    (tmp_path / "model.safetensors").rename(tmp_path / "a.safetensors")
    with pytest.raises(ModelNotFoundError, match="2 \\*.safetensors files.*no model.safetensors or "
                                                 "model.safetensors.index.json"):
        load_model(tmp_path)


def test_a_tensor_in_two_shards_is_refused(tmp_path):
    import shutil

    hf = _hf_model(*CASES["llama"])
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.copy(tmp_path / first, tmp_path / "copy.safetensors")  # the same tensors in a second shard the index lists
    index["weight_map"]["extra.weight"] = "copy.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="is in both"):
        load_model(tmp_path)


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_model(*CASES["qwen2"]).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = next(n for n in state if n.endswith("mlp.up_proj.weight"))
    state[name][0, :3] = float("nan")
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelNotFoundError, match=f"'{name.removeprefix('model.')}' holds 3 NaN or infinite"):
        load_model(tmp_path)


def test_a_tied_config_with_a_different_output_head_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_model(*CASES["qwen2"]).save_pretrained(tmp_path)  # tie_word_embeddings: true, no lm_head.weight saved
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    load_model(tmp_path)  # the same tensor twice: fine
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelNotFoundError, match="ties the output head.*different lm_head.weight"):
        load_model(tmp_path)
