"""Checks of a Hugging Face ``config.json`` before any family mapper reads it.

Every field the mappers in hf_loader.py read is checked for type and range here, in the file's own field names,
so a config that is valid JSON of the wrong shape (a list, ``"hidden_size": "sixty-four"``, ``"num_key_value_heads":
0``) is refused with the file, the field and the fix, never a ``TypeError`` or a ``ZeroDivisionError`` later.
Fields we do not read are kept unchecked: real configs carry dozens. Whether a field is *present* is left to the
family's mapper (families need different ones), which names a missing field itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError
from ..validation import (Invalid, boolean, check, integer, list_of, map_of, number, one_of, optional,
                          read_json, record, string)

# Beyond this many positions a config is not a real checkpoint's (Llama 4 Scout declares 10 M); the reference
# builds its RoPE tables for at most models/llama.py's ROPE_TABLE_POSITIONS of them up front.
MAX_POSITIONS = 1 << 31

_COUNT = integer(minimum=1)
_TOKEN_ID = integer(minimum=0)
# RoPE variants that exist (transformers' ROPE_INIT_FUNCTIONS and "default"); which ones a capture path supports
# is its own check, but a name nobody implements is a typo
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
_ROPE_TYPE = string(choices=ROPE_TYPES)
# rope_scaling (older configs) or rope_parameters (transformers >= 5): the keys _rope_fields reads and the numbers
# RoPE variants take; which numbers each type needs is checked by ModelConfig
_ROPE = optional(record({
    "rope_theta": number(above=0), "rope_type": _ROPE_TYPE, "type": _ROPE_TYPE, "factor": number(above=0),
    "low_freq_factor": number(above=0), "high_freq_factor": number(above=0),
    "original_max_position_embeddings": integer(minimum=1),
}, extra="keep"))


def _relations(hf: dict[str, Any], _path: str) -> None:
    heads = hf.get("num_attention_heads")
    kv_heads = hf.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads:
        raise Invalid("num_attention_heads", f"({heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    hidden = hf.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and hf.get("head_dim") is None and hidden % heads:
        raise Invalid("hidden_size", f"({hidden}) must be a multiple of num_attention_heads ({heads}) when "
                                     "head_dim is not given")
    vocab = hf.get("vocab_size")
    for field in ("bos_token_id", "eos_token_id"):
        ids = hf.get(field)
        ids = ids if isinstance(ids, list) else [ids]
        outside = [i for i in ids if isinstance(i, int) and isinstance(vocab, int) and not 0 <= i < vocab]
        if outside:  # a stop token the model can never write: generation would never end on it
            raise Invalid(field, f"({outside[0]}) is not a token id of this model (vocab_size {vocab})")


HF_CONFIG = record({
    "architectures": optional(list_of(string())),
    "model_type": optional(string()),
    "vocab_size": _COUNT,
    "hidden_size": _COUNT,
    "intermediate_size": _COUNT,
    "num_hidden_layers": _COUNT,
    "num_attention_heads": _COUNT,
    "num_key_value_heads": optional(_COUNT),
    "head_dim": optional(_COUNT),
    "max_position_embeddings": integer(minimum=1, maximum=MAX_POSITIONS),
    "rms_norm_eps": number(above=0),
    "rope_theta": number(above=0),
    "rope_scaling": _ROPE,
    "rope_parameters": _ROPE,
    "hidden_act": string(),
    "tie_word_embeddings": boolean(),
    "attention_bias": boolean(),
    "mlp_bias": boolean(),
    "use_sliding_window": boolean(),
    "sliding_window": optional(integer(minimum=0)),  # 0: none (Qwen2-MoE writes it so without use_sliding_window)
    "max_window_layers": integer(minimum=0),
    "bos_token_id": optional(_TOKEN_ID),
    "eos_token_id": optional(one_of(_TOKEN_ID, list_of(_TOKEN_ID))),
}, extra="keep", check=_relations)


def check_hf_config(hf: Any, path: Path) -> dict[str, Any]:
    """``hf`` (config.json's parsed content) if every field we read has the right type and range; else a
    ``ModelNotFoundError`` that names the file and the field."""
    return check(hf, HF_CONFIG, source=str(path), error=ModelNotFoundError,
                 fix="correct it in config.json (the values must match the checkpoint's weights)")


SHARD_INDEX = record({"weight_map": map_of(string(), min_length=1)}, required=("weight_map",), extra="keep")


def read_shard_index(path: Path) -> list[str]:
    """The shard file names a sharded checkpoint's ``model.safetensors.index.json`` maps its tensors to."""
    fix = "re-download the checkpoint or re-save it with save_pretrained"
    index = check(read_json(path, "shard index", fix, ModelNotFoundError), SHARD_INDEX, source=str(path), fix=fix,
                  error=ModelNotFoundError)
    shards = list(index["weight_map"].values())
    outside = [s for s in shards if Path(s).name != s]
    if outside:
        raise ModelNotFoundError(f"{path} names a shard outside the checkpoint folder ({outside[0]!r}); {fix}")
    return shards
