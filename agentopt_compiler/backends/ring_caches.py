"""What an engine's ring caches (bounded sparse-attention layers) allow, read from its manifest (deploy side)."""

from __future__ import annotations

import re
from typing import Iterator


def cache_layers(engine: dict) -> Iterator[tuple[dict, dict]]:
    """(cache spec, its layer's attention record) for each cache tensor of an engine section; {} for a cache whose
    layer the manifest does not describe. Cache inputs are named past.<layer>.key / past.<layer>.value."""
    layers = engine.get("attention", {}).get("layers", [])
    for cache in engine.get("caches", []):
        match = re.search(r"\.(\d+)\.", cache["input"])
        yield cache, layers[int(match.group(1))] if match and int(match.group(1)) < len(layers) else {}


def ring_spare_slots(engine: dict) -> int | None:
    """None when no layer has a ring cache. Else the fewest spare slots of any ring layer (its ring slots beyond
    sinks + window): how many tokens past a row's end the runtime may write and then step back over, as drafts the
    model rejects or a batch's right padding do. 0 for engines compiled before rings had spare slots."""
    spares = [cache["shape"][2] - layer.get("sinks", 0) - layer["window"]
              for cache, layer in cache_layers(engine) if layer.get("ring")]
    return min(spares) if spares else None
