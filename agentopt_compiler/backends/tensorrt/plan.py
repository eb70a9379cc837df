"""``TensorRTBuildPlan``: everything the TensorRT builder is told, decided in pure Python and recorded in the manifest.

Why a separate, GPU-free plan: the build itself needs TensorRT and a GPU, which most machines that compile (and all
CI here) lack. Keeping every decision (precision, typing mode, optimization profiles, workspace, timing cache, fp32
islands) in a dataclass built from the engine's manifest means those decisions are unit-tested without a GPU, are
recorded next to the plan file (``engine.tensorrt.plan`` in manifest.json), and ``agentopt rebuild`` on a GPU machine
reproduces them exactly.

Precision:
    ``fp32``  default; exact parity with the ONNX Runtime engine is expected (up to kernel accumulation order).
    ``fp16`` / ``bf16`` with ``typing="constraints"`` (TensorRT 10.x only; the weak-typing flags were deprecated in
              10.12 and removed in 11): builder flag FP16/BF16 + OBEY_PRECISION_CONSTRAINTS, and every layer of an
              fp32 island pinned to fp32.
    ``typing="strong"`` (default; the only mode in TensorRT 11): tensor types come from the ONNX. Per-layer
              fp16/bf16 comes from a precision plan, whose units the lowering emits as typed Cast/MatMul regions
              (passes/assign_layer_precision.py), so ``precision`` stays fp32 here and the ONNX carries the plan. A
              global fp16/bf16 with strong typing on an fp32 ONNX is refused rather than silently building fp32.

Profiles (batch is static in the captured graph; only the token count S varies):
    0 ``prefill``: input_ids/positions (B, 1) .. (B, opt) .. (B, context)   — TensorRT picks kernels for ``opt``
    1 ``decode`` : input_ids/positions (B, 1) exactly                       — kernels tuned for one token per row
    logits_index (B, L): L = 1 exactly on decode, 1 .. context on prefill (prompt-lookup decoding checks drafts
                 with one prefill-profile call); engines from before multi-position logits have a fixed (B,).
    The caches (B, Hkv, T, D) have fixed shapes (recorded, not part of any profile range).
The session runs S == 1 calls on the decode profile and everything else on the prefill profile.
"""

from __future__ import annotations

import ast
import fnmatch
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import AgentOptError

PRECISIONS = ("fp32", "fp16", "bf16")
TYPINGS = ("strong", "constraints")
DEFAULT_ISLANDS = ("*norm*", "*softmax*", "lm_head*")  # RMSNorm/LayerNorm, softmax, the final projection
DEFAULT_WORKSPACE = 4 << 30
DEFAULT_PREFILL_OPT = 512
PROFILE_NAMES = ("prefill", "decode")
TOKEN_INPUTS = ("input_ids", "positions")
OPTIONS = ("precision", "typing", "workspace_bytes", "timing_cache", "fp32_islands", "prefill_opt")


def default_timing_cache() -> str:
    """One timing cache per user, shared by all builds: later builds of similar models skip most tactic timing.
    TensorRT keys its entries by device and version itself, so sharing across GPUs is safe."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(base / "agentopt" / "tensorrt-timing.cache")


@dataclass(frozen=True)
class TensorRTBuildPlan:
    batch_size: int
    context_length: int
    cache_shapes: dict = field(default_factory=dict)  # past input name -> [B, Hkv, T, D]
    precision: str = "fp32"
    typing: str = "strong"
    workspace_bytes: int = DEFAULT_WORKSPACE
    timing_cache: str | None = None  # None: no timing cache
    fp32_islands: tuple = DEFAULT_ISLANDS
    prefill_opt: int = DEFAULT_PREFILL_OPT
    onnx_dtype: str = "float32"
    multi_logits: bool = True  # logits_index is (B, L); False for engines compiled before that: (B,)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise AgentOptError(f"TensorRT precision '{self.precision}' is not available; choose one of: "
                                f"{', '.join(PRECISIONS)}")
        if self.typing not in TYPINGS:
            raise AgentOptError(f"TensorRT typing mode '{self.typing}' is not available; choose one of: "
                                f"{', '.join(TYPINGS)}")
        if self.typing == "strong" and self.precision != "fp32" and self.onnx_dtype == "float32":
            raise AgentOptError(
                f"precision {self.precision} with strongly typed TensorRT needs a {self.precision} ONNX, but this "
                f"engine's ONNX is float32; compile with a precision plan whose units are {self.precision} (the "
                f"ONNX then carries the types), or use typing 'constraints' (TensorRT 10.x)")
        if self.workspace_bytes <= 0:
            raise AgentOptError(f"TensorRT workspace must be positive, got {self.workspace_bytes} bytes")
        if self.batch_size < 1 or self.context_length < 2:
            raise AgentOptError(f"internal: batch {self.batch_size} / context {self.context_length} cannot be built")
        if self.prefill_opt < 1:
            raise AgentOptError(f"prefill_opt must be at least 1, got {self.prefill_opt}")

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_manifest(cls, engine_section: dict, options: dict | None = None) -> "TensorRTBuildPlan":
        """The plan for an engine section (a manifest's ``engine``, or a lowering's section plus ``context_length``
        and ``batch_size``). Options not given fall back to the plan recorded in the section (so a rebuild keeps
        them), then to the defaults."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise AgentOptError(f"unknown TensorRT option(s): {', '.join(sorted(unknown))}; options: "
                                f"{', '.join(OPTIONS)}")
        for key in ("context_length", "batch_size", "caches"):
            if key not in engine_section:
                raise AgentOptError(f"engine section lacks '{key}'; recompile the engine")
        recorded = ((engine_section.get("tensorrt") or {}).get("plan") or {})
        chosen = {key: options.get(key, recorded.get(key)) for key in OPTIONS}
        chosen = {key: value for key, value in chosen.items() if value is not None}
        if "timing_cache" not in chosen:
            chosen["timing_cache"] = default_timing_cache()
        elif chosen["timing_cache"] in ("", "off", "none"):
            chosen["timing_cache"] = None
        if "fp32_islands" in chosen:
            islands = chosen["fp32_islands"]
            chosen["fp32_islands"] = tuple(islands.split(",") if isinstance(islands, str) else islands)
        return cls(batch_size=int(engine_section["batch_size"]), context_length=int(engine_section["context_length"]),
                   cache_shapes={c["input"]: [int(d) for d in c["shape"]] for c in engine_section["caches"]},
                   onnx_dtype=str(engine_section.get("dtype", "float32")),
                   multi_logits=bool(engine_section.get("multi_logits", False)), **chosen)

    # -- what the builder gets ---------------------------------------------------------------------------------
    def profiles(self) -> list[dict]:
        """Optimization profiles in build order (index = TensorRT profile index): name and per-tensor
        min/opt/max shapes. Fixed-shape inputs are listed with min == opt == max."""
        b, t = self.batch_size, self.context_length
        opt = max(1, min(self.prefill_opt, t))
        fixed = {name: list(shape) for name, shape in self.cache_shapes.items()}
        if not self.multi_logits:
            fixed["logits_index"] = [b]
        result = []
        for name, (low, best, high) in zip(PROFILE_NAMES, ((1, opt, t), (1, 1, 1))):
            shapes = {tensor: {"min": [b, low], "opt": [b, best], "max": [b, high]} for tensor in TOKEN_INPUTS}
            if self.multi_logits:  # one pick per row is the common call; prompt lookup picks up to S per row
                shapes["logits_index"] = {"min": [b, 1], "opt": [b, 1], "max": [b, high]}
            shapes |= {tensor: {"min": s, "opt": s, "max": s} for tensor, s in fixed.items()}
            result.append({"name": name, "shapes": shapes})
        return result

    def profile_for(self, tokens: int) -> int:
        """Index of the profile a call with ``tokens`` new tokens per row runs on."""
        if not 1 <= tokens <= self.context_length:
            raise AgentOptError(f"{tokens} tokens per call; the engine takes 1 to {self.context_length}")
        return PROFILE_NAMES.index("decode" if tokens == 1 else "prefill")

    def builder_flags(self, tensorrt_version: str) -> list[str]:
        """Names of ``trt.BuilderFlag`` members to set. Constraints mode needs the weak-typing flags, which
        TensorRT 11 removed: fail with the way out instead of an AttributeError."""
        if self.precision == "fp32" or self.typing == "strong":
            return []
        major = int(str(tensorrt_version).split(".")[0])
        if major >= 11:
            raise AgentOptError(f"precision {self.precision} with per-layer constraints needs TensorRT 10.x; "
                                f"TensorRT {tensorrt_version} removed weak typing; use precision fp32 (or a "
                                f"{self.precision} ONNX with strong typing when the lowering provides one)")
        return [self.precision.upper(), "OBEY_PRECISION_CONSTRAINTS"]

    @property
    def strongly_typed(self) -> bool:
        return self.typing == "strong"

    def to_dict(self) -> dict:
        """What the manifest records (``engine.tensorrt.plan``): the options plus the resolved profiles."""
        data = asdict(self)
        data["fp32_islands"] = list(self.fp32_islands)
        data["profiles"] = self.profiles()
        return data


# -- fp32 islands ------------------------------------------------------------------------------------------------
def _scopes(node) -> list[str]:
    """Module paths of an ONNX node from torch.onnx's ``pkg.torch.onnx.name_scopes`` metadata (a Python list
    literal such as "['', 'layers.0', 'layers.0.input_layernorm', 'mul_16']")."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return [s for s in ast.literal_eval(prop.value) if s]
            except (ValueError, SyntaxError):
                return []
    return []


def matches_island(names, patterns) -> bool:
    """True if any of ``names`` (node name, op type, module paths, TensorRT layer type) matches a glob pattern,
    case-insensitively."""
    lowered = [str(n).lower() for n in names if n]
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for name in lowered for pattern in patterns)


def island_nodes(model, patterns) -> list[str]:
    """Names of the ONNX nodes (``onnx.ModelProto``) that stay fp32: those whose name, op type or any enclosing
    module path matches a pattern. The TensorRT layers made from these nodes get fp32 precision constraints."""
    return [node.name for node in model.graph.node
            if matches_island([node.name, node.op_type, *_scopes(node)], patterns)]


def onnx_node_of(layer_name: str, metadata: str, node_names) -> str | None:
    """The ONNX node a TensorRT layer came from: the parser writes ``[ONNX Layer: <node>]`` into the layer's
    metadata (TensorRT 8.6+); otherwise the longest node name that prefixes the layer name."""
    if metadata and "[ONNX Layer: " in metadata:
        return metadata.split("[ONNX Layer: ", 1)[1].split("]", 1)[0]
    best = None
    for name in node_names:
        if layer_name.startswith(name) and (best is None or len(name) > len(best)):
            best = name
    return best
