"""Unmodified transformers causal LMs, made capturable: ``--capture transformers``.

    TransformersDecoder(hf)          hf: AutoModelForCausalLM.from_pretrained(folder), fp32, SDPA attention
      forward(input_ids (B, S), positions (B, S), logits_index (B, L)) -> logits (B, L, V)

The model's own code runs as it is (its attention, QK-norms, scaled embeddings, GeLU or SwiGLU MLPs, extra norms,
fused qkv / gate_up projections, final soft-capping). The wrapper supplies what a static-cache engine needs, through
the inputs transformers already accepts:

  * a KV cache: ``StaticPositionCache``, a ``transformers.Cache`` whose ``update`` scatters each layer's new K/V into
    fixed-capacity buffers at the rows' positions and returns the whole buffers (B, Hkv, T, D), the buffers living
    at ``model.layers.N.self_attn.kv_cache.{key,value}``: the form ``fuse_kv_cache`` matches;
  * attention masks ``arange(T) <= positions`` per row, ``& arange(T) > positions - W`` for the layers transformers
    windows (a dict by layer type for models with both kinds): 4-D masks transformers passes through unchanged
    (additive, ``where(mask, 0, min)``, for models whose soft-capped scores need transformers' eager attention);
  * RoPE tables: each rotary-embedding module is swapped (before export) for ``RotaryTable``, which looks up the
    original module's own outputs, computed once for positions 0..T-1. So every rope type transformers implements
    (default, linear, llama3, yarn, longrope, dynamic, partial rotary, per-layer-type tables) becomes the
    ``table[positions]`` that ``fuse_kv_cache`` moves into the fused op, checked against the module on sample
    positions; a RoPE that depends on the sequence length at run time (longrope or dynamic past the original
    context) is refused with the context length that avoids it;
  * only the logits at ``logits_index``: a forward hook on the base model gathers those rows before the model's head.

``load_transformers_model`` builds it from a local folder (no hub) and refuses, with the reason, what the capture
cannot serve exactly (bidirectional attention, chunked or linear attention layers).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
import torch
from torch import nn

from ..errors import ModelNotFoundError, UnsupportedModelError
from .config import ModelConfig
from .llama import KVCache  # the same in-place cache buffers the reference decoder writes


def _cache_base():
    from transformers import Cache

    class StaticPositionCache(Cache):
        """transformers' cache interface over our per-layer buffers, written at explicit positions (B, S)."""

        def __init__(self, caches: list[KVCache], positions: torch.Tensor):  # noqa: D107 (no Cache.__init__: no layers)
            self.caches, self.positions, self.layers = caches, positions, []

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return self.caches[layer_idx].update(self.positions, key_states, value_states)

        def get_seq_length(self, layer_idx: int = 0) -> int:  # only read when position_ids are missing
            return 0

    return StaticPositionCache


class RotaryTable(nn.Module):
    """Stands in for a transformers rotary-embedding module: (x, position_ids[, layer_type]) -> (cos, sin) rows of
    tables the original module computed for positions 0..T-1 (one pair per layer type it serves)."""

    def __init__(self, tables: dict[str | None, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.types = list(tables)
        for index, (cos, sin) in enumerate(tables.values()):
            self.register_buffer(f"cos_{index}", cos, persistent=False)  # (T, R)
            self.register_buffer(f"sin_{index}", sin, persistent=False)

    def forward(self, x, position_ids, layer_type=None):
        index = self.types.index(layer_type)
        cos, sin = getattr(self, f"cos_{index}"), getattr(self, f"sin_{index}")
        return cos[position_ids].to(x.dtype), sin[position_ids].to(x.dtype)  # (B, S, R)


def tabulate_rotary_embedding(module: nn.Module, capacity: int, hidden_size: int) -> RotaryTable:
    """The module's (cos, sin) for positions 0..capacity-1, checked to be what it gives any call (the table must not
    depend on which positions a call holds)."""
    layer_types = sorted(getattr(module, "layer_types", None) or [None], key=str)
    x = torch.zeros(1, 1, hidden_size)
    tables, probes = {}, [torch.tensor([[0, 1, 2]]), torch.tensor([[5, 1, capacity - 1]])]
    with torch.no_grad():
        for layer_type in layer_types:
            kwargs = {} if layer_type is None else {"layer_type": layer_type}
            short = module(x, probes[0], **kwargs)  # before the full-length call (dynamic RoPE caches state)
            cos, sin = module(x, torch.arange(capacity)[None], **kwargs)
            spread = module(x, probes[1], **kwargs)
            for probe, (p_cos, p_sin) in zip(probes, (short, spread)):
                if not (torch.equal(cos[0][probe[0]], p_cos[0]) and torch.equal(sin[0][probe[0]], p_sin[0])):
                    raise UnsupportedModelError(_length_dependent_rope(module, layer_type, capacity))
            tables[layer_type] = (cos[0].float(), sin[0].float())
    return RotaryTable(tables)


def _length_dependent_rope(module: nn.Module, layer_type, capacity: int) -> str:
    config = getattr(module, "config", None)
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(layer_type, params) if layer_type else params
    rope_type = params.get("rope_type", "?") if isinstance(params, dict) else "?"
    limit = (params.get("original_max_position_embeddings") if isinstance(params, dict) else None) or getattr(
        config, "max_position_embeddings", None)
    return (f"RoPE '{rope_type}' changes its frequencies with the sequence length at run time (past {limit} "
            f"positions), which a fixed engine cannot reproduce for a {capacity}-token context; compile with "
            f"--context-length {limit} or less")


class TransformersDecoder(nn.Module):
    """An unmodified transformers causal LM behind the engine's calling convention (see the module docstring)."""

    def __init__(self, hf: nn.Module, windows: list[int | None]):
        super().__init__()
        # the HF model's own children, so parameter names and module paths are transformers' (model.layers.N...)
        for name, child in hf.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "hf", hf)  # called, not registered: its children are ours already
        self.config = hf.config
        self.windows = windows  # per layer: keys a query sees (itself included), or None (dense)
        self.capacity = 0

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.hf.base_model.layers

    def setup_cache(self, batch_size: int, capacity: int) -> None:
        """Fresh zeroed caches of ``capacity`` positions on every layer, and RoPE tables for those positions."""
        config = self.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for layer in self.decoder_layers:
            layer.self_attn.kv_cache = KVCache(batch_size, config.num_key_value_heads, capacity, head_dim,
                                               torch.float32)
        self._tabulate_rope(capacity)
        self.capacity = capacity

    def drop_cache(self) -> None:
        """Back to attending causally over the given tokens only (the eager reference a built engine is checked
        against)."""
        for layer in self.decoder_layers:
            layer.self_attn.kv_cache = None
        self.capacity = 0

    def _tabulate_rope(self, capacity: int) -> None:
        for path, module in list(self.hf.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding") or isinstance(module, RotaryTable):
                original = getattr(module, "original", module)
                table = tabulate_rotary_embedding(original, capacity, self.config.hidden_size)
                object.__setattr__(table, "original", original)  # kept to re-tabulate, not exported
                parent = self.hf.get_submodule(path.rpartition(".")[0]) if "." in path else self.hf
                setattr(parent, path.rpartition(".")[2], table)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device)
        if positions.dim() == 1:
            positions = positions.expand(b, s)
        query_pos = positions[:, None, :, None]  # (B, 1, S, 1)
        if self.capacity:
            key_pos = torch.arange(self.capacity, device=input_ids.device)[None, None, None, :]  # (1, 1, 1, T)
            caches = [layer.self_attn.kv_cache for layer in self.decoder_layers]
            cache = _cache_base()(caches, positions)
        else:  # no cache: causal over the given tokens (scoring, calibration)
            key_pos, cache = positions[:, None, None, :], None
        causal = key_pos <= query_pos  # (B, 1, S, T)
        masks = {None: causal}
        for window in set(self.windows) - {None}:
            masks[window] = causal & (key_pos > query_pos - window)
        if self.config._attn_implementation == "eager":  # eager attention adds its mask to the scores
            masks = {w: torch.where(m, 0.0, torch.finfo(torch.float32).min) for w, m in masks.items()}
        layer_types = getattr(self.config, "layer_types", None)
        if len(set(self.windows)) == 1:
            attention_mask = masks[self.windows[0]]
        else:  # both kinds of layers: transformers picks each layer's mask by its layer type
            attention_mask = {kind: masks[window] for kind, window in zip(layer_types, self.windows)}

        def gather(_module, _args, output):  # only the rows whose logits are wanted: (B, L, E)
            if logits_index is not None:
                picks = logits_index[:, None] if logits_index.dim() == 1 else logits_index  # (B, L)
                hidden = output.last_hidden_state
                output.last_hidden_state = hidden.gather(1, picks[:, :, None].expand(-1, -1, hidden.shape[-1]))
            return output

        hook = self.hf.base_model.register_forward_hook(gather)
        try:
            out = self.hf(input_ids=input_ids, position_ids=positions, attention_mask=attention_mask, cache=cache,
                          use_cache=cache is not None)
        finally:
            hook.remove()
        return out.logits


def _experts(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# What the capture cannot serve exactly: (config attribute, test, reason). Read from the config before transformers
# builds the model: otherwise it fails much later, in an op without a lowering or deep inside torch.export, naming
# nothing the user can act on.
_MOE = ("is a mixture-of-experts model; its expert layers are not supported yet (dense decoders are: Llama, Qwen2/3, "
        "Mistral, Gemma, Phi-3, ...)")
_REFUSALS = (
    ("use_bidirectional_attention", bool, "attends bidirectionally (an encoder), not causally; it is not a decoder "
                                          "an engine can generate with"),
    ("kv_lora_rank", _experts, "uses multi-head latent attention (DeepSeek's MLA: keys and values from a shared "
                               "low-rank projection, head dims other than head_dim), which is not supported yet"),
    ("clip_qkv", lambda v: v is not None, "clips q/k/v in place (OLMo's clip_qkv), which torch.export cannot "
                                          "capture; a checkpoint trained with it needs the clipping kept"),
    ("attention_chunk_size", _experts, "uses chunked attention (Llama 4's local layers), which is not supported "
                                       "yet"),
    # last: a config may declare experts that no layer uses (all layers dense), and then the blocker is above
    *((name, _experts, _MOE) for name in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")),
)


def layer_windows(hf) -> list[int | None]:
    """Per layer, the window transformers gives it: the attention module's ``sliding_window`` where it has one
    (Qwen2/3, Gemma 3, SmolLM3; none where its ``is_sliding`` is False: EXAONE 4), else the config's (Mistral,
    Phi-3: every layer); checked against layer_types."""
    config = hf.config
    kinds = getattr(config, "layer_types", None)
    unknown = sorted(set(kinds or ()) - {"full_attention", "sliding_attention"})
    if unknown:
        raise UnsupportedModelError(f"layer types {', '.join(unknown)} are not supported (full_attention and "
                                    "sliding_attention layers are)")
    windows = []
    for index, layer in enumerate(hf.base_model.layers):
        attention = layer.self_attn
        window = attention.sliding_window if hasattr(attention, "sliding_window") else getattr(
            config, "sliding_window", None)
        if getattr(attention, "is_sliding", True) is False:
            window = None  # a module that keeps the window on every layer and uses it where is_sliding (EXAONE 4)
        if kinds is not None and (kinds[index] == "sliding_attention") != (window is not None) and (
                kinds[index] == "sliding_attention" or hasattr(attention, "sliding_window")):
            raise UnsupportedModelError(f"layer {index} is {kinds[index]} but its attention has window {window}; "
                                        "fix layer_types / sliding_window in config.json")
        windows.append(int(window) if window else None)
    if len(set(windows)) > 1 and kinds is None:
        raise UnsupportedModelError("layers have different windows but the config has no layer_types")
    return windows


def load_transformers_model(folder: Path):
    """(TransformersDecoder, ModelConfig) for a local checkpoint folder, built by transformers itself."""
    try:
        import transformers
    except ImportError:
        raise UnsupportedModelError("--capture transformers needs the transformers package: pip install "
                                    "'agentopt-compiler[transformers]'") from None
    try:
        with _quiet_transformers(transformers):
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"transformers cannot read {folder / 'config.json'} ({_first_line(exc)})") from None
    config = getattr(config, "text_config", None) if not _is_causal_lm(config) else config
    if config is None or not _is_causal_lm(config):
        raise UnsupportedModelError(f"'{folder}' is not a causal language model transformers knows "
                                    "(no *ForCausalLM class for its model_type)")
    for attribute, test, reason in _REFUSALS:
        if test(getattr(config, attribute, None)):
            raise UnsupportedModelError(f"{config.model_type} with {attribute}={getattr(config, attribute)} "
                                        f"{reason}")
    from transformers.activations import ACT2FN

    for key in ("hidden_act", "hidden_activation"):  # built by name inside the model: a KeyError deep in transformers
        name = getattr(config, key, None)
        if isinstance(name, str) and name not in ACT2FN:
            raise UnsupportedModelError(f"{folder / 'config.json'}: {key} '{name}' is not an activation transformers "
                                        f"knows ({', '.join(sorted(k for k in ACT2FN if k.islower())[:8])}, ...)")
    from .checkpoint_check import check_finite, check_float_weights, read_header
    from .hf_loader import safetensors_files

    for path in safetensors_files(folder):  # the weights are there (else transformers would look for other formats)
        # and whole (a truncated file is our one-line error, not safetensors' from deep inside), and floats
        check_float_weights(read_header(path), folder)
    model_class = transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    # SDPA where it serves the model; soft-capped attention scores (Gemma 2) only run in eager attention
    implementation = "eager" if getattr(config, "attn_logit_softcapping", None) else "sdpa"
    try:
        with _quiet_transformers(transformers):
            # mismatched sizes are reported in ``info`` (named, with both shapes, below), not raised with a pointer
            # to a report that the quiet logging hides
            hf, info = model_class.from_pretrained(folder, config=config, dtype=torch.float32,
                                                   attn_implementation=implementation, local_files_only=True,
                                                   output_loading_info=True, ignore_mismatched_sizes=True)
    except (RuntimeError, OSError, ValueError) as exc:  # e.g. a tensor whose shape the config does not give
        reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelNotFoundError(f"transformers cannot load the weights in '{folder}': {reason[:300]}; use the "
                                 "config.json the weights were saved with") from None
    _check_loading_info(hf, info, folder)
    check_finite(hf.named_parameters(), folder)
    layers = getattr(hf.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise UnsupportedModelError(f"{type(hf).__name__} is not supported: its decoder layers are not at "
                                    f"{hf.base_model_prefix}.layers[i].self_attn, the layout of the decoders the "
                                    "capture reads (Llama, Qwen, Mistral, Gemma, Phi-3, SmolLM3 and their kin)")
    model = TransformersDecoder(hf.eval(), layer_windows(hf))
    return model.eval(), model_config(config, model.windows)


@contextlib.contextmanager
def _quiet_transformers(transformers):
    """No progress bars or warnings from transformers while it loads (our own report says what was loaded)."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _is_causal_lm(config) -> bool:
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def _check_loading_info(hf, info: dict, folder: Path) -> None:
    """transformers initializes missing weights randomly with a warning; a checkpoint must hold them all."""
    buffers = {name for name, _ in hf.named_buffers()}
    missing = sorted(set(info.get("missing_keys", ())) - buffers)
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.endswith(".inv_freq"))
    mismatched = sorted(f"{k[0]} {list(k[1])} where the config needs {list(k[2])}" if isinstance(k, tuple) and
                        len(k) == 3 else str(k) for k in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise ModelNotFoundError(f"weights in '{folder}' do not fit its config.json: missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]}, wrong shape {mismatched[:4]}; use the config.json the "
                                 "weights were saved with")


def model_config(config, windows: list[int | None]) -> ModelConfig:
    """Our description of a transformers config (the manifest's model.config: sizes, stop tokens, windows)."""
    heads = config.num_attention_heads
    eos = getattr(config, "eos_token_id", None)
    params = getattr(config, "rope_parameters", None) or {}
    flat = params if "rope_type" in params or "rope_theta" in params else {}  # per-layer-type dicts stay out
    rope_type = flat.get("rope_type", "default")
    window = next((w for w in windows if w), None)
    layer_types = None if len(set(windows)) == 1 else tuple(
        "sliding_attention" if w else "full_attention" for w in windows)
    return ModelConfig(
        family=config.model_type, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None), max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=float(getattr(config, "rms_norm_eps", None) or 1e-6),
        rope_theta=float(flat.get("rope_theta", 10000.0)),
        rope_scaling=None if rope_type == "default" else {k: v for k, v in flat.items() if k != "rope_theta"},
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)), sliding_window=window,
        layer_types=layer_types, capture="transformers", bos_token_id=getattr(config, "bos_token_id", None),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return re.sub(r"\s+", " ", text.splitlines()[0]) if text else type(exc).__name__

