"""Choosing which layers get a sparse attention pattern from measured cost (``agentopt plan sparse``).

Same shape as the precision planner (analysis/precision.py):

1. Measure, on calibration tokens, in the eager model (no KV cache: plain causal attention over each sequence):
   - per layer: that layer alone gets the pattern (its attention mask is ANDed with the pattern's visibility, every
     other layer keeps the model's own mask), and we compare next-token distributions with the dense model: mean
     KL(dense || sparse) per token over all positions of the sequence, and top-1 agreement; or over the positions
     a mask selects (``positions``): in chat episodes, those that predict assistant tokens. An average over every
     position is mostly user, tool and filler text: on agent-tiny it chose windows for layers whose few assistant
     tokens decide a task (docs/sparse_attention.md);
   - per (layer, query head), from the dense model: the attention mass outside the pattern, i.e. the fraction of
     softmax probability that the head puts on keys the pattern would hide, averaged over the queries beyond the
     window (position p >= W, the ones for which the pattern can hide anything). Heads with high mass are
     "retrieval" heads that look far back; heads with ~0 are "streaming" heads a window serves well.
2. Cost: KV-cache bytes per layer at the engine's context length: the full cache when dense, a ring of
   sinks + window + spare slots when sparse (bounded window/sinks patterns; a strided pattern keeps the full cache).
3. Choose: one option per layer, "dense" (KL 0, full KV bytes) or "sparse" (measured KL, ring bytes); minimize KV
   bytes (ties: prefer sparse) subject to sum of per-layer KL <= max_kl, by ``precision.choose`` (exact DP).
   Errors of different layers are treated as additive; ``measure_fidelity`` measures the eager model with *all*
   chosen layers sparse on held-out tokens to check how well that held.

The plan is per layer although the measurement is also per head: the fused attention op applies one pattern to all
heads of a layer, so a layer with one retrieval head among streaming heads must stay dense as a whole.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import AgentOptError
from ..output_paths import write_text_atomically
from ..passes.insert_sparse_attention import PLAN_FORMAT, SparseAttentionPlan, SparsePattern
from .precision import _compare, _log_probs, choose


@dataclass
class LayerOption:
    """One choice for one layer, in the shape ``precision.choose`` expects (grouped by ``unit``)."""

    unit: str  # "layers.3"
    layer: int
    choice: str  # "dense" or "sparse"
    kl: float
    top1: float
    kv_bytes: int


@dataclass
class SparseMeasurement:
    pattern: SparsePattern
    options: list[LayerOption]
    head_mass_outside: list[list[float]]  # [layer][query head], in [0, 1]
    context_length: int
    tokens: int  # calibration tokens measured
    queries_beyond_window: int  # queries (per head) the mass averages are taken over

    def sparse_option(self, layer: int) -> LayerOption:
        return next(o for o in self.options if o.layer == layer and o.choice == "sparse")

    def to_dict(self) -> dict:
        return {"pattern": asdict(self.pattern), "context_length": self.context_length, "tokens": self.tokens,
                "queries_beyond_window": self.queries_beyond_window,
                "layers": [{"layer": o.layer, "kl": o.kl, "top1": o.top1,
                            "kv_bytes_dense": self._dense(o.layer).kv_bytes, "kv_bytes_sparse": o.kv_bytes,
                            "head_mass_outside": self.head_mass_outside[o.layer]}
                           for o in self.options if o.choice == "sparse"]}

    def _dense(self, layer: int) -> LayerOption:
        return next(o for o in self.options if o.layer == layer and o.choice == "dense")


@dataclass
class SparsePlanResult:
    plan: SparseAttentionPlan  # sparse layers only; the others stay dense
    budget: dict
    predicted: dict
    measurement: SparseMeasurement
    fidelity: dict | None = field(default=None)

    @property
    def sparse_layers(self) -> list[int]:
        return sorted(self.plan.layers)

    def document(self) -> dict:
        """The plan file: the plan's own ``layers`` (what ``SparseAttentionPlan.load`` reads; edit freely) plus
        what it was chosen for and predicted to cost, and (when measured) its held-out fidelity."""
        doc = {"format": PLAN_FORMAT, **self.plan.to_dict(), "pattern": asdict(self.measurement.pattern),
               "budget": self.budget, "predicted": self.predicted}
        if self.fidelity is not None:
            doc["fidelity"] = self.fidelity
        return doc

    def save(self, path: str | Path) -> None:
        write_text_atomically(Path(path), json.dumps(self.document(), indent=2) + "\n", "the sparse attention plan")


def visible(pattern: SparsePattern, query_pos: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """Keys the pattern lets a query see (before causality), as in ``agentopt::cached_attention``:
    p - W < j, or j < sinks, or (p - j) % stride == 0."""
    keep = key_pos > query_pos - pattern.window
    if pattern.sinks > 0:
        keep = keep | (key_pos < pattern.sinks)
    if pattern.stride > 0:
        keep = keep | ((query_pos - key_pos) % pattern.stride == 0)
    return keep


class _ReferenceAttention:
    """Hooks on models/llama.py's attention: ``Attention.forward(x, positions, cos, sin, mask)``, mask (B, 1, S, T)
    bool; the softmax is recomputed from its q/k projections (SDPA does not return it)."""

    def __init__(self, model):
        self.model, self.layers = model, model.layers

    @contextlib.contextmanager
    def without_caches(self):
        """Measure without KV caches (causal attention over the given tokens); put them back afterwards."""
        saved = [layer.self_attn.kv_cache for layer in self.layers]
        try:
            for layer in self.layers:
                layer.self_attn.kv_cache = None
            yield
        finally:
            for layer, cache in zip(self.layers, saved):
                layer.self_attn.kv_cache = cache

    def restrict(self, index: int, pattern: SparsePattern):
        def hook(module, args):
            x, positions, cos, sin, mask = _attention_inputs(args)
            if module.kv_cache is not None:
                raise AgentOptError("sparse planning measures the cache-free forward; remove the KV caches")
            keep = visible(pattern, positions[:, None, :, None], positions[:, None, None, :])  # (B, 1, S, S)
            return x, positions, cos, sin, mask & keep
        return self.layers[index].self_attn.register_forward_pre_hook(hook)

    @contextlib.contextmanager
    def probabilities(self):
        yield

    def watch_mass(self, index: int, pattern: SparsePattern, record: Callable[[torch.Tensor, int], None]):
        def hook(module, args):
            record(*_mass_outside(module, args, pattern))
        return self.layers[index].self_attn.register_forward_pre_hook(hook)


class _TransformersAttention:
    """Hooks on an unmodified transformers module's attention (``TransformersDecoder``): its ``attention_mask``
    keyword, (B, 1, S, T) bool for SDPA or additive for eager attention; attention probabilities from transformers'
    eager attention, which returns them (switched on while the dense reference is measured)."""

    def __init__(self, model):
        self.model, self.layers = model, model.decoder_layers

    @contextlib.contextmanager
    def without_caches(self):
        capacity = self.model.capacity  # 0: the module attends causally over the given tokens only
        self.model.capacity = 0
        try:
            yield
        finally:
            self.model.capacity = capacity

    def restrict(self, index: int, pattern: SparsePattern):
        def hook(module, args, kwargs):
            mask = kwargs["attention_mask"]
            positions = torch.arange(mask.shape[-1], device=mask.device)  # cache-free: keys are the queries' tokens
            keep = visible(pattern, positions[:, None], positions[None, :])  # (S, S)
            mask = mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, torch.finfo(mask.dtype).min)
            return args, {**kwargs, "attention_mask": mask}
        return self.layers[index].self_attn.register_forward_pre_hook(hook, with_kwargs=True)

    @contextlib.contextmanager
    def probabilities(self):
        hf, implementation = self.model.hf, self.model.config._attn_implementation
        hf.set_attn_implementation("eager")
        try:
            yield
        finally:
            hf.set_attn_implementation(implementation)

    def watch_mass(self, index: int, pattern: SparsePattern, record: Callable[[torch.Tensor, int], None]):
        def hook(module, args, output):
            probs = output[1]  # (B, Hq, S, S), eager attention's softmax (0 where the mask hides a key)
            positions = torch.arange(probs.shape[-1], device=probs.device)
            query_pos, key_pos = positions[:, None], positions[None, :]
            hidden = (key_pos <= query_pos) & ~visible(pattern, query_pos, key_pos)  # (S, S)
            beyond = positions >= pattern.window  # (S,)
            record(((probs * hidden).sum(-1) * beyond).sum((0, 2)), int(beyond.sum()) * probs.shape[0])
        return self.layers[index].self_attn.register_forward_hook(hook)


def _attention_of(model):
    """How to reach ``model``'s attention: our reference decoder's or a transformers module's."""
    return _TransformersAttention(model) if hasattr(model, "hf") else _ReferenceAttention(model)


def _model_config(model):
    """The ModelConfig of the engine ``model`` compiles to (heads, KV heads, head size: the KV bytes)."""
    if hasattr(model, "hf"):
        from ..models.transformers_decoder import model_config

        return model_config(model.config, model.windows)
    return model.config


def _attention_inputs(args: tuple) -> tuple:
    if len(args) != 5:
        raise AgentOptError("sparse planning expects Attention.forward(x, positions, cos, sin, mask)")
    return args


@contextlib.contextmanager
def sparse_layers(model, layers: dict[int, SparsePattern]):
    """Eager model with ``layers`` (index -> pattern) sparse: each named layer's attention mask is ANDed with its
    pattern (a forward pre-hook on that layer's attention); other layers keep the model's own mask. Meant for the
    cache-free forward (key positions = query positions = the given tokens')."""
    attention = _attention_of(model)
    handles = []
    try:
        for index, pattern in layers.items():
            if not 0 <= index < len(attention.layers):
                raise AgentOptError(f"sparse plan names layer {index}, but the model has layers "
                                    f"0-{len(attention.layers) - 1}")
            handles.append(attention.restrict(index, pattern))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _mass_outside(attention, args, pattern: SparsePattern) -> tuple[torch.Tensor, int]:
    """Per query head: summed attention probability on keys the pattern hides, over queries at p >= window;
    and the number of such queries. Recomputes the dense layer's softmax (SDPA does not return it)."""
    from ..models.llama import apply_rope

    x, positions, cos, sin, mask = _attention_inputs(args)
    b, s, _ = x.shape
    h, hkv, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
    q = apply_rope(attention.q_proj(x).view(b, s, h, d).transpose(1, 2), cos, sin)  # (B, Hq, S, D)
    k = apply_rope(attention.k_proj(x).view(b, s, hkv, d).transpose(1, 2), cos, sin)  # (B, Hkv, S, D)
    k = k.repeat_interleave(h // hkv, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * d ** -0.5  # (B, Hq, S, S), SDPA's default scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    query_pos, key_pos = positions[:, None, :, None], positions[:, None, None, :]
    hidden = mask & ~visible(pattern, query_pos, key_pos)  # (B, 1, S, S)
    outside = (probs * hidden).sum(-1)  # (B, Hq, S)
    beyond = (positions >= pattern.window)[:, None, :]  # (B, 1, S)
    return (outside * beyond).sum((0, 2)), int(beyond.sum())


def kv_bytes(config, context_length: int, pattern: SparsePattern | None, dtype_bytes: int = 4) -> int:
    """Bytes of one layer's K and V caches at ``context_length`` (fp32 engines): the full cache when dense, the ring
    of sinks + window + spare slots when the pattern is bounded."""
    slots = pattern.ring_slots(context_length) if pattern is not None else 0
    return 2 * config.num_kv_heads * config.dim_per_head * (slots or context_length) * dtype_bytes


def measure_sparse_costs(model, batches: list[torch.Tensor], pattern: SparsePattern,
                         context_length: int | None = None,
                         progress: Callable[[int, int, str], None] | None = None,
                         positions: list[torch.Tensor] | None = None) -> SparseMeasurement:
    """Per layer: KL and top-1 of that layer alone sparse (over ``positions`` if given: one (B, S) bool mask per
    batch); per (layer, head): attention mass outside the pattern."""
    config = _model_config(model)
    context = context_length or min(config.max_position_embeddings, 4096)
    attention = _attention_of(model)
    layers = len(attention.layers)
    narrowed = _check_native_windows(config, layers, pattern)
    total, done = layers + 1, 0
    with attention.without_caches(), torch.no_grad():
        sums = torch.zeros(layers, config.num_heads, dtype=torch.float64)
        counts = [0] * layers
        handles = []

        def recorder(index):
            def record(mass: torch.Tensor, count: int) -> None:
                sums[index] += mass.double()
                counts[index] += count
            return record

        try:
            with attention.probabilities():
                for index in range(layers):
                    handles.append(attention.watch_mass(index, pattern, recorder(index)))
                reference = _log_probs(model, batches)
        finally:
            for handle in handles:
                handle.remove()
        mass = [[float(v) / max(counts[i], 1) for v in sums[i]] for i in range(layers)]
        done += 1
        if progress:
            progress(done, total, "dense reference")
        options = []
        for index in range(layers):
            with sparse_layers(model, {index: pattern}):
                kl, top1 = _compare(reference, _log_probs(model, batches), positions)
            unit = f"layers.{index}"
            options.append(LayerOption(unit, index, "dense", 0.0, 1.0, kv_bytes(config, context, None)))
            sparse_bytes = kv_bytes(config, context, pattern if index not in narrowed else None)
            options.append(LayerOption(unit, index, "sparse", max(kl, 0.0), top1, sparse_bytes))
            done += 1
            if progress:
                progress(done, total, f"layers.{index} {pattern.describe()}")
    return SparseMeasurement(pattern, options, mass, context, sum(b.shape[1] for b in batches), counts[0])


def _check_native_windows(config, layers: int, pattern: SparsePattern) -> set[int]:
    """The layers that keep their own sliding window under ``pattern`` (it sees no fewer keys: the engine leaves
    them as they are, and the measured masks, the window's AND the pattern's, are the window's). A pattern that
    narrows a windowed layer must be a plain window (insert_sparse_attention refuses sinks or strides there)."""
    kept = set()
    for index in range(layers):
        own = config.window_of(index)
        if own is None:
            continue
        if pattern.window >= own:
            kept.add(index)
        elif pattern.sinks or pattern.stride or pattern.kv_heads:
            raise AgentOptError(f"layer {index} attends to a sliding window of {own} already; {pattern.describe()} "
                                f"would show it keys it never saw; plan a plain window below {own}, or a window of "
                                f"at least {own} (the windowed layers then keep their own)")
    return kept


def check_length(length: int, pattern: SparsePattern) -> None:
    """Sequences no longer than the sinks and the window measure nothing (the pattern hides no key): refuse them."""
    seen = pattern.window + pattern.sinks
    if length <= seen:
        raise AgentOptError(f"calibration sequences of {length} tokens fit inside the window of {pattern.window} "
                            f"and the {pattern.sinks} sink(s), so the pattern hides nothing there and the "
                            f"measurement means nothing; use --length > {seen} (several times that is better)")


def choose_sparse_layers(measurement: SparseMeasurement, max_kl: float) -> SparsePlanResult:
    """Make as many layers sparse as the KL budget allows (fewest KV bytes; ties go to sparse)."""
    if max_kl < 0:
        raise AgentOptError(f"--max-kl must be >= 0, got {max_kl}")
    if max_kl == 0:  # only layers the pattern does not change at all (choose() needs a positive budget)
        free = {o.layer for o in measurement.options if o.choice == "sparse" and o.kl <= 0}
        chosen = {o.unit: o for o in measurement.options if o.choice == ("sparse" if o.layer in free else "dense")}
    else:
        chosen = choose(measurement.options, max_kl, lambda o: o.kl,
                        lambda o: o.kv_bytes + (1 if o.choice == "dense" else 0))
    sparse = sorted(o.layer for o in chosen.values() if o.choice == "sparse")
    plan = SparseAttentionPlan({layer: measurement.pattern for layer in sparse})
    predicted = {"kl": round(sum(o.kl for o in chosen.values()), 8),
                 "top1_loss": round(sum(1 - o.top1 for o in chosen.values()), 6),
                 "sparse_layers": sparse,
                 "dense_layers": sorted(o.layer for o in chosen.values() if o.choice == "dense"),
                 "kv_bytes": sum(o.kv_bytes for o in chosen.values()),
                 "kv_bytes_all_dense": sum(o.kv_bytes for o in measurement.options if o.choice == "dense"),
                 "context_length": measurement.context_length}
    return SparsePlanResult(plan, {"max_kl": max_kl}, predicted, measurement)


def plan_sparse(model, batches: list[torch.Tensor], pattern: SparsePattern, max_kl: float,
                context_length: int | None = None, progress=None,
                positions: list[torch.Tensor] | None = None) -> SparsePlanResult:
    """Measure (KL over ``positions`` if given) and choose (refuses calibration sequences that fit inside the
    window)."""
    check_length(min(b.shape[1] for b in batches), pattern)
    measurement = measure_sparse_costs(model, batches, pattern, context_length, progress, positions)
    return choose_sparse_layers(measurement, max_kl)


def measure_fidelity(model, plan: SparseAttentionPlan, batches: list[torch.Tensor],
                     positions: list[torch.Tensor] | None = None) -> dict:
    """The eager model with *all* of the plan's layers sparse against the dense model on (held-out) tokens: mean
    KL(dense || sparse) per token and top-1 agreement (over ``positions`` if given, as the plan was measured), to
    set beside the plan's additive prediction."""
    attention = _attention_of(model)
    with attention.without_caches(), torch.no_grad():
        reference = _log_probs(model, batches)
        with sparse_layers(model, plan.resolve(len(attention.layers))):
            kl, top1 = _compare(reference, _log_probs(model, batches), positions)
    tokens = sum(b.shape[1] for b in batches) if positions is None else int(sum(p.sum() for p in positions))
    return {"kl": round(max(kl, 0.0), 8), "top1": round(top1, 4), "tokens": tokens,
            "sequences": len(batches), "length": min(b.shape[1] for b in batches)}


def report_rows(result: SparsePlanResult) -> list[dict]:
    m = result.measurement
    rows = []
    for layer, heads in enumerate(m.head_mass_outside):
        option = m.sparse_option(layer)
        rows.append({"layer": layer, "chosen": "sparse" if layer in result.plan.layers else "dense",
                     "kl": option.kl, "top1": option.top1, "mass_mean": sum(heads) / len(heads),
                     "mass_max": max(heads), "heads": heads})
    return rows
