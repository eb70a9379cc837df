"""The engine folder's ``manifest.json``: what the engine is, how it was made, and a hash of every file.

Written last by the compiler (inside a temporary folder that is renamed into place), read first by ``load_engine``,
which refuses a folder that is not an engine, was made by a newer format, has a manifest of the wrong shape (checked
against ``MANIFEST_SCHEMA``, so code that reads a manifest meets only the types it expects) or one edited after it
was written (its own sha256, ``manifest_sha256``), holds a file the manifest does not list, or whose files do not
match their sizes and hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import EngineError
from ..validation import Spec, anything_object, boolean, check, integer, list_of, map_of, optional, record, string

MANIFEST = "manifest.json"
SELF_HASH = "manifest_sha256"
FORMAT = "agentopt-engine"
FORMAT_VERSION = 1


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in the folder except the manifest itself."""
    return {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}


def write_manifest(folder: Path, body: dict[str, Any]) -> dict[str, Any]:
    manifest = sealed({"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": describe_files(folder)})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def sealed(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its own sha256 (``manifest_sha256``, over everything else in it): the files' hashes cover
    the files, this covers the description of them, so an edited manifest (cache names swapped, a window changed)
    is refused at load instead of running a graph it no longer describes."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != SELF_HASH}))  # as read back
    return {**body, SELF_HASH: _digest(body)}


def _digest(body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_manifest(folder: Path, verify_hashes: bool = True) -> dict[str, Any]:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise EngineError(f"'{folder}' is a file; give the engine folder (the one holding {MANIFEST})")
    if not folder.is_dir():
        raise EngineError(f"engine folder '{folder}' does not exist; create one with: agentopt compile --out {folder}")
    path = folder / MANIFEST
    if not path.is_file():
        raise EngineError(f"'{folder}' is not an engine folder (no {MANIFEST}); create one with agentopt compile")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineError(f"'{path}' is corrupt ({exc}); recompile the engine") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineError(f"'{folder}' holds a manifest.json that is not an agentopt engine's")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise EngineError(f"'{path}' has no valid format_version (got {version!r}); recompile the engine")
    if version > FORMAT_VERSION:
        raise EngineError(f"'{folder}' uses engine format {version}, newer than this agentopt reads "
                          f"({FORMAT_VERSION}); upgrade agentopt-compiler")
    manifest = check(manifest, MANIFEST_SCHEMA, source=str(path), error=EngineError,
                     fix="recompile the engine (agentopt compile)")
    recorded = manifest.get(SELF_HASH)  # (absent from engines written before it was: their manifests are taken as is)
    if recorded is not None and recorded != _digest({k: v for k, v in manifest.items() if k != SELF_HASH}):
        raise EngineError(f"'{path}' was edited after the engine was written (its {SELF_HASH} does not match its "
                          "content), so it may no longer describe the engine's graph; restore it, or recompile the "
                          "engine")
    _check_config(manifest["model"]["config"], path)
    files = manifest["files"]
    for key in ("graph", "plan_file"):
        name = manifest["engine"].get(key)
        if name is not None and name not in files:
            raise EngineError(f"'{path}': engine.{key} names {name!r}, which the manifest's files do not list; "
                              "recompile the engine")
    unlisted = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST and p.name not in files)
    if unlisted:
        raise EngineError(f"engine '{folder}' holds {unlisted[0]!r}, which {MANIFEST} does not list (so nothing "
                          "vouches for it); remove it from the folder, or recompile the engine")
    for name, info in files.items():
        file = folder / name
        if not file.is_file():
            raise EngineError(f"engine '{folder}' is incomplete: {name} is missing; recompile the engine")
        if file.stat().st_size != info["bytes"] or (verify_hashes and sha256_of(file) != info["sha256"]):
            raise EngineError(f"engine '{folder}' is corrupt: {name} does not match its sha256 in {MANIFEST}; "
                              "recompile the engine")
    return manifest


def _check_config(config: dict, path: Path) -> None:
    """The model config must be one ModelConfig accepts (the runtime reads its token ids; inspect shows it)."""
    from ..errors import AgentOptError
    from ..models.config import ModelConfig

    try:
        ModelConfig.from_dict(config)
    except AgentOptError as exc:
        raise EngineError(f"'{path}': model.config is not valid ({exc}); recompile the engine") from None


def describe_attention_layers(layers: list[dict]) -> str:
    """'8 × Attention (window 1024, sinks 4, ring)': the manifest's attention layers, identical ones counted
    together, in order."""
    groups: list[list] = []
    for layer in layers:
        window = layer.get("window", -1)
        extra = f", stride {layer['stride']}" if layer.get("stride") else ""
        extra += f", dense KV heads {layer['dense_kv_heads']}" if layer.get("dense_kv_heads") else ""
        desc = (f"{layer.get('op', '?')} (window {window if window and window > 0 else 'none'}, "
                f"sinks {layer.get('sinks', 0)}{extra}, {'ring' if layer.get('ring') else 'full cache'})")
        if groups and groups[-1][1] == desc:
            groups[-1][0] += 1
        else:
            groups.append([1, desc])
    return "; ".join(f"{n} × {desc}" for n, desc in groups) or "–"


def _file_name_problem(name: str) -> str | None:
    """Listed files are plain names inside the folder: no paths (a manifest must not point outside its engine)."""
    if not name or name in (".", "..", MANIFEST) or "/" in name or "\\" in name or "\0" in name:
        return "is not the name of a file in the engine folder"
    return None


class _Sha256(Spec):
    description = "a sha256 hex digest (64 characters 0-9a-f)"

    def validate(self, value, path):
        if not isinstance(value, str) or len(value) != 64 or not all(c in "0123456789abcdef" for c in value):
            raise self.fail(value, path)
        return value


class _NumpyDtype(Spec):
    description = "a numpy dtype name such as float32"

    def validate(self, value, path):
        import numpy as np

        if not isinstance(value, str):
            raise self.fail(value, path)
        try:
            np.dtype(value)
        except TypeError:
            raise self.fail(value, path) from None
        return value


_NAMES = list_of(string())
_CONFIG_SHOWN = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")  # by inspect
# Every key the runtime, the backends' sessions and ``agentopt inspect`` read, with its type. Sections keep keys they
# do not list (a newer compiler may add some within the same format version).
MANIFEST_SCHEMA = record({
    "format": string(), "format_version": integer(),
    "created": string(), "rebuilt": string(),
    "toolkit": anything_object(), "dependencies": map_of(string()),
    "model": record({"name": string(), "source": string(), "config": record(
        {k: string() if k == "family" else integer(minimum=1) for k in _CONFIG_SHOWN}, required=_CONFIG_SHOWN,
        extra="keep")}, required=("name", "source", "config"), extra="keep"),
    "engine": record({
        "backend": string(), "device": string(), "dtype": _NumpyDtype(),
        "context_length": integer(minimum=1), "batch_size": integer(minimum=1),
        "graph": string(), "plan_file": string(), "opset": integer(minimum=1),
        "inputs": _NAMES, "outputs": _NAMES, "logits": string(), "multi_logits": boolean(),
        "cache_update": string(choices=("in_place", "copy", "double_buffer")),
        "lowering_rules": map_of(integer(minimum=0)), "tensorrt": anything_object(),
        "rows": string(choices=("dynamic", "static")),
        "caches": list_of(record({"input": string(), "output": string(), "buffer": string(),
                                  "shape": list_of(integer(minimum=0), length=4), "dtype": _NumpyDtype(),
                                  "layer": integer(minimum=0), "ring": boolean()},
                                 required=("input", "output", "shape"), extra="keep")),
        "attention": record({
            "fused_layers": integer(minimum=0), "impl": string(), "ring_call_tokens": integer(minimum=1),
            "layers": list_of(record({"op": string(), "window": integer(), "sinks": integer(minimum=0),
                                      "stride": integer(minimum=0), "ring": boolean(),
                                      "dense_kv_heads": optional(list_of(integer(minimum=0)))}, extra="keep")),
        }, extra="keep"),
    }, required=("backend", "device", "dtype", "context_length", "batch_size", "graph", "inputs", "logits", "caches"),
        extra="keep"),
    "passes": list_of(record({"name": string(), "skipped": boolean(), "stats": anything_object(),
                              "unmet": _NAMES},
                             required=("name", "skipped", "stats"), extra="keep")),
    "sparse_attention": optional(anything_object()), "precision_plan": optional(anything_object()),
    "tokenizer": record({"files": _NAMES}, extra="keep"),
    "files": map_of(record({"sha256": _Sha256(), "bytes": integer(minimum=0)}, required=("sha256", "bytes")),
                    key=_file_name_problem, min_length=1),
    SELF_HASH: _Sha256(),
}, required=("engine", "model", "files"), extra="keep")
