"""Lower a captured program to an ONNX model for ONNX Runtime.

    ExportedProgram --torch.onnx (dynamo, opset 23)--> ONNX IR --lift_cache_mutations--> optimize
        --> ORT lowering rules (skip_rms_norm.py, packed_qkv.py; contrib ops, so not with attention_impl="standard")
        --> constant_slices.py, shared_subexpressions.py --> dynamic_rows.py (checked by running it) --> model.onnx

torch.onnx keeps only user outputs: the in-place cache writes (BUFFER_MUTATION outputs of the functionalized graph)
are silently dropped and the caches frozen into constant initializers, so decode would read an all-zero past.
``lift_cache_mutations`` turns each mutated buffer into a graph input ``past.<layer>.<key|value>`` and its new value
into a graph output ``present.<layer>.<key|value>``, and fails loudly if any mutation is left behind.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path

import torch

from ...errors import AgentOptError, UnsupportedOpError
from ..ring_caches import ring_spare_slots
from .constant_slices import fold_constant_slices
from .dynamic_rows import copy_rows_in_reshapes, make_rows_static, make_rows_symbolic, rows_are_independent
from .packed_qkv import feed_packed_qkv
from .shared_subexpressions import share_common_subexpressions
from .skip_rms_norm import fuse_skip_rms_norm

OPSET = 23
GRAPH_FILE = "model.onnx"
EXTERNAL_DATA_THRESHOLD = 100 * 1024 * 1024  # bytes of weights above which they go to model.onnx.data
_MUTATION_KIND = "pkg.torch.export.graph_signature.OutputSpec.kind"
_CACHE_BUFFER = re.compile(r"layers\.(\d+)\..*kv_cache\.(key|value)$")


def cache_io_names(buffer: str) -> tuple[str, str]:
    """'layers.3.self_attn.kv_cache.key' -> ('past.3.key', 'present.3.key')."""
    match = _CACHE_BUFFER.search(buffer)
    suffix = f"{match.group(1)}.{match.group(2)}" if match else buffer
    return f"past.{suffix}", f"present.{suffix}"


def export_onnx(program, custom_translation_table=None):
    """torch.onnx export of ``program.exported``; unsupported ops become an UnsupportedOpError naming op and layer."""
    try:
        # torch.onnx prints progress lines and logs warnings about unrelated optional packages (torchvision)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet("torch.onnx"):
            warnings.simplefilter("ignore")
            with _keep_unread_values():
                return torch.onnx.export(program.exported, dynamo=True, optimize=False, opset_version=OPSET,
                                         verbose=False, custom_translation_table=custom_translation_table)
    except Exception as exc:
        raise _explain_export_failure(exc, program.exported) from exc


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _keep_unread_values():
    """Inside torch.onnx.export, the opset conversion ends with a remove-unused-nodes pass. A cache update that no
    other node reads (a ring cache's new contents are computed only to be stored) is then deleted before we can lift
    it to a ``present.*`` output, and the engine would silently stop updating that cache. For the duration of the
    export, the conversion keeps its other clean-ups but not that one; ``optimize()`` removes truly dead nodes after
    the caches are outputs. (Checked by the ring-cache lowering tests: they fail if a cache update is lost.)"""
    import onnx_ir
    from onnx_ir.passes import common
    from onnxscript import version_converter

    original = version_converter.ConvertVersionPass.__init__

    def without_node_removal(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._cleanup_passes = onnx_ir.passes.Sequential(common.RemoveUnusedFunctionsPass(),
                                                         common.RemoveUnusedOpsetsPass())

    version_converter.ConvertVersionPass.__init__ = without_node_removal
    try:
        yield
    finally:
        version_converter.ConvertVersionPass.__init__ = original


def _explain_export_failure(exc: Exception, exported) -> AgentOptError:
    chain = list(_exception_chain(exc))
    text = "\n".join(str(e) for e in chain)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>", text)
    node_name = re.search(r"Error when translating node %(\w+)", text)
    layer = _layer_of(exported, node_name.group(1)) if node_name else "unknown"
    if op:
        return UnsupportedOpError(
            f"op {op.group(1)}.{op.group(2)} (in layer '{layer}') has no ONNX lowering; replace it in the model "
            f"with supported ops or add a translation to the backend's custom_translation_table"
        )
    root = str(chain[-1]).strip().splitlines()
    reason = f"{type(chain[-1]).__name__}: {root[0] if root else ''}"
    where = f" of node {node_name.group(1)} in layer '{layer}'" if node_name else ""
    return AgentOptError(f"ONNX export{where} failed ({reason})")


def _exception_chain(exc: BaseException):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _layer_of(exported, node_name: str) -> str:
    for node in exported.graph.nodes:
        if node.name == node_name:
            stack = node.meta.get("nn_module_stack") or {}
            paths = [path for path, _ in stack.values() if path]
            return paths[-1] if paths else "the model's top level"
    return "unknown"


def lift_cache_mutations(onnx_program) -> list[dict]:
    """Make every mutated buffer a past input / present output pair. Returns the cache specs for the manifest."""
    graph = onnx_program.model.graph
    mutations = onnx_program.exported_program.graph_signature.buffers_to_mutate  # output value name -> buffer
    tagged = {}
    for node in graph:
        for value in node.outputs:
            if value.metadata_props.get(_MUTATION_KIND) == "BUFFER_MUTATION":
                tagged[value.name] = value
    caches = []
    for value_name, buffer in mutations.items():
        if value_name not in tagged or buffer not in graph.initializers:
            raise AgentOptError(f"internal: cache mutation of '{buffer}' was not found in the ONNX graph; "
                                "the engine would silently drop its KV cache")
        past_name, present_name = cache_io_names(buffer)
        past = graph.initializers.pop(buffer)
        shape = [int(d) for d in past.shape]
        past.const_value = None
        past.name = past_name
        graph.inputs.append(past)
        present = tagged.pop(value_name)
        present.name = present_name
        graph.outputs.append(present)
        layer = _CACHE_BUFFER.search(buffer)
        caches.append({"input": past_name, "output": present_name, "buffer": buffer, "shape": shape,
                       "dtype": _NUMPY_DTYPES[past.dtype.name], **({"layer": int(layer.group(1))} if layer else {})})
    if tagged:
        raise AgentOptError(f"internal: mutations {sorted(tagged)} have no buffer in the graph signature")
    return sorted(caches, key=lambda c: _cache_sort_key(c["input"]))


def trim_unused_trailing_outputs(graph, op_types=("GroupQueryAttention", "Attention")) -> int:
    """Drop unused optional outputs at the end of these nodes: ORT rejects a GroupQueryAttention whose output_qk
    is present without qk_output configured, and Attention's optional outputs are never read."""
    trimmed = 0
    for node in graph:
        if node.op_type not in op_types:
            continue
        keep = len(node.outputs)
        while keep > 1 and not node.outputs[keep - 1].uses() and not node.outputs[keep - 1].is_graph_output():
            keep -= 1
        if keep < len(node.outputs):
            node.resize_outputs(keep)
            trimmed += 1
    return trimmed


def _pattern_of(node) -> dict:
    from ...capture.custom_ops import CachedAttentionArgs

    return CachedAttentionArgs.of(node).pattern()


def attach_layer_facts(caches: list[dict], layers: list[dict], fused_nodes, exported) -> None:
    """Each attention record gets its layer index, and each cache its layer's ring facts (ring, and for rings
    sinks and window), so the deploy side reads them from the manifest instead of parsing names."""
    from ...capture.custom_ops import CachedAttentionArgs

    buffers = exported.graph_signature.inputs_to_buffers  # placeholder name -> buffer FQN
    by_buffer = {cache["buffer"]: cache for cache in caches}
    for record, node in zip(layers, fused_nodes):
        args = CachedAttentionArgs.of(node)
        for cache_node in (args.k_cache, args.v_cache):
            cache = by_buffer.get(buffers.get(cache_node.name, cache_node.name))
            if cache is None or "layer" not in cache:
                continue
            record["layer"] = cache["layer"]
            cache["ring"] = record["ring"]
            if record["ring"]:
                cache.update(sinks=record["sinks"], window=record["window"])


def check_attention_patterns(graph, fused_nodes) -> list[dict]:
    """Prove each fused attention's sparsity pattern survived lowering, layer by layer, or fail the compile.

    GroupQueryAttention must carry ``local_window_size`` = the window; an ``Attention`` lowering must mask with
    more than causality (an ``And`` of the causal mask and the window terms) exactly when a window was asked for.
    Export paths in the field drop windows silently; this check makes that a compile error.
    """
    if not fused_nodes:  # unfused graphs: torch.onnx lowers the model's own mask; nothing of ours to check
        return []
    lowered = [n for n in graph if n.op_type in ("GroupQueryAttention", "Attention")]
    if len(lowered) != len(fused_nodes):
        raise AgentOptError(f"internal: {len(fused_nodes)} fused attention ops became {len(lowered)} attention nodes")
    layers = []
    for index, (node, fused) in enumerate(zip(lowered, fused_nodes)):
        pattern = _pattern_of(fused)
        if node.op_type == "GroupQueryAttention":
            attribute = node.attributes.get("local_window_size")
            kept = (attribute.value if attribute is not None else -1) == (pattern["window"] or -1)
        else:
            mask = node.inputs[3].producer() if len(node.inputs) > 3 and node.inputs[3] is not None else None
            kept = (mask is not None and mask.op_type == "And") == bool(pattern["window"])
        softcap = node.attributes.get("softcap")
        kept = kept and abs((softcap.value if softcap is not None else 0.0) - pattern.get("softcap", 0.0)) <= 1e-5 * (
            1.0 + pattern.get("softcap", 0.0))  # a float32 attribute
        if not kept:
            raise AgentOptError(f"attention layer {index}: the pattern {pattern} was lost in lowering to "
                                f"{node.op_type}; refusing to write an engine that silently attends densely")
        layers.append({"op": node.op_type, **pattern})
    return layers


# ONNX Runtime CUDA kernels that exist only for some element types. A node with no CUDA kernel for its types is
# placed on the CPU by ORT with a log line (and host copies every step): the silent fallback we refuse to ship.
_CUDA_KERNEL_TYPES = {
    # contrib_ops/cuda/bert/group_query_attention.cc registers T = MLFloat16 and BFloat16 only
    ("com.microsoft", "GroupQueryAttention"): ("FLOAT16", "BFLOAT16"),
}


def check_cuda_kernels(graph) -> None:
    """Fail the compile when a node of the graph has no ONNX Runtime CUDA kernel for its element type."""
    for node in graph:
        allowed = _CUDA_KERNEL_TYPES.get((node.domain, node.op_type))
        if allowed is None or node.inputs[0] is None or node.inputs[0].dtype is None:
            continue
        dtype = node.inputs[0].dtype.name
        if dtype not in allowed:
            raise AgentOptError(
                f"{node.op_type} ({node.name}) runs on ONNX Runtime CUDA only for {' / '.join(allowed)}, and this "
                f"engine's attention is {dtype}; ORT would move it to the CPU and copy the caches every step. "
                "Compile with --kv-cache-dtype fp16 (attention then runs in fp16), or use --attention-impl standard "
                "(the default for --device cuda)")


_NUMPY_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT8": "int8"}


def _ring_call_tokens(layers: list[dict], caches: list[dict]) -> dict:
    """{"ring_call_tokens": N} when layers have ring caches: ring layers store before they attend (attention.py), which
    is exact for calls of at most (spare slots + 1) tokens, so sessions split longer calls. {} otherwise."""
    spare = ring_spare_slots({"attention": {"layers": layers}, "caches": caches})
    return {} if spare is None else {"ring_call_tokens": spare + 1}


def _cache_sort_key(name: str):
    parts = name.split(".")
    return (int(parts[1]), parts[2]) if len(parts) == 3 and parts[1].isdigit() else (1 << 30, name)


ATTENTION_IMPLS = ("gqa", "standard")


def lower_to_onnx(program, folder: Path, attention_impl: str = "gqa", device: str = "cpu") -> dict:
    """Write ``folder/model.onnx`` (+ external data when large); return the IO description for the manifest.

    ``attention_impl`` picks the lowering of fused attention (see attention.py); graphs without it are unaffected.
    ``device`` is where the engine will run: the graph is checked against that execution provider's kernels.
    """
    from . import attention, quantized

    if attention_impl not in ATTENTION_IMPLS:
        raise AgentOptError(f"attention implementation '{attention_impl}' is not available for onnxruntime; "
                            f"choose one of: {', '.join(ATTENTION_IMPLS)}")
    fused_nodes = [n for n in program.exported.graph.nodes if str(n.target) == "agentopt.cached_attention.default"]
    fused = len(fused_nodes)
    table = {**attention.translation_table(attention_impl), **quantized.translation_table(attention_impl)}
    onnx_program = export_onnx(program, table)
    caches = lift_cache_mutations(onnx_program)
    graph = onnx_program.model.graph
    user_outputs = [v for v in graph.outputs if not v.name.startswith("present.")]
    if len(user_outputs) != 1:
        raise AgentOptError(f"internal: expected one logits output, found {[v.name for v in user_outputs]}")
    user_outputs[0].name = "logits"
    trim_unused_trailing_outputs(graph)
    # before the optimizer folds shape computations into constants: a folded batch size would tie the graph to it
    lowering_rules = {"rows_copied_in_reshapes": copy_rows_in_reshapes(onnx_program.model, program.batch_size)}
    make_rows_symbolic(onnx_program.model, program.batch_size)
    onnx_program.optimize()
    layer_impls = check_attention_patterns(onnx_program.model.graph, fused_nodes)
    attach_layer_facts(caches, layer_impls, fused_nodes, program.exported)
    if device == "cuda":
        check_cuda_kernels(onnx_program.model.graph)
    # ORT contrib-op rules, unless the engine must stay standard ONNX (what --attention-impl standard is for)
    if attention_impl == "gqa":
        lowering_rules["skip_rms_norm"] = fuse_skip_rms_norm(onnx_program.model)
        lowering_rules["packed_qkv"] = feed_packed_qkv(onnx_program.model)
    # tables the lowering slices or casts (RoPE for GroupQueryAttention) are stored already sliced
    lowering_rules["constant_slices"] = fold_constant_slices(onnx_program.model)
    lowering_rules["shared_subexpressions"] = share_common_subexpressions(onnx_program.model)
    weight_bytes = sum(p.numel() * p.element_size() for p in program.exported.state_dict.values())
    onnx_program.save(str(folder / GRAPH_FILE), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
    dynamic_rows = rows_are_independent(folder / GRAPH_FILE, caches, "logits")
    if not dynamic_rows:
        make_rows_static(folder / GRAPH_FILE, program.batch_size)
    lowering_rules["dynamic_rows"] = int(dynamic_rows)
    return {
        "graph": GRAPH_FILE,
        "opset": OPSET,
        "inputs": [v.name for v in graph.inputs],
        "outputs": [v.name for v in graph.outputs],
        "logits": "logits",
        "multi_logits": True,  # logits_index (B, L): several tokens' logits per call (prompt-lookup decoding)
        "caches": caches,
        "attention": {"fused_layers": fused, "impl": attention_impl if fused else "unfused", "layers": layer_impls,
                      **_ring_call_tokens(layer_impls, caches)},
        "lowering_rules": lowering_rules,
        # fused lowerings write new rows into the cache tensor they read, so past and present can share one buffer
        "cache_update": "in_place" if fused else "copy",
        # "dynamic": a call may run any number of cache rows (server slots: runtime/slots.py); "static": all of them
        "rows": "dynamic" if dynamic_rows else "static",
    }
