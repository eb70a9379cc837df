"""The one config every model family maps onto (pure Python: the manifest stores it as JSON)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import AgentOptError, UnsupportedModelError
from ..validation import Invalid, boolean, integer, list_of, number, optional, record, string

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")  # what the reference module (llama.py) computes
LAYER_TYPES = ("full_attention", "sliding_attention")
# Keys each RoPE scaling type needs (see llama.rope_inverse_frequencies).
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

    ``family`` is the registry key (``llama``, ``qwen2``, ``mistral``); the families differ only in the flags below
    (Qwen2: bias on q/k/v; Mistral: a sliding window), so one reference module implements all of them.
    """

    family: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...}
    qkv_bias: bool = False  # Qwen2 (and Llama's attention_bias)
    o_bias: bool = False  # Llama's attention_bias also covers o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # Mistral: each query sees this many keys (itself included)
    # Per layer, as transformers records it: "sliding_attention" layers use sliding_window, "full_attention" layers
    # attend densely (Qwen2's max_window_layers, Gemma 3's interleaving). None: every layer uses sliding_window.
    layer_types: tuple[str, ...] | None = None
    # The module that runs it: "reference" (models/llama.py, which these fields configure completely) or
    # "transformers" (the checkpoint's own module; the fields describe it, and transformers computes RoPE itself)
    capture: str = "reference"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        eos = self.eos_token_ids
        try:
            FIELDS.validate({**dataclasses.asdict(self), "eos_token_ids": list(eos) if isinstance(eos, tuple) else eos,
                             "layer_types": list(self.layer_types) if isinstance(self.layer_types, (list, tuple))
                             else self.layer_types}, "")
        except Invalid as problem:
            raise AgentOptError(f"model config: {problem}") from None
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        self._check_layer_types()
        if self.capture == "reference" and rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"RoPE scaling '{rope_type}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise UnsupportedModelError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                                        f"({self.num_heads}) when head_dim is not given")
        missing = [k for k in ROPE_SCALING_KEYS.get(rope_type, ()) if not isinstance(
            (self.rope_scaling or {}).get(k), (int, float))]
        if missing:
            raise UnsupportedModelError(f"RoPE scaling '{rope_type}' needs the number(s) {', '.join(missing)} in "
                                        "rope_scaling; add them (see the model's original config)")

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            return
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise UnsupportedModelError(
                f"layer_types {list(self.layer_types)[:4]}... must name {self.num_layers} layers, each one of "
                f"{', '.join(LAYER_TYPES)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise UnsupportedModelError("layer_types has sliding_attention layers but the config sets no "
                                        "sliding_window; set sliding_window (and use_sliding_window) in config.json")

    def window_of(self, layer: int) -> int | None:
        """Keys a query of ``layer`` sees (itself included), or None for dense attention."""
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        d, f, v, hd = self.hidden_size, self.intermediate_size, self.vocab_size, self.dim_per_head
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        mlp = 3 * d * f
        head = 0 if self.tie_word_embeddings else v * d
        return v * d + self.num_layers * (attn + mlp + 2 * d) + d + head

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["eos_token_ids"] = list(self.eos_token_ids)
        out["layer_types"] = None if self.layer_types is None else list(self.layer_types)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        eos = kwargs.get("eos_token_ids")
        # a list (JSON) becomes the tuple field; anything else but null is left for FIELDS to refuse
        kwargs["eos_token_ids"] = () if eos is None else tuple(eos) if isinstance(eos, list) else eos
        if isinstance(kwargs.get("layer_types"), list):
            kwargs["layer_types"] = tuple(kwargs["layer_types"])
        return cls(**kwargs)


_COUNT = integer(minimum=1)
_TOKEN_ID = integer(minimum=0)
# Field types and ranges: what any source of a config (config.json via hf_loader, a manifest, Python) must meet.
FIELDS = record({
    "family": string(), "vocab_size": _COUNT, "hidden_size": _COUNT, "intermediate_size": _COUNT,
    "num_layers": _COUNT, "num_heads": _COUNT, "num_kv_heads": _COUNT, "head_dim": optional(_COUNT),
    "max_position_embeddings": _COUNT, "rms_norm_eps": number(above=0), "rope_theta": number(above=0),
    "rope_scaling": optional(record({"rope_type": string()}, required=("rope_type",), extra="keep")),
    "qkv_bias": boolean(), "o_bias": boolean(), "mlp_bias": boolean(), "tie_word_embeddings": boolean(),
    "sliding_window": optional(_COUNT), "layer_types": optional(list_of(string())),
    "capture": string(choices=("reference", "transformers")),
    "bos_token_id": optional(_TOKEN_ID), "eos_token_ids": list_of(_TOKEN_ID),
})
