"""A per-layer precision plan: pure data, JSON-serializable and editable by hand.

Units are groups of linear layers that are quantized together:
    layers.{i}.attn_qkv     q, k and v projections (one packed matmul after pack_qkv_projections)
    layers.{i}.attn_o       attention output projection
    layers.{i}.mlp_gate_up  gate and up projections
    layers.{i}.mlp_down     down projection
    lm_head                 output projection
Precisions: ``fp32``, ``fp16``, ``bf16``, ``int8``, ``int4`` (int8/int4: weight-only, block-wise, see
capture/quantized_linear.py), at the plan's ``block_size`` or, written ``int4@128``, at a block size of the unit's own
(larger blocks store fewer scales and decode faster, at more error). Units a plan does not name stay fp32.

    {"format": "agentopt-precision-plan", "version": 1, "block_size": 32, "symmetric": true,
     "units": {"layers.0.mlp_down": "int4", "layers.0.mlp_gate_up": "int4@128", "lm_head": "int8"},
     "budget": {"max_kl": 0.02}, "predicted": {"kl": 0.015, "top1": 0.97}}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AgentOptError
from ..output_paths import write_text_atomically
from ..validation import (Invalid, Spec, anything_object, boolean, check, integer, map_of, number, read_json, record,
                          string)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits takes (a power of two, at least 16)
FORMAT = "agentopt-precision-plan"

_UNIT_OF_MODULE = (
    (re.compile(r"^(layers\.\d+)\.self_attn\.(?:q|k|v|qkv)_proj$"), r"\1.attn_qkv"),
    (re.compile(r"^(layers\.\d+)\.self_attn\.o_proj$"), r"\1.attn_o"),
    (re.compile(r"^(layers\.\d+)\.mlp\.(?:gate|up|gate_up)_proj$"), r"\1.mlp_gate_up"),
    (re.compile(r"^(layers\.\d+)\.mlp\.down_proj$"), r"\1.mlp_down"),
    (re.compile(r"^lm_head$"), "lm_head"),
)


def unit_of(module_path: str) -> str | None:
    """'layers.3.mlp.up_proj' -> 'layers.3.mlp_gate_up'; None for modules that are not planned units."""
    path = module_path.removeprefix("model.")
    for pattern, unit in _UNIT_OF_MODULE:
        if pattern.match(path):
            return pattern.sub(unit, path)
    return None


def parse_precision(value: str) -> tuple[str, int | None]:
    """'int4@128' -> ('int4', 128); 'int8' -> ('int8', None): the plan's block size. Raises on anything else."""
    precision, at, block = value.partition("@")
    if precision not in PRECISIONS:
        raise AgentOptError(f"unknown precision {value!r}; use one of {', '.join(PRECISIONS)} (int8/int4 may name a "
                            "block size, e.g. int4@128)")
    if not at:
        return precision, None
    if precision not in BITS or not block.isdigit() or int(block) not in BLOCK_SIZES:
        raise AgentOptError(f"bad precision {value!r}: only int8/int4 take a block size, one of "
                            f"{', '.join(map(str, BLOCK_SIZES))} (e.g. int4@128)")
    return precision, int(block)


def units_of_model(num_layers: int) -> list[str]:
    per_layer = ("attn_qkv", "attn_o", "mlp_gate_up", "mlp_down")
    return [f"layers.{i}.{u}" for i in range(num_layers) for u in per_layer] + ["lm_head"]


@dataclass
class PrecisionPlan:
    units: dict[str, str] = field(default_factory=dict)  # unit -> precision, e.g. "int4" or "int4@128"
    block_size: int = 32
    budget: dict = field(default_factory=dict)  # what the plan was chosen to meet, e.g. {"max_kl": 0.02}
    predicted: dict = field(default_factory=dict)  # what the analysis predicts for the whole plan
    # int8/int4 blocks around a fixed zero point, no zero points stored (see quantized_linear); False: zero points
    symmetric: bool = True
    # what the planner measured to choose it: the cost model's constants, the end-to-end checks of this plan and of
    # the uniform alternatives, and why it is mixed or uniform (analysis/precision.py plan_precision)
    measurements: dict = field(default_factory=dict)
    model: str = ""  # the model it was measured on (agentopt plan records it; the compile refuses another model)

    def __post_init__(self):
        for unit, value in self.units.items():
            try:
                parse_precision(value)
            except AgentOptError as exc:
                raise AgentOptError(f"precision plan, unit {unit}: {exc}") from None
        if self.block_size not in BLOCK_SIZES:
            raise AgentOptError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {self.block_size}")

    @classmethod
    def uniform(cls, precision: str, num_layers: int, block_size: int = 32, lm_head: str | None = None,
                symmetric: bool = True):
        units = {u: precision for u in units_of_model(num_layers)}
        if lm_head:
            units["lm_head"] = lm_head
        return cls(units, block_size, symmetric=symmetric)

    def precision_of(self, unit: str | None) -> str:
        """The unit's precision without its block size ('int4@128' -> 'int4'); fp32 for units the plan omits."""
        return parse_precision(self.units.get(unit, "fp32"))[0] if unit else "fp32"

    def block_of(self, unit: str | None) -> int:
        """The unit's int8/int4 block size: its own (int4@128) or the plan's."""
        return (parse_precision(self.units.get(unit, "fp32"))[1] if unit else None) or self.block_size

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": 1, "block_size": self.block_size, "symmetric": self.symmetric,
                "units": dict(self.units), "budget": self.budget, "predicted": self.predicted,
                **({"measurements": self.measurements} if self.measurements else {}),
                **({"model": self.model} if self.model else {})}

    def save(self, path: str | Path) -> None:
        write_text_atomically(Path(path), json.dumps(self.to_dict(), indent=2) + "\n", "the precision plan")

    @classmethod
    def load(cls, source: "str | Path | dict | PrecisionPlan | None") -> "PrecisionPlan | None":
        if source is None or isinstance(source, PrecisionPlan):
            return source
        if isinstance(source, (str, Path)) and str(source) in PRECISIONS:
            raise AgentOptError(f"'{source}' is a precision, not a plan: use PrecisionPlan.uniform or "
                                "agentopt plan precision to make one")
        where = "precision plan"
        if not isinstance(source, dict):
            where = f"precision plan '{source}'"
            source = read_json(Path(source), "precision plan", _FIX)
        data = check(source, PLAN_FILE, source=where, fix=_FIX)
        return cls(data["units"], data.get("block_size", 32), data.get("budget", {}), data.get("predicted", {}),
                   data.get("symmetric", True), data.get("measurements", {}), data.get("model", ""))

    def check_units(self, num_layers: int) -> None:
        """Refuse units the model does not have (a plan for another model, or a typo): they would stay fp32
        silently."""
        known = set(units_of_model(num_layers))
        unknown = sorted(set(self.units) - known, key=lambda u: (len(u), u))
        if unknown:
            raise AgentOptError(
                f"precision plan names unit(s) the model does not have: {', '.join(unknown[:4])}"
                f"{' ...' if len(unknown) > 4 else ''}; its units are layers.0-{num_layers - 1}.(attn_qkv, attn_o, "
                f"mlp_gate_up, mlp_down) and lm_head: fix the names, or make a plan for this model with agentopt "
                "plan precision")


def _precision_problem(value: str) -> str | None:
    try:
        parse_precision(value)
    except AgentOptError as exc:
        return str(exc)
    return None


class _PrecisionName(Spec):
    description = "a precision such as int4 or int4@128"

    def validate(self, value, path):
        if not isinstance(value, str):
            raise self.fail(value, path)
        problem = _precision_problem(value)
        if problem:
            raise Invalid(path, f"has {problem}")
        return value


_FIX = "fix the plan file or make a new one with agentopt plan precision"
# The plan file; "measured" is what a compile adds to the copy it keeps in the engine's manifest.
PLAN_FILE = record({
    "format": string(choices=(FORMAT,)), "version": integer(minimum=1, maximum=1), "block_size":
    integer(choices=BLOCK_SIZES), "symmetric": boolean(), "units": map_of(_PrecisionName()),
    "budget": record({"max_kl": number(minimum=0.0), "target_bits": number(above=0.0), "min_top1": number(
        minimum=0.0, maximum=1.0)}), "predicted": anything_object(), "measured": anything_object(),
    "measurements": anything_object(), "model": string(),
}, required=("format", "units"))
