"""Reference Llama-family decoder (Llama, Qwen2, Mistral) in plain PyTorch.

This is the eager reference every compiled engine is checked against, and the module that `capture/` exports.
Parameter names match Hugging Face's (minus the leading ``model.``) so checkpoints load by name.

The KV cache is fixed-capacity and written in place (``scatter_`` at each row's token positions), and attention is
plain SDPA over the whole cache with a position mask. That is the *unfused* form: the ``fuse_kv_cache`` pass later finds this
pattern in the captured graph and swaps it for one fused op.

Shapes: B batch, S new tokens, T cache capacity, Hq query heads, Hkv key/value heads, D head dim, E hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# RoPE table rows built when the model is made (128 K x head dim 128 x fp32: 64 MiB each for cos and sin); a cache
# of more positions extends them (setup_cache)
ROPE_TABLE_POSITIONS = 1 << 17


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps), computed in fp32 as Hugging Face does
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """inv_freq[i] = theta^(-2i/D), adjusted for ``rope_scaling`` (linear, or Llama-3's band-wise rescale)."""
    dim = config.dim_per_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))  # (D/2,)
    scaling = config.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequencies) are slowed by `factor`, short ones kept, the band between interpolated
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        inv_freq = torch.where(in_band, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (length, D) in Hugging Face's half-rotation layout: [freqs, freqs]."""
    freqs = torch.outer(torch.arange(length).float(), rope_inverse_frequencies(config))  # (length, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (length, D)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x (B, H, S, D); cos/sin (B, 1, S, D) broadcast over heads
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Fixed-capacity cache, written in place at the token positions. Buffers: (B, Hkv, T, D)."""

    def __init__(self, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.register_buffer("key", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("value", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v (B, Hkv, S, D) land in rows positions[b] (B, S) of each row's cache
        index = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, Hkv, S, D)
        self.key.scatter_(2, index, k)
        self.value.scatter_(2, index, v)
        return self.key, self.value


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e, d = config.hidden_size, config.dim_per_head
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.q_proj = nn.Linear(e, config.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(e, config.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(e, config.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_heads * d, e, bias=config.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x, positions, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # (B, Hq, S, D)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(positions, k, v)  # (B, Hkv, T, D)
        repeats = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(repeats, dim=1)  # (B, Hq, T, D)
        v = v.repeat_interleave(repeats, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hq, S, D); mask (B, 1, S, T) bool
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        e, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(e, f, bias=config.mlp_bias)
        self.up_proj = nn.Linear(e, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, e, bias=config.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), positions, cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token ids (B, S) at ``positions`` (B, S) -> logits (B, S, V), or (B, L, V) at ``logits_index`` (B, L)
    (a 1-D ``logits_index`` (B,) gives (B, 1, V)).

    Without a cache (``setup_cache`` not called) attention is causal over the given tokens, for training and scoring.
    With a cache, each row's new K/V are written at its positions and attention reads the whole cache, masked to the
    keys at or before each query's position (and within ``sliding_window`` on the layers the config windows: all of
    them for Mistral, those ``layer_types`` names ``sliding_attention`` for Qwen2). Rows may be at
    different lengths: row b's positions are its own (right-padded prompts simply write padding past their end,
    which nothing reads before it is overwritten).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # (L, D) tables for the positions a model may use; beyond ROPE_TABLE_POSITIONS they grow with the cache
        self._set_rope_tables(min(config.max_position_embeddings, ROPE_TABLE_POSITIONS))

    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, as TransformersDecoder names them too (what the planners walk)."""
        return self.layers

    def _set_rope_tables(self, length: int) -> None:
        cos, sin = rope_tables(self.config, length)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, D)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def cache_capacity(self) -> int:
        cache = self.layers[0].self_attn.kv_cache
        return 0 if cache is None else cache.key.shape[2]

    def setup_cache(self, batch_size: int, capacity: int) -> None:
        """Give every layer a zeroed fixed-capacity cache (B, Hkv, capacity, D)."""
        dtype = self.embed_tokens.weight.dtype
        c = self.config
        for layer in self.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, c.num_kv_heads, capacity, c.dim_per_head, dtype)
        if capacity > self.rope_cos.shape[0]:
            self._set_rope_tables(capacity)

    def drop_cache(self) -> None:
        """Back to attending causally over the given tokens only (the eager reference a built engine is checked
        against)."""
        for layer in self.layers:
            layer.self_attn.kv_cache = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device)
        if positions.dim() == 1:  # the same positions for every row
            positions = positions.expand(b, s)
        cos = self.rope_cos[positions][:, None]  # (B, 1, S, D)
        sin = self.rope_sin[positions][:, None]
        query_pos = positions[:, None, :, None]  # (B, 1, S, 1)
        if self.cache_capacity:
            key_pos = torch.arange(self.cache_capacity, device=input_ids.device)[None, None, None, :]  # (1, 1, 1, T)
        else:
            key_pos = positions[:, None, None, :]  # (B, 1, 1, S): attend among the given tokens only
        causal = key_pos <= query_pos  # (B, 1, S, T)
        masks = {None: causal}  # window -> mask; windowed layers see keys p - W < j <= p (W keys, itself included)
        for window in {self.config.window_of(i) for i in range(len(self.layers))} - {None}:
            masks[window] = causal & (key_pos > query_pos - window)
        x = self.embed_tokens(input_ids)  # (B, S, E)
        for index, layer in enumerate(self.layers):
            x = layer(x, positions, cos, sin, masks[self.config.window_of(index)])
        if logits_index is not None:  # only the tokens whose next-token logits are wanted: (B,) or (B, L) per row
            picks = logits_index[:, None] if logits_index.dim() == 1 else logits_index  # (B, L)
            # expand(-1, -1, E) rather than (b, L, E): the exported graph then holds no batch-sized constant, so one
            # engine runs any number of cache rows per call (backends/onnxruntime/dynamic_rows.py)
            x = x.gather(1, picks[:, :, None].expand(-1, -1, x.shape[-1]))  # (B, L, E)
        return self.lm_head(self.norm(x))  # (B, S or L, V)
