"""Pass ``insert_sparse_attention``: give chosen layers a sparse attention pattern, explicitly and per layer.

Before:                                              After (layers the plan names):
    agentopt.cached_attention(..., window=-1)            agentopt.cached_attention(..., window=W, sinks=S,
                                                                                   stride=K)
Patterns (a query at position p sees key j <= p when):
    window W            p - W < j                          sliding window (W keys, itself included)
    sinks S + window W  p - W < j  or  j < S               StreamingLLM: the first S tokens stay visible
    stride K + window W p - W < j  or  (p - j) % K == 0    Sparse-Transformer strided (local + every K-th)
Layers the plan does not name stay dense, so local/global interleaving (Gemma/Mistral-style hybrids) is a list of
windowed layers. Per KV head: ``kv_heads=0-1`` gives the pattern to those KV heads (and the query heads that share
them) while the layer's other heads stay dense, the retrieval-vs-streaming-heads split (DuoAttention); such layers
keep full caches (their dense heads need every position) and lower to an explicit per-head mask. The plan is data: ``SparseAttentionPlan.parse("window=1024,sinks=4,layers=2-7")`` on the CLI, or
a JSON plan file; the pass records per layer what it set, and the manifest keeps the plan.

Window and sinks+window layers also get *bounded memory*: their caches shrink to sinks + R slots, R = window +
RING_SPARE_SLOTS (position p lives in slot p if p < sinks, else sinks + (p - sinks) % R), so a session can run to
the engine's context length (its RoPE table) with per-layer memory and work that do not grow (``bounded=0`` keeps
full caches). The spare slots hold positions already out of every later query's window, so tokens written past a
row's end (prompt-lookup drafts the model rejects, right padding in a batch) overwrite nothing still read.

Why: long agent sessions make dense attention's work and KV memory grow without bound; a window bounds both. Export pipelines in the field silently drop such patterns; here the pattern is an argument of the
fused op, so every lowering must carry it (GQA ``local_window_size``, or an explicit mask), and tests compare the
engine with the eager reference under the same mask.

Requires ``fuse_kv_cache`` (the pattern rides on the fused op); it refuses a plan that names layers the model
does not have.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..capture.custom_ops import CachedAttentionArgs
from ..errors import AgentOptError
from ..validation import anything_object, boolean, check, integer, list_of, map_of, optional, read_json, record, string
from .infra import GraphPass, PassResult, owner_of
from .region_graph import region_of

# Ring slots beyond the window. Up to this many tokens past a row's end (drafts, padding) may be written and then
# stepped back over (the runtime refuses more), and the ONNX lowering, which stores a call's rows before it attends,
# is exact for calls of up to this many + 1 tokens (sessions split longer ones; 65-token chunks prefill as fast as
# one call on ref-60m). A slot costs 2 x Hkv x D x 4 bytes per layer in fp32.
RING_SPARE_SLOTS = 64
MAX_LAYERS = 1 << 12  # layer indices a plan may name (far beyond any model's depth)
PLAN_FORMAT = "agentopt-sparse-attention-plan"  # the plan file agentopt plan sparse writes (analysis/sparse.py)


@dataclass(frozen=True)
class SparsePattern:
    window: int
    sinks: int = 0
    stride: int = 0
    bounded: bool = True  # window/sinks layers get a ring cache (sinks + window + spare slots; not with a stride)
    kv_heads: tuple[int, ...] = ()  # KV heads the pattern applies to; the layer's others stay dense. () = all

    def __post_init__(self):
        if self.window < 1:
            raise AgentOptError(f"sparse attention window must be >= 1, got {self.window}")
        if self.sinks < 0 or self.stride < 0:
            raise AgentOptError("sparse attention sinks and stride must be >= 0")
        if any(h < 0 for h in self.kv_heads):
            raise AgentOptError(f"sparse attention kv_heads must be >= 0, got {list(self.kv_heads)}")
        object.__setattr__(self, "kv_heads", tuple(sorted(set(self.kv_heads))))  # (JSON gives lists)

    def describe(self) -> str:
        extra = (f"+sinks{self.sinks}" if self.sinks else "") + (f"+stride{self.stride}" if self.stride else "")
        heads = f"@kv{'+'.join(map(str, self.kv_heads))}" if self.kv_heads else ""
        return f"window{self.window}{extra}{heads}"

    def ring_slots(self, capacity: int) -> int:
        """Cache slots this pattern needs, or 0 when it keeps the full-length cache (dense heads need it)."""
        slots = self.sinks + self.window + RING_SPARE_SLOTS
        return slots if self.bounded and not self.stride and not self.kv_heads and slots < capacity else 0


@dataclass(frozen=True)
class SparseAttentionPlan:
    layers: dict[int, SparsePattern] = field(default_factory=dict)  # layer index -> pattern; others dense
    model: str = ""  # the model a plan file was measured on (agentopt plan records it; the compile checks it)

    @classmethod
    def parse(cls, spec: str) -> "SparseAttentionPlan":
        """``window=1024,sinks=4,layers=2-7`` (several groups separated by ``;``); no ``layers`` means all (a group
        that names layers overrides it there); ``kv_heads=0-1`` limits the pattern to those KV heads. Two groups
        naming one layer are refused: which pattern was meant?"""
        layers: dict[int | str, SparsePattern] = {}
        for group in filter(None, (g.strip() for g in spec.split(";"))):
            fields, key = {}, None
            for item in group.split(","):
                if "=" not in item and key in ("layers", "kv_heads"):  # layers=0,2,4: the list goes on
                    fields[key] += "," + item.strip()
                    continue
                key, _, value = item.partition("=")
                key = key.strip()
                fields[key] = value.strip()
            unknown = set(fields) - {"window", "sinks", "stride", "bounded", "layers", "kv_heads"}
            if unknown or "window" not in fields:
                raise AgentOptError(f"cannot read sparse attention '{group}': expected window=W[,sinks=S]"
                                    f"[,stride=K][,bounded=0|1][,kv_heads=A-B|A,B,...][,layers=A-B|A,B,...]")
            try:
                kv_heads = tuple(_layer_list(fields["kv_heads"])) if "kv_heads" in fields else ()
                pattern = SparsePattern(int(fields["window"]), int(fields.get("sinks", 0)),
                                        int(fields.get("stride", 0)), bool(int(fields.get("bounded", 1))),
                                        kv_heads)
                named = _layer_list(fields.get("layers", "all"))
            except ValueError:
                raise AgentOptError(f"cannot read sparse attention '{group}': numbers expected") from None
            for layer in named:
                if layer in layers:
                    where = "all layers" if layer == "all" else f"layer {layer}"
                    raise AgentOptError(f"sparse attention '{spec}' gives {where} two patterns; name each layer in "
                                        "one group (a group without layers= covers the layers no other names)")
                layers[layer] = pattern
        if not layers:
            raise AgentOptError(f"sparse attention '{spec}' names no pattern; give e.g. window=1024,sinks=4 or a "
                                "JSON plan file")
        return cls(layers)  # "all" stays a key until resolved against the model

    @classmethod
    def load(cls, source: "str | Path | dict | SparseAttentionPlan | None") -> "SparseAttentionPlan | None":
        """A plan from a spec string, a JSON plan file, a dict, or a plan."""
        if source is None or isinstance(source, SparseAttentionPlan):
            return source
        where = "sparse attention plan"
        if not isinstance(source, dict):
            if Path(str(source)).suffix != ".json":
                return cls.parse(str(source))
            where = f"sparse attention plan '{source}'"
            source = read_json(Path(str(source)), "sparse attention plan", _FIX)
        data = check(source, PLAN_FILE, source=where, fix=_FIX)
        return cls({_layer_key(k): SparsePattern(**{**v, "kv_heads": tuple(v.get("kv_heads", ()))})
                    for k, v in data["layers"].items()}, data.get("model", ""))

    def resolve(self, num_layers: int) -> dict[int, SparsePattern]:
        resolved = {i: self.layers["all"] for i in range(num_layers)} if "all" in self.layers else {}
        resolved.update({k: v for k, v in self.layers.items() if k != "all"})
        missing = sorted(k for k in resolved if not 0 <= k < num_layers)
        if missing:
            raise AgentOptError(f"sparse attention plan names layer(s) {missing}, but the model has layers "
                                f"0-{num_layers - 1}")
        return resolved

    def to_dict(self) -> dict:
        return {"layers": {str(k): {**asdict(v), "kv_heads": list(v.kv_heads)}
                           for k, v in sorted(self.layers.items(), key=lambda kv: str(kv[0]))},
                **({"model": self.model} if self.model else {})}


def _layer_key_problem(key: str) -> str | None:
    return None if key == "all" or (key.isdigit() and key.isascii()) else "must be a layer index or \"all\""


_FIX = "fix the plan file or make a new one with agentopt plan sparse"
_PATTERN = record({"window": integer(minimum=1), "sinks": integer(minimum=0), "stride": integer(minimum=0),
                   "bounded": boolean(), "kv_heads": list_of(integer(minimum=0))}, required=("window",))
# The plan file: its "layers" are the plan; the rest records how agentopt plan sparse chose it (see analysis/sparse.py).
PLAN_FILE = record({
    "format": string(choices=(PLAN_FORMAT,)), "layers": map_of(_PATTERN, key=_layer_key_problem),
    "pattern": anything_object(), "budget": anything_object(), "predicted": anything_object(),
    "fidelity": optional(anything_object()), "model": string(),
}, required=("layers",))


def _layer_key(key: str) -> int | str:
    return key if key == "all" else int(key)


def _layer_list(text: str) -> list[int | str]:
    if text == "all":
        return ["all"]
    layers: list[int | str] = []
    for part in re.split(r"[,+]", text.replace(" ", "")):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(part)
        start, end = int(match.group(1)), int(match.group(2) or match.group(1))
        if end < start or end >= MAX_LAYERS:  # also keeps "0-999999999" from building a billion-entry list
            raise AgentOptError(f"sparse attention range '{part}' must be A-B with A <= B < {MAX_LAYERS}")
        layers.extend(range(start, end + 1))
    return layers


def _layer_index(node: torch.fx.Node) -> int | None:
    match = re.match(r"layers\.(\d+)\.", region_of(node) + ".")
    return int(match.group(1)) if match else None


class InsertSparseAttention(GraphPass):
    name = "insert_sparse_attention"

    def __init__(self, plan: SparseAttentionPlan | None = None):
        self.plan = plan

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if not self.plan or not self.plan.layers:
            return PassResult(False, {}, ("no sparse attention plan given",))
        attention = {_layer_index(n): n for n in gm.graph.nodes
                     if n.target == torch.ops.agentopt.cached_attention.default}
        wanted = self.plan.resolve(len([k for k in attention if k is not None]))
        missing = sorted(set(wanted) - set(attention))
        if not attention:
            raise AgentOptError("a sparse attention plan needs the fused attention of fuse_kv_cache, and the graph "
                                "has none: do not skip fuse_kv_cache with a sparse plan")
        if missing:
            raise AgentOptError(f"sparse attention plan names layer(s) {missing} that have no fused attention; "
                                "fuse_kv_cache must run first (do not skip it with a sparse plan)")
        stats: dict[str, int] = {}
        notes, unmet = [], []
        for layer, pattern in sorted(wanted.items()):
            node = attention[layer]
            args = CachedAttentionArgs.of(node)
            if args.window > 0:  # the model's own sliding window: a pattern may only narrow what the layer sees
                if pattern.window >= args.window:  # the pattern's keys include the window's: the window decides
                    unmet.append(f"layer {layer}: {pattern.describe()} (the layer keeps its own window of "
                                 f"{args.window}, and the pattern sees no fewer keys)")
                    notes.append(unmet[-1])
                    continue
                if pattern.sinks or pattern.stride or pattern.kv_heads:
                    raise AgentOptError(
                        f"sparse attention plan gives layer {layer} {pattern.describe()}, but that layer attends to "
                        f"a sliding window of {args.window} already: sinks, strides or per-head patterns would show "
                        f"it keys it never saw; give it a plain window below {args.window} or leave it out")
            args.window, args.sinks, args.stride = pattern.window, pattern.sinks, pattern.stride
            kv_num_heads = args.kv_num_heads
            if any(h >= kv_num_heads for h in pattern.kv_heads):
                raise AgentOptError(f"sparse attention plan gives layer {layer} kv_heads {list(pattern.kv_heads)}, "
                                    f"but it has KV heads 0-{kv_num_heads - 1}")
            dense = [h for h in range(kv_num_heads) if h not in pattern.kv_heads] if pattern.kv_heads else []
            args.dense_kv_heads = dense or None
            slots = pattern.ring_slots(_buffer(gm, args.k_cache).shape[2])
            if slots:  # bounded memory: shrink both caches to a ring
                for cache in (args.k_cache, args.v_cache):
                    owner, leaf = owner_of(gm, cache.target)
                    full = getattr(owner, leaf)
                    setattr(owner, leaf, full.new_zeros(full.shape[0], full.shape[1], slots, full.shape[3]))
                stats["ring_caches"] = stats.get("ring_caches", 0) + 1
            args.ring = bool(slots)
            args.write_to(node)
            stats[pattern.describe()] = stats.get(pattern.describe(), 0) + 1
            notes.append(f"layer {layer}: {pattern.describe()}")
        return PassResult(bool(stats), stats, tuple(notes), tuple(unmet))


def _buffer(gm: torch.nn.Module, node: torch.fx.Node) -> torch.Tensor:
    owner, leaf = owner_of(gm, node.target)
    return getattr(owner, leaf)
