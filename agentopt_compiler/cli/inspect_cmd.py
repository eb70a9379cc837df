"""agentopt inspect: what an engine folder holds (manifest, passes, op histogram, sizes)."""

from __future__ import annotations

import collections
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="describe an engine folder",
                       description="Print an engine's model, backend, passes, op histogram and files.")
    p.add_argument("engine", help="engine folder")
    p.add_argument("--json", action="store_true", help="print the manifest and op histogram as JSON")
    p.set_defaults(handler=run)


def op_histogram(graph_path: Path) -> Counter | None:
    """Node counts by (domain::)op type, or None where the onnx package is not installed (deploy-only installs)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(graph_path), load_external_data=False)
    return Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in model.graph.node)


def kv_bytes_per_token(caches: list[dict]) -> tuple[int, list[str]]:
    """Bytes one more cached token takes in one row, over all cache tensors (B, Hkv, T, D): Hkv * D * itemsize each;
    and the caches' dtypes."""
    dtypes = sorted({c.get("dtype", "float32") for c in caches})
    return sum(c["shape"][1] * c["shape"][3] * np.dtype(c.get("dtype", "float32")).itemsize for c in caches), dtypes


def run(args) -> int:
    from ..runtime.manifest import describe_attention_layers, read_manifest

    folder = Path(args.engine)
    manifest = read_manifest(folder)
    engine = manifest["engine"]
    histogram = op_histogram(folder / engine["graph"])
    if args.json:
        print(json.dumps({"manifest": manifest, "op_histogram": dict(histogram or {})}, indent=2))
        return 0
    model, config = manifest["model"], manifest["model"]["config"]
    print(f"engine   {folder}  (format {manifest['format_version']}, created {manifest.get('created', '?')})")
    print(f"model    {model['name']}  [{config['family']}, {config['num_layers']} layers, hidden "
          f"{config['hidden_size']}, {config['num_heads']}/{config['num_kv_heads']} heads, vocab "
          f"{config['vocab_size']}]  from {model['source']}")
    print(f"backend  {engine['backend']} on {engine['device']}, {engine['dtype']}, context {engine['context_length']}"
          f" tokens, batch {engine['batch_size']}, opset {engine.get('opset', '?')}")
    print(f"inputs   {', '.join(engine['inputs'][:4])}{' ...' if len(engine['inputs']) > 4 else ''}"
          f"  ({len(engine['caches'])} cache tensors)")
    attention = engine.get("attention", {})
    if attention.get("layers"):
        print(f"attention {describe_attention_layers(attention['layers'])}")
    plan = manifest.get("precision_plan")
    if plan:  # weights the plan quantized: the backend line's dtype is the activations'
        counts = collections.Counter(plan.get("units", {}).values())
        measured = plan.get("measured") or {}
        print(f"weights  precision plan: {', '.join(f'{n} x {p}' for p, n in sorted(counts.items()))} unit(s), "
              f"budget {json.dumps(plan.get('budget', {}))}"
              + (f"; measured KL {measured['kl']:.3g}, top-1 {measured['top1']:.3f}"
                 if "kl" in measured and "top1" in measured else ""))
    kv_bytes = sum(math.prod(c["shape"]) * np.dtype(c.get("dtype", "float32")).itemsize for c in engine["caches"])
    slots = sorted({c["shape"][2] for c in engine["caches"]})
    limit = f"; calls of up to {attention['ring_call_tokens']} tokens (longer ones are split)" \
        if attention.get("ring_call_tokens") else ""
    print(f"kv cache {kv_bytes / 2**20:.2f} MiB, {'/'.join(map(str, slots))} slots per cache tensor{limit}")
    per_token, dtypes = kv_bytes_per_token(engine["caches"])
    print(f"kv/token {per_token} bytes per token per row ({'+'.join(dtypes)} caches"
          + (", plus fixed per-channel scales" if "int8" in dtypes else "")
          + (": ring layers stop growing at their ring" if attention.get("ring_call_tokens") else "") + ")")
    print("passes")
    for record in manifest.get("passes", []):
        stats = "skipped" if record["skipped"] else (
            ", ".join(f"{k}={v}" for k, v in record["stats"].items()) or "no change")
        print(f"  {record['name']:24s} {stats}")
        for request in record.get("unmet", []):
            print(f"    not applied: {request}")
    print("ops" if histogram is not None else "ops      (install onnx to see the op histogram)")
    for op, count in sorted((histogram or {}).items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:6d}  {op}")
    print("files")
    for name, info in manifest["files"].items():
        print(f"  {name:28s} {info['bytes'] / 1024:10.1f} KiB  sha256 {info['sha256'][:12]}")
    versions = ", ".join(f"{k} {v}" for k, v in manifest.get("dependencies", {}).items())
    print(f"built with {versions}")
    return 0
