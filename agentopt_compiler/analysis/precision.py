"""Choosing a per-layer precision plan from measured sensitivity (``agentopt plan precision``).

1. Measure: one forward of the fp32 model on the calibration tokens keeps each decoder layer's inputs and the
   lm_head's input (``Calibration``). Then for each unit (see passes/precision_plan.py) and each candidate precision
   (int8/int4 at the plan's block size, or at their own: ``int4@128``; fp16/bf16 emulated), that unit alone is
   quantized (the same block-wise quantization the engine uses) and its error propagated from its layer's cached
   input through the rest of the model: mean KL(fp32 || quantized) of the next-token distributions, and top-1
   agreement. A unit in layer i costs the layers i.. and the head, not a whole forward; the KL is computed in float32
   without cancelling (``_Reference``) rather than through a float64 log-softmax over the vocabulary.
2. Cost: each unit's weights times the decode seconds per weight of the kernel format that runs them (``int4@32``,
   ``int4@128``, ``int8@32``, fp32), one constant per format measured once per machine and cached
   (analysis/cost_model.py): the same plan every run on a machine; formats the host cannot tell apart cost the same.
3. Choose: minimize total cost subject to the budget (sum of per-unit KL <= max_kl; or average bits <= target_bits,
   minimizing KL; or sum of top-1 losses <= 1 - min_top1). The choice is a multiple-choice knapsack solved exactly
   by dynamic programming over a discretized budget (``choose``), which beats the greedy upgrade heuristic
   (``choose_greedily``) when cheap early upgrades block better combinations.
4. Check: the chosen plan with all its units at once, end to end on the calibration tokens (chosen again, tighter,
   when the per-unit errors added up to more than the budget; under ``min_top1``, whose per-unit losses overlap,
   the per-unit budget is searched both ways: ``_choose_within_top1``), and each uniform candidate the same way; a
   mixed plan that is not faster than a uniform one at an equal or lower KL (under ``min_top1``: that meets it)
   gives way to it (``plan_precision``). The compile
   then measures the engine's KL on held-out tokens and its decode speed (``measure_fidelity``, compiler.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import AgentOptError
from ..passes.assign_layer_precision import HALF_DTYPES
from ..passes.precision_plan import BITS, PrecisionPlan, parse_precision, unit_of, units_of_model
from ..capture.quantized_linear import _symmetric_scales, dequantize_blockwise, quantize_blockwise
from .cost_model import unit_bytes

CPU_CANDIDATES = ("fp32", "int8", "int4")


@dataclass
class Option:
    unit: str
    precision: str  # a plan value: "fp32", "int8", "int4@128", ...
    kl: float
    top1: float
    bytes: int
    cost: float  # estimated seconds per decode step spent in this unit's matmuls


def unit_linears(model) -> dict[str, list[torch.nn.Linear]]:
    units: dict[str, list[torch.nn.Linear]] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and unit_of(name):
            units.setdefault(unit_of(name), []).append(module)
    return units


def _round_to(dtype: torch.dtype):
    return lambda t: t.to(dtype).to(t.dtype)


@contextlib.contextmanager
def restoring(linears: list[torch.nn.Linear]):
    """Undo on exit what the body does to these linears: their weight and bias tensors, and the hooks it appends to
    the yielded list."""
    saved = [(layer.weight.data, None if layer.bias is None else layer.bias.data) for layer in linears]
    hooks: list = []
    try:
        yield hooks
    finally:
        for hook in hooks:
            hook.remove()
        for layer, (weight, bias) in zip(linears, saved):
            layer.weight.data = weight
            if bias is not None:
                layer.bias.data = bias


def _round_trip(weight: torch.Tensor, bits: int, block: int, symmetric: bool, scales: dict | None, key) -> torch.Tensor:
    """quantize_blockwise then dequantize_blockwise, the same values; with a ``scales`` dict, symmetric scales (a
    least-squares search over clip ratios, most of the time of a quantization) are computed once per ``key`` and
    reused: the planner quantizes each unit again for its end-to-end checks."""
    if not symmetric or scales is None:
        q, s, z = quantize_blockwise(weight, bits, block, symmetric)
        return dequantize_blockwise(q, s, z, bits, block, weight.shape[1])
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // block, block)
    if key not in scales:
        scales[key] = _symmetric_scales(blocks, bits)
    step, middle = scales[key][..., None], 1 << (bits - 1)
    q = torch.clamp(torch.round(blocks / step) + middle, 0, (1 << bits) - 1)  # as quantize_blockwise
    return ((q - middle) * step).reshape(n, k)


@contextlib.contextmanager
def unit_at_precision(linears: list[torch.nn.Linear], precision: str, block: int, symmetric: bool = True,
                      scales: dict | None = None):
    """Temporarily make the unit compute what the engine will: int8/int4 replace the weights by their
    quantize-dequantize round trip (``scales``: a cache of block scales, see _round_trip); fp16/bf16 emulate the
    half region assign_layer_precision emits (cast x, half weights and bias, fp32 accumulation as GPU GEMMs do,
    output rounded to half, cast back) on any device."""
    with restoring(linears) as hooks:
        if precision in BITS:
            for layer in linears:
                w = layer.weight.data
                if w.shape[1] % block == 0:
                    layer.weight.data = _round_trip(w, BITS[precision], block, symmetric, scales,
                                                    (id(layer), precision, block))
        elif precision in HALF_DTYPES:
            rounded = _round_to(HALF_DTYPES[precision])
            for layer in linears:
                layer.weight.data = rounded(layer.weight.data)
                if layer.bias is not None:
                    layer.bias.data = rounded(layer.bias.data)
                hooks.append(layer.register_forward_pre_hook(lambda module, args: (rounded(args[0]), *args[1:])))
                hooks.append(layer.register_forward_hook(lambda module, args, output: rounded(output)))
        elif precision != "fp32":
            raise AgentOptError(f"unknown precision {precision!r}; candidates: fp32, fp16, bf16, int8, int4")
        yield


def _log_probs(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        # float64: fp16 errors are KL ~1e-8, under float32's rounding of the sum (it read 0 or negative)
        return [torch.log_softmax(model(batch).double(), -1) for batch in batches]


def _compare(reference: list[torch.Tensor], other: list[torch.Tensor],
             positions: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """Mean KL(reference || other) per token and top-1 agreement; with ``positions`` (one (B, S) bool mask per
    batch), over the selected positions only."""
    kl, agree, count = 0.0, 0.0, 0
    for i, (ref, oth) in enumerate(zip(reference, other)):
        token_kl = (ref.exp() * (ref - oth)).sum(-1)  # (B, S)
        same = ref.argmax(-1) == oth.argmax(-1)
        if positions is not None:
            token_kl, same = token_kl[positions[i]], same[positions[i]]
        kl += float(token_kl.sum())
        agree += float(same.sum())
        count += token_kl.numel()
    if count == 0:
        raise AgentOptError("no calibration position selected: the position masks are all false")
    return kl / count, agree / count


def _unit_bytes(linears: list[torch.nn.Linear], precision: str, block: int, symmetric: bool = True) -> int:
    precision, own_block = parse_precision(precision)
    return unit_bytes(sum(layer.weight.numel() for layer in linears), precision, own_block or block, symmetric)


class Calibration:
    """One forward of the fp32 model on the calibration tokens, keeping what every unit's measurement starts from:
    each decoder layer's inputs and the lm_head's input, and the reference logits.

    A unit in layer i is then measured by running layers i.. and the head from layer i's cached input (the layers
    before it compute exactly what they computed here), the lm_head from its cached input alone: on ref-60m a
    measurement costs ~4 layers and the head instead of a whole forward. Models without ``layers``, ``norm`` and
    ``lm_head`` (or whose layers cannot be re-run from their inputs, checked here) are measured by whole forwards.
    Rows of equal length are batched into one forward."""

    def __init__(self, model, batches: list[torch.Tensor]):
        self.model = model
        if batches and all(b.shape == batches[0].shape for b in batches):
            batches = [torch.cat(batches)]  # (sequences, S): one forward
        self.batches = batches
        self.layers = getattr(model, "layers", None)
        self.partial = isinstance(self.layers, torch.nn.ModuleList) and isinstance(
            getattr(model, "norm", None), torch.nn.Module) and isinstance(getattr(model, "lm_head", None),
                                                                          torch.nn.Linear)
        self.inputs: list[list] = []  # per batch: per layer (args, kwargs)
        self.head_inputs: list[torch.Tensor] = []
        self.linear_inputs: list[dict] = []  # per batch: unit linear -> its input (for output errors)
        self.references: list[_Reference] = []
        self.scales: dict = {}  # block scales of the units measured, reused by the end-to-end checks
        with torch.no_grad():
            for batch in batches:
                captured, hooks = {}, []
                if self.partial:
                    for i, layer in enumerate(self.layers):
                        hooks.append(layer.register_forward_pre_hook(
                            lambda m, args, kwargs, i=i: captured.setdefault(i, (args, kwargs)), with_kwargs=True))
                    hooks.append(model.lm_head.register_forward_pre_hook(
                        lambda m, args: captured.setdefault("head", args[0])))
                    for linears in unit_linears(model).values():
                        for layer in linears:
                            hooks.append(layer.register_forward_pre_hook(
                                lambda m, args: captured.setdefault(m, args[0])))
                try:
                    logits = model(batch).float()
                finally:
                    for hook in hooks:
                        hook.remove()
                self.references.append(_Reference(logits))
                if self.partial:
                    self.inputs.append([captured.get(i) for i in range(len(self.layers))])
                    self.head_inputs.append(captured.get("head"))
                    self.linear_inputs.append({k: v for k, v in captured.items() if isinstance(k, torch.nn.Module)})
            # the layers re-run from their inputs must give the forward's logits, else measure whole forwards
            self.partial = self.partial and all(None not in row for row in self.inputs) and all(
                h is not None for h in self.head_inputs) and all(
                torch.allclose(self._logits(0, b), r.logits, rtol=1e-4, atol=1e-5)
                for b, r in enumerate(self.references))

    @property
    def tokens(self) -> int:
        return sum(b.numel() for b in self.batches)

    def _logits(self, start: int | None, b: int) -> torch.Tensor:
        """Logits of batch b from layer ``start``'s cached input (None: the lm_head's input)."""
        if not self.partial:
            return self.model(self.batches[b]).float()
        if start is None:
            return self.model.lm_head(self.head_inputs[b]).float()
        x = self.inputs[b][start][0][0]
        for j in range(start, len(self.layers)):
            args, kwargs = self.inputs[b][j]
            x = self.layers[j](x, *args[1:], **kwargs)
            x = x[0] if isinstance(x, tuple) else x
        return self.model.lm_head(self.model.norm(x)).float()

    def output_error(self, linears: list[torch.nn.Linear], originals: list[torch.Tensor]) -> float:
        """Sum over the calibration tokens of ||x (W' - W)^T||^2 for each linear, W' its weight now and W its
        ``originals`` one: the energy of the error the unit adds to its outputs."""
        total = 0.0
        with torch.no_grad():
            for inputs in self.linear_inputs:
                for layer, weight in zip(linears, originals):
                    x = inputs[layer]
                    total += float((x.reshape(-1, x.shape[-1]) @ (layer.weight - weight).t()).square().sum())
        return total

    def divergence(self, start: int | None = 0) -> tuple[float, float]:
        """Mean KL(fp32 || model as it is now) per token and top-1 agreement, the model run from ``start``: the
        first layer whose weights differ from fp32 (None: only the lm_head does)."""
        kl, agree, count = 0.0, 0.0, 0
        with torch.no_grad():
            for b, reference in enumerate(self.references):
                token_kl, same = reference.compare(self._logits(start, b))
                kl += float(token_kl.sum())
                agree += float(same.sum())
                count += same.numel()
        return kl / count, agree / count


class _Reference:
    """fp32 logits z (B, S, V), their softmax p and argmax, for KL(p || q) against other logits w.

    With d = z - w: KL = E_p[d] + log E_p[exp(-d)]; shifting d by its mean m = E_p[d] (logits are shift-invariant)
    gives KL = log1p(E_p[expm1(-d') + d']), d' = d - m. Every term is computed in float32 without cancelling:
    fp16 errors (KL ~1e-8) come out right without the float64 log-softmax over the vocabulary that used to take
    three quarters of each measurement."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits
        self.probs = torch.softmax(logits, -1)
        self.top = logits.argmax(-1)

    def compare(self, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        same = other.argmax(-1) == self.top
        d = torch.sub(self.logits, other)  # (B, S, V)
        d -= torch.einsum("bsv,bsv->bs", self.probs, d)[..., None]  # d' = d - E_p[d]
        t = d.neg_()  # -d'
        e = torch.expm1(t).sub_(t)  # expm1(-d') + d' >= 0: a sum of positive terms, no cancellation
        kl = torch.log1p(torch.einsum("bsv,bsv->bs", self.probs, e).double())  # (B, S)
        return kl.clamp_min(0.0), same


def _start_of(unit: str) -> int | None:
    """The layer a unit's measurement starts from: 'layers.3.attn_o' -> 3; the lm_head -> None."""
    return None if unit == "lm_head" else int(unit.split(".")[1])


def _significant(value: float, digits: int = 4) -> float:
    """KLs rounded to a few significant digits before choosing: a last-bit difference between two runs cannot move
    a unit across a budget bucket."""
    return float(f"{value:.{digits}g}")


def _cost_function(costs, cost_model, block: int, symmetric: bool, candidates: list[str], threads, log):
    """(elements, precision) -> decode seconds, and what it came from (recorded in the plan). ``costs``: fixed
    seconds per weight per candidate (tests, or a benchmark's own timing); else the machine's cached per-format
    model."""
    from .cost_model import cached_cost_model, formats_for

    if costs is not None:
        missing = [c for c in candidates if parse_precision(c)[0] in BITS and c not in costs]
        if missing:
            raise AgentOptError(f"the cost model has no time for {missing}; measure it with "
                                "a CostModel (analysis/cost_model.py) instead")
        return (lambda n, p: n * costs.get(p, costs["fp32"])), {"kind": "given", "seconds_per_weight": dict(costs)}
    formats = formats_for(candidates, block)
    model = cost_model or cached_cost_model(threads, symmetric, log=log, formats=formats)
    missing = [f for f in formats if f not in model.seconds_per_weight]
    if missing:
        raise AgentOptError(f"the cost model has no time for {missing}; measure it: "
                            f"cached_cost_model(formats={formats}) (analysis/cost_model.py)")
    return (lambda n, p: model.seconds(n, p, block, symmetric)), model.to_dict()


SENSITIVITY_METHODS = ("scaled", "exact")


def measure_sensitivity(model, batches: list[torch.Tensor], candidates: Iterable[str] = CPU_CANDIDATES,
                        block: int = 32, costs: dict[str, float] | None = None,
                        progress: Callable[[int, int, str], None] | None = None, symmetric: bool = True,
                        calibration: Calibration | None = None, cost_model=None, threads: int | None = None,
                        log=None, record: dict | None = None, method: str = "exact") -> list[Option]:
    """One Option per (unit, precision): the error that unit alone at that precision causes, and its decode cost
    (``costs``: fixed seconds per weight per candidate; else ``cost_model`` or this machine's cached one,
    analysis/cost_model.py). ``symmetric``: the block quantization the plan will use (quantize_blockwise).
    ``record`` receives the cost model's description.

    ``method``: ``exact`` propagates every (unit, candidate) from the cached input of the unit's layer (Calibration).
    ``scaled`` propagates one candidate per layer unit, its most lossy int8/int4 one (the largest output error), and
    scales it to the others by their output error, KL(c) = KL(probe) * E(c) / E(probe) with E = ||x dW^T||^2 over the
    calibration tokens: KL is quadratic in a small perturbation, and block quantizations of one unit perturb it
    alike. Top-1 losses scale with the square root. fp16/bf16 candidates and the lm_head (whose measurement costs
    one matmul) are always exact; the plan's end-to-end check (plan_precision) measures what the estimates add up to.
    """
    if method not in SENSITIVITY_METHODS:
        raise AgentOptError(f"unknown sensitivity method {method!r}; use one of {', '.join(SENSITIVITY_METHODS)}")
    units = unit_linears(model)
    missing = set(units_of_model(len(model.decoder_layers))) - set(units)
    if missing:
        raise AgentOptError(f"model has no linear layers for units {sorted(missing)[:3]}")
    candidates = list(candidates)
    for candidate in candidates:
        parse_precision(candidate)  # an unknown one fails here, before any measuring
    cost_of, described = _cost_function(costs, cost_model, block, symmetric, candidates, threads, log)
    if record is not None:
        record["cost_model"] = described
    calibration = calibration or Calibration(model, batches)
    scaled = method == "scaled" and calibration.partial
    total, done, options = len(units) * len(candidates), 0, []
    for unit, linears in units.items():
        elements = sum(layer.weight.numel() for layer in linears)
        start = _start_of(unit) if calibration.partial else 0
        measured: dict[str, tuple[float, float]] = {}
        applicable = []
        for precision in candidates:
            bare, own_block = parse_precision(precision)
            # blocks must tile the in-features, else the engine keeps the unit fp32: no such option
            if bare not in BITS or not any(layer.weight.shape[1] % (own_block or block) for layer in linears):
                applicable.append(precision)
        weight_only = [p for p in applicable if parse_precision(p)[0] in BITS]
        if scaled and unit != "lm_head" and len(weight_only) > 1:
            energy, originals = {}, [layer.weight.data for layer in linears]
            for precision in weight_only:
                bare, own_block = parse_precision(precision)
                with unit_at_precision(linears, bare, own_block or block, symmetric, calibration.scales):
                    energy[precision] = calibration.output_error(linears, originals)
            probe = max(weight_only, key=lambda p: energy[p])
            bare, own_block = parse_precision(probe)
            with unit_at_precision(linears, bare, own_block or block, symmetric, calibration.scales):
                kl, top1 = calibration.divergence(start)
            for precision in weight_only:
                ratio = energy[precision] / energy[probe] if energy[probe] > 0 else 0.0
                measured[precision] = (kl * ratio, 1 - (1 - top1) * math.sqrt(ratio))
        for precision in candidates:
            done += 1
            if precision in applicable:
                bare, own_block = parse_precision(precision)
                if bare == "fp32":
                    kl, top1 = 0.0, 1.0
                elif precision in measured:
                    kl, top1 = measured[precision]
                else:
                    with unit_at_precision(linears, bare, own_block or block, symmetric, calibration.scales):
                        kl, top1 = calibration.divergence(start)
                options.append(Option(unit, precision, _significant(max(kl, 0.0)), top1,
                                      _unit_bytes(linears, precision, block, symmetric), cost_of(elements, precision)))
            if progress:
                progress(done, total, f"{unit} {precision}")
    return options


def measure_plan(model, calibration: Calibration, units: dict[str, str], block: int, symmetric: bool = True
                 ) -> tuple[float, float]:
    """KL and top-1 of every unit at its planned precision at once, against fp32: the end-to-end check of what the
    per-unit errors added up to."""
    linears = unit_linears(model)
    with contextlib.ExitStack() as stack:
        for unit, value in units.items():
            bare, own_block = parse_precision(value)
            if bare != "fp32":
                stack.enter_context(unit_at_precision(linears[unit], bare, own_block or block, symmetric,
                                                      calibration.scales))
        return calibration.divergence(0)


def _by_unit(options: list[Option]) -> dict[str, list[Option]]:
    grouped: dict[str, list[Option]] = {}
    for option in options:
        grouped.setdefault(option.unit, []).append(option)
    return grouped


def choose(options: list[Option], budget: float, spend: Callable[[Option], float],
           objective: Callable[[Option], float], steps: int = 4000) -> dict[str, Option]:
    """Exact multiple-choice knapsack by DP: one option per unit, sum(spend) <= budget, minimal sum(objective).
    ``spend`` is discretized into ``steps`` buckets of the budget (rounded up, so the budget is never exceeded)."""
    grouped = _by_unit(options)
    if budget <= 0:  # only options that spend nothing qualify; among those, the best objective
        free = {u: [o for o in opts if spend(o) <= 0] for u, opts in grouped.items()}
        if not all(free.values()):
            raise AgentOptError("no plan meets a zero budget: even the most accurate choice costs some error")
        return {u: min(opts, key=objective) for u, opts in free.items()}
    unit_size = budget / steps
    inf = float("inf")
    best = np.full(steps + 1, inf)
    best[0] = 0.0
    picks: list[dict[int, tuple[int, Option]]] = []
    for unit, opts in grouped.items():
        new = np.full(steps + 1, inf)
        choice: dict[int, tuple[int, Option]] = {}
        for option in opts:
            width = int(np.ceil(spend(option) / unit_size - 1e-9))
            if width > steps:
                continue
            shifted = best[: steps + 1 - width] + objective(option)
            target = new[width:]
            better = shifted < target
            target[better] = shifted[better]
            for index in np.nonzero(better)[0]:
                choice[int(index) + width] = (int(index), option)
        best = new
        picks.append(choice)
    end = int(np.argmin(best))
    if not np.isfinite(best[end]):
        raise AgentOptError("no plan meets the budget, even with every unit at its most accurate precision")
    chosen: dict[str, Option] = {}
    for choice in reversed(picks):
        end, option = choice[end]
        chosen[option.unit] = option
    return chosen


def choose_greedily(options: list[Option], budget: float, spend: Callable[[Option], float],
                    objective: Callable[[Option], float]) -> dict[str, Option]:
    """The usual heuristic, kept for comparison: start everything at its cheapest, then repeatedly make the upgrade
    with the best spend saved per objective added until the budget is met."""
    grouped = _by_unit(options)
    chosen = {u: min(opts, key=objective) for u, opts in grouped.items()}
    while sum(spend(o) for o in chosen.values()) > budget:
        moves = [((spend(chosen[u]) - spend(o)) / max(objective(o) - objective(chosen[u]), 1e-12), u, o)
                 for u, opts in grouped.items() for o in opts if spend(o) < spend(chosen[u])]
        if not moves:
            raise AgentOptError("greedy found no plan within the budget")
        _, unit, option = max(moves, key=lambda m: m[0])
        chosen[unit] = option
    return chosen


def plan_from_choice(chosen: dict[str, Option], block: int, budget: dict, symmetric: bool = True) -> PrecisionPlan:
    predicted = {"kl": round(sum(o.kl for o in chosen.values()), 6),
                 "top1_loss": round(sum(1 - o.top1 for o in chosen.values()), 6),
                 "bytes": sum(o.bytes for o in chosen.values()),
                 "decode_matmul_seconds": sum(o.cost for o in chosen.values())}
    return PrecisionPlan({u: o.precision for u, o in sorted(chosen.items())}, block, budget, predicted, symmetric)


def _check_budget(max_kl: float | None, target_bits: float | None, min_top1: float | None) -> None:
    """A budget some plan can meet, refused before measuring (the CLI's argument types say the same)."""
    for name, value, ok, wanted in (("--max-kl", max_kl, lambda v: v >= 0, ">= 0"),
                                    ("--target-bits", target_bits, lambda v: 0 < v <= 32, "in (0, 32]"),
                                    ("--min-top1", min_top1, lambda v: 0 <= v <= 1, "in [0, 1]")):
        if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value)):
            raise AgentOptError(f"{name} must be a finite number {wanted}, got {value!r}")


UNIFORM_MARGIN = 0.03  # a mixed plan must be predicted this much faster than the best uniform one, else uniform


def plan_precision(model, batches: list[torch.Tensor], max_kl: float | None = None, target_bits: float | None = None,
                   min_top1: float | None = None, candidates: Iterable[str] = CPU_CANDIDATES, block: int = 32,
                   costs: dict[str, float] | None = None, progress=None, symmetric: bool = True, cost_model=None,
                   threads: int | None = None, log=None, margin: float = UNIFORM_MARGIN, method: str = "scaled"
                   ) -> tuple[PrecisionPlan, list[Option]]:
    """Measure and choose. Exactly one budget: ``max_kl``, ``target_bits`` or ``min_top1``. ``symmetric=False``
    plans (and measures) blocks with zero points.

    After choosing, the plan is checked end to end: every unit at its precision at once, KL against fp32 on the
    calibration tokens. With ``max_kl``, a plan whose checked KL exceeds the budget (per-unit errors are not exactly
    additive) is chosen again under a budget scaled down by the overshoot (at most 3 times). Then the uniform plans
    (each candidate everywhere it applies) are checked the same way: if one at an equal or lower checked KL is
    predicted within ``margin`` of the mixed plan's decode cost, or cheaper, the uniform one is the plan (a mixed
    plan has to earn its complexity; see measurements["choice"])."""
    if sum(b is not None for b in (max_kl, target_bits, min_top1)) != 1:
        raise AgentOptError("give exactly one budget: --max-kl, --target-bits or --min-top1")
    _check_budget(max_kl, target_bits, min_top1)
    log = log or (lambda message: None)
    started = time.perf_counter()
    calibration = Calibration(model, batches)
    measurements: dict = {"calibration_tokens": calibration.tokens,
                          "sensitivity": (f"{method}, from cached layer inputs" if calibration.partial
                                          else "exact, whole forwards")}
    candidates = list(candidates)
    options = measure_sensitivity(model, batches, candidates, block, costs, progress, symmetric, calibration,
                                  cost_model, threads, log, measurements, method)
    measurements["sensitivity_seconds"] = round(time.perf_counter() - started, 1)
    if max_kl is not None:
        budget = {"max_kl": max_kl}
        chosen = choose(options, max_kl, lambda o: o.kl, lambda o: o.cost)
        checked = measure_plan(model, calibration, _units_of(chosen), block, symmetric)
        effective = max_kl
        for _ in range(3):  # the units' errors added up to more than their sum: choose again, tighter
            if checked[0] <= max_kl:
                break
            effective *= 0.95 * max_kl / checked[0]
            log(f"the plan's checked KL {checked[0]:.3g} exceeds --max-kl {max_kl}: choosing again within "
                f"{effective:.3g} of summed per-unit KL")
            chosen = choose(options, effective, lambda o: o.kl, lambda o: o.cost)
            checked = measure_plan(model, calibration, _units_of(chosen), block, symmetric)
        measurements["per_unit_kl_budget"] = _significant(effective)
    elif min_top1 is not None:
        budget = {"min_top1": min_top1}
        chosen, checked, effective = _choose_within_top1(options, model, calibration, block, symmetric, min_top1,
                                                         log)
        measurements["per_unit_top1_loss_budget"] = _significant(effective)
    else:
        budget = {"target_bits": target_bits}
        weights = sum(linear.weight.numel() for linears in unit_linears(model).values() for linear in linears)
        fewest = sum(min(o.bytes for o in opts) for opts in _by_unit(options).values()) * 8 / weights
        if target_bits < fewest:  # (int4 stores a fp32 scale per block beside the 4-bit codes)
            raise AgentOptError(f"--target-bits {target_bits:g}: the fewest bits per weight these candidates reach "
                                f"is {fewest:.3g} (every unit at its smallest, scales included); give --target-bits "
                                f"{math.ceil(fewest * 100) / 100:g} or more, or smaller candidates")
        try:
            chosen = choose(options, target_bits * weights / 8, lambda o: o.bytes, lambda o: o.kl)
        except AgentOptError:  # the DP rounds each unit's bytes up: at the very edge only the smallest plan is left
            chosen = {unit: min(opts, key=lambda o: (o.bytes, o.kl)) for unit, opts in _by_unit(options).items()}
        checked = measure_plan(model, calibration, _units_of(chosen), block, symmetric)
    plan = plan_from_choice(chosen, block, budget, symmetric)
    plan.predicted["checked_kl"], plan.predicted["checked_top1"] = _significant(checked[0]), round(checked[1], 4)
    uniform = _uniform_alternatives(model, calibration, options, candidates, block, symmetric)
    measurements["uniform"] = uniform
    measurements["choice"] = "mixed"
    if target_bits is None:  # cost-minimizing budgets: never slower than a uniform plan at an equal or lower KL
        # compared as recorded (4 significant digits): a uniform plan equal to the mixed one must qualify
        # (under --min-top1 the budget is top-1 alone: any uniform plan that checks within it qualifies)
        within = [u for u in uniform if u["checked_top1"] >= min_top1] if min_top1 is not None else \
            [u for u in uniform if u["checked_kl"] <= _significant(checked[0]) and u["checked_kl"] <= max_kl]
        best = min(within, key=lambda u: (u["decode_matmul_seconds"], u["checked_kl"]), default=None)
        mixed_cost = plan.predicted["decode_matmul_seconds"]
        if best is not None and best["decode_matmul_seconds"] * (1 - margin) <= mixed_cost:
            chosen = best["_picks"]
            plan = plan_from_choice(chosen, block, budget, symmetric)
            plan.predicted["checked_kl"], plan.predicted["checked_top1"] = best["checked_kl"], best["checked_top1"]
            quality = (f"its checked top-1 {best['checked_top1']:.4f} meets --min-top1 {min_top1}, and" if min_top1
                       is not None else f"at its checked KL {best['checked_kl']:.3g} (the mixed plan's: "
                                        f"{checked[0]:.3g})")
            measurements["choice"] = (
                f"uniform {best['precision']}: {quality} the mixed plan is predicted "
                f"{best['decode_matmul_seconds'] / mixed_cost:.3f}x its speed, not the {1 / (1 - margin):.3f}x a mixed "
                "plan must gain")
            log(f"choosing {measurements['choice']}")
    for row in uniform:
        del row["_picks"]
    measurements["uniform_margin"] = margin
    measurements["planning_seconds"] = round(time.perf_counter() - started, 1)
    plan.measurements = measurements
    return plan, options


def _choose_within_top1(options: list[Option], model, calibration: Calibration, block: int, symmetric: bool,
                        min_top1: float, log) -> tuple[dict[str, Option], tuple[float, float], float]:
    """The cheapest plan found whose checked top-1 agreement is at least ``min_top1``. Per unit, a top-1 loss is the
    share of calibration tokens whose argmax that unit alone flips; the plan's flips overlap (the same near-ties flip
    under any unit's noise), so the summed losses overstate the plan's, often several times (agent-tiny at 0.97:
    summed 0.029, checked 0.006). So the per-unit budget is searched: up to three more choices, each checked
    whole, first rescaled by the checked loss's share of the allowed one (looser while within, tighter while
    not), then halfway (geometrically) between the loosest budget within and the tightest over it. Returns the plan,
    its checked (KL, top-1) and the per-unit budget it was chosen in."""
    allowed = 1 - min_top1
    loss_of, cost_of = (lambda o: 1 - o.top1), (lambda o: o.cost)
    within: tuple | None = None  # (budget, plan, checked) of the loosest budget whose plan checked within
    over: float | None = None  # the tightest budget whose plan did not
    budget = allowed
    for attempt in range(4):
        try:
            chosen = choose(options, budget, loss_of, cost_of)
        except AgentOptError:
            if within is None:
                raise
            break
        if within is not None and _units_of(chosen) == _units_of(within[1]):
            checked = within[2]  # the same plan: no need to check it again
        else:
            checked = measure_plan(model, calibration, _units_of(chosen), block, symmetric)
        loss = 1 - checked[1]
        if loss <= allowed:
            within = (budget, chosen, checked)
        else:
            over = budget
        if attempt == 3:
            break
        if within is not None and over is not None:
            budget = math.sqrt(within[0] * over)
        elif within is not None:
            if sum(map(loss_of, chosen.values())) < 0.5 * budget:
                break  # the budget does not bind this choice (each unit at its cheapest): looser changes nothing
            budget *= 0.95 * allowed / loss if loss > 0 else 2.0
        else:
            budget *= 0.95 * allowed / loss
        log(f"the plan's checked top-1 {checked[1]:.4f} against --min-top1 {min_top1}: choosing again within a "
            f"summed per-unit top-1 loss of {budget:.3g}")
    if within is None:
        raise AgentOptError(f"no plan reached a checked top-1 of {min_top1} on the calibration tokens (the last: "
                            f"{checked[1]:.4f}); lower --min-top1, or add fp32 to --candidates")
    budget, chosen, checked = within
    return chosen, checked, budget


def _units_of(chosen: dict[str, Option]) -> dict[str, str]:
    return {u: o.precision for u, o in chosen.items()}


def _uniform_alternatives(model, calibration: Calibration, options: list[Option], candidates: list[str], block: int,
                          symmetric: bool) -> list[dict]:
    """Each lossy candidate everywhere it applies (fp32 where its blocks do not tile a unit, as the engine does):
    its summed per-unit KL, decode cost and checked KL."""
    grouped = _by_unit(options)
    rows = []
    for precision in candidates:
        if parse_precision(precision)[0] == "fp32":
            continue
        picks = {u: next((o for o in opts if o.precision == precision),
                         next((o for o in opts if o.precision == "fp32"), None)) for u, opts in grouped.items()}
        if None in picks.values():  # a unit it cannot tile, and fp32 is no candidate: no such uniform plan
            continue
        kl, top1 = measure_plan(model, calibration, _units_of(picks), block, symmetric)
        rows.append({"precision": precision, "summed_kl": _significant(sum(o.kl for o in picks.values())),
                     "checked_kl": _significant(kl), "checked_top1": round(top1, 4),
                     "decode_matmul_seconds": sum(o.cost for o in picks.values()), "_picks": picks})
    return rows


def report_rows(options: list[Option], plan: PrecisionPlan) -> list[dict]:
    rows = []
    for unit, opts in _by_unit(options).items():
        row = {"unit": unit, "chosen": plan.precision_of(unit)}
        for o in opts:
            row[f"kl_{o.precision}"] = o.kl
            row[f"top1_{o.precision}"] = o.top1
        rows.append(row)
    return rows


def options_to_json(options: list[Option]) -> list[dict]:
    return [asdict(o) for o in options]


def sequence_rows(session) -> range:
    """The cache rows one sequence is fed to: one row, or every row of an engine whose graph runs its rows together
    (static batch; each row fed the same tokens, row 0's logits read)."""
    return range(0, 1) if session.row_subsets else range(session.batch_size)


def measure_fidelity(engine, model, batches: list[torch.Tensor]) -> dict:
    """The compiled engine against the fp32 eager model on held-out tokens, teacher-forced one token per call:
    mean KL(fp32 || engine) per token and top-1 agreement (what the plan's prediction is checked against)."""
    reference = _log_probs(model, batches)
    ours = []
    session = engine.session
    fed = sequence_rows(session)
    for batch in batches:
        session.reset()
        rows = []
        for position, token in enumerate(batch[0].tolist()):
            logits = session.run(np.array([[token]] * len(fed)), np.array([position]), None, fed)
            rows.append(torch.log_softmax(torch.from_numpy(logits[0, -1]).double(), -1))
        ours.append(torch.stack(rows)[None])
    kl, top1 = _compare(reference, ours)
    return {"kl": round(kl, 6), "top1": round(top1, 4), "tokens": sum(b.shape[1] for b in batches)}
