"""Load a local Hugging Face checkpoint folder (config.json + single or sharded safetensors) into our decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..errors import ModelNotFoundError, UnsupportedModelError
from ..validation import read_json
from .config import ModelConfig
from .config_validation import check_hf_config, read_shard_index

# Files a checkpoint folder may carry that the engine needs at run time (tokenizer, chat template, stop tokens).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either config format: transformers>=5 ``rope_parameters`` or older
    ``rope_theta`` + ``rope_scaling`` (whose type key was once ``type``)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
    return {"rope_theta": float(theta), "rope_scaling": scaling}


def _common_fields(hf: dict[str, Any]) -> dict[str, Any]:
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    heads = hf["num_attention_heads"]
    return {
        "vocab_size": hf["vocab_size"],
        "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim"),
        "max_position_embeddings": hf.get("max_position_embeddings", 4096),
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "bos_token_id": hf.get("bos_token_id"),
        "eos_token_ids": eos_ids,
        **_rope_fields(hf),
    }


def llama_config(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(family="llama", qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                       **_common_fields(hf))


def qwen_layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    """Which layers a Qwen2/Qwen3 config windows, as transformers decides: ``layer_types`` when config.json has it,
    else ``sliding_attention`` for layers >= ``max_window_layers`` (default 28) when ``use_sliding_window`` is set."""
    layers = hf["num_hidden_layers"]
    if hf.get("layer_types") is not None:
        return tuple(hf["layer_types"])
    windowed = bool(hf.get("use_sliding_window") and hf.get("sliding_window"))
    first = hf.get("max_window_layers", 28)
    return tuple("sliding_attention" if windowed and i >= first else "full_attention" for i in range(layers))


def qwen2_config(hf: dict[str, Any]) -> ModelConfig:
    # Qwen2 always has q/k/v bias; its window exists only with use_sliding_window, on the layers layer_types names
    window = (hf.get("sliding_window") or None) if hf.get("use_sliding_window") else None
    layer_types = qwen_layer_types(hf)
    if "sliding_attention" in layer_types and not window:
        raise UnsupportedModelError("config.json's layer_types names sliding_attention layers but use_sliding_window "
                                    "is false or sliding_window unset (transformers then has no window for them); "
                                    "fix layer_types or set use_sliding_window and sliding_window")
    return ModelConfig(family="qwen2", qkv_bias=True, sliding_window=window if "sliding_attention" in layer_types
                       else None, layer_types=layer_types, **_common_fields(hf))


def mistral_config(hf: dict[str, Any]) -> ModelConfig:
    return ModelConfig(family="mistral", sliding_window=hf.get("sliding_window") or None, **_common_fields(hf))


# Hugging Face `architectures` / `model_type` -> config mapper. All three run on the same reference module.
HF_ARCHITECTURES: dict[str, Callable[[dict[str, Any]], ModelConfig]] = {
    "LlamaForCausalLM": llama_config,
    "Qwen2ForCausalLM": qwen2_config,
    "MistralForCausalLM": mistral_config,
}
HF_MODEL_TYPES = {"llama": llama_config, "qwen2": qwen2_config, "mistral": mistral_config}


def read_hf_config(folder: Path) -> ModelConfig:
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ModelNotFoundError(f"'{folder}' is not a folder; pass a built-in model name or a Hugging Face folder")
    if not config_path.is_file():
        raise ModelNotFoundError(
            f"'{folder}' has no config.json; a Hugging Face checkpoint folder needs config.json and *.safetensors"
        )
    hf = check_hf_config(read_json(config_path, "config", "correct config.json", ModelNotFoundError), config_path)
    archs = hf.get("architectures") or []
    mapper = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    mapper = mapper or HF_MODEL_TYPES.get(hf.get("model_type", ""))
    if mapper is None:
        found = ", ".join(archs) or hf.get("model_type") or "none given"
        raise UnsupportedModelError(
            f"architecture '{found}' is not supported; supported: {', '.join(HF_ARCHITECTURES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act '{hf['hidden_act']}' is not supported; only 'silu' (SwiGLU) is")
    try:
        config = mapper(hf)
    except KeyError as exc:
        raise ModelNotFoundError(f"{config_path} lacks the field {exc}") from None
    return with_generation_stop_tokens(config, folder)


def with_generation_stop_tokens(config: ModelConfig, folder: Path) -> ModelConfig:
    """``config`` with the end-of-turn ids of generation_config.json added to its stop tokens: chat checkpoints
    (Qwen's <|im_end|>, Llama-3's <|eot_id|>) list them only there, and transformers' generate stops on them."""
    import dataclasses

    path = folder / "generation_config.json"
    if not path.is_file():
        return config
    # a broken file would silently lose the ids where chat turns end (and be copied into the engine as it is)
    fix = "fix it or remove it (its eos_token_id lists where the model's turns end)"
    document = read_json(path, "generation config", fix, ModelNotFoundError)
    if not isinstance(document, dict):
        raise ModelNotFoundError(f"generation config '{path}' holds a JSON {type(document).__name__}, not an object; "
                                 f"{fix}")
    eos = document.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [] if eos is None else [eos]
    bad = [i for i in eos if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < config.vocab_size]
    if bad:
        raise ModelNotFoundError(f"generation config '{path}': eos_token_id {bad[0]!r} is not a token id of this "
                                 f"model (0 to {config.vocab_size - 1}); {fix}")
    extra = [i for i in eos if i not in config.eos_token_ids]
    return dataclasses.replace(config, eos_token_ids=config.eos_token_ids + tuple(extra)) if extra else config


def safetensors_files(folder: Path) -> list[Path]:
    """The files that hold the weights, chosen as transformers chooses them: ``model.safetensors``, else the shards
    ``model.safetensors.index.json`` names, else the folder's one ``*.safetensors`` file. Several other files and
    neither of those is ambiguous (a backup beside the weights would otherwise overwrite them): refused."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_shard_index(index)))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = " (found PyTorch .bin weights: re-save with save_pretrained(safe_serialization=True))" if list(
            folder.glob("*.bin")) else ""
        raise ModelNotFoundError(f"'{folder}' has no *.safetensors weights{hint}")
    if len(files) > 1:
        named = ", ".join(f.name for f in files[:4]) + (", ..." if len(files) > 4 else "")
        raise ModelNotFoundError(f"'{folder}' has {len(files)} *.safetensors files ({named}) and no "
                                 "model.safetensors or model.safetensors.index.json saying which hold the weights; "
                                 "keep only the checkpoint's files (save_pretrained writes the index for sharded "
                                 "weights)")
    return files


def hf_weight_name(name: str) -> str:
    """Our parameter name for a checkpoint tensor: Hugging Face's without the leading ``model.``."""
    return name.removeprefix("model.")


def is_leftover_tensor(name: str) -> bool:
    """Tensors older checkpoints carry that are not weights: RoPE's ``inv_freq`` (a buffer transformers recomputes
    from the config and skips when loading). We compute RoPE from the config as well, so they are ignored."""
    return name.endswith(".inv_freq")


def load_hf_state_dict(folder: Path) -> dict[str, Any]:
    """Weights keyed by our parameter names (``hf_weight_name``), as fp32 tensors."""
    from safetensors.torch import load_file

    from .checkpoint_check import check_finite

    state: dict[str, Any] = {}
    for path in safetensors_files(folder):
        for name, tensor in load_file(str(path)).items():
            if not is_leftover_tensor(name):
                state[hf_weight_name(name)] = tensor.float()
    check_finite(state.items(), folder)
    return state


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """Our config as a Hugging Face config.json (the inverse of the mappers above)."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[config.family]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.dim_per_head,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "hidden_act": "silu",
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) or None,
        "torch_dtype": "float32",
    }
    if config.family == "llama":
        out.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if config.sliding_window:
        out.update(sliding_window=config.sliding_window, use_sliding_window=True)
    if config.layer_types is not None:
        out["layer_types"] = list(config.layer_types)
    return out


def save_as_hf_folder(model: Any, folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """Write ``model`` (a LlamaDecoder) as a Hugging Face checkpoint folder: config.json + model.safetensors.

    Used to hand our built-in models to peers (transformers, onnxruntime-genai) in benchmarks, and in round-trip tests.
    """
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    state = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        state[name if name == "lm_head.weight" else "model." + name] = tensor.detach().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, folder / name)
    return folder
