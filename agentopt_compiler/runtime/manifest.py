"""The engine folder's ``manifest.json``: what the engine is, how it was made, and a hash of every file.

Written last by the compiler (inside a temporary folder that is renamed into place), read first by ``load_engine``,
which refuses a folder that is not an engine, was made by a newer format, or whose files do not match their hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import EngineError

MANIFEST = "manifest.json"
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
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **body, "files": describe_files(folder)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: Path, verify_hashes: bool = True) -> dict[str, Any]:
    folder = Path(folder)
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
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise EngineError(f"'{folder}' uses engine format {version}, newer than this agentopt reads "
                          f"({FORMAT_VERSION}); upgrade agentopt-compiler")
    for key in ("engine", "model", "files"):
        if key not in manifest:
            raise EngineError(f"'{path}' lacks the '{key}' section; recompile the engine")
    for name, info in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise EngineError(f"engine '{folder}' is incomplete: {name} is missing; recompile the engine")
        if file.stat().st_size != info["bytes"] or (verify_hashes and sha256_of(file) != info["sha256"]):
            raise EngineError(f"engine '{folder}' is corrupt: {name} does not match its sha256 in {MANIFEST}; "
                              "recompile the engine")
    return manifest


def describe_attention_layers(layers: list[dict]) -> str:
    """'8 × Attention (window 1024, sinks 4, ring)': the manifest's attention layers, identical ones counted
    together, in order."""
    groups: list[list] = []
    for layer in layers:
        window = layer.get("window", -1)
        desc = (f"{layer.get('op', '?')} (window {window if window and window > 0 else 'none'}, "
                f"sinks {layer.get('sinks', 0)}, {'ring' if layer.get('ring') else 'full cache'})")
        if groups and groups[-1][1] == desc:
            groups[-1][0] += 1
        else:
            groups.append([1, desc])
    return "; ".join(f"{n} × {desc}" for n, desc in groups) or "–"
