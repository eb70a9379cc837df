"""What an engine's ring caches (bounded sparse-attention layers) allow, read from its manifest (deploy side)."""

from __future__ import annotations

import re
from typing import Iterator


def cache_layers(engine: dict) -> Iterator[tuple[dict, dict]]:
    """(cache spec, its layer's attention record) for each cache tensor of an engine section; {} for a cache whose
    layer the manifest does not describe. The manifest names each cache's layer (``layer``) and each attention
    record's; engines compiled before that pair them by the name past.<layer>.key and the records' order."""
    layers = engine.get("attention", {}).get("layers", [])
    by_layer = {record["layer"]: record for record in layers if "layer" in record}
    for cache in engine.get("caches", []):
        if "layer" in cache:
            yield cache, by_layer.get(cache["layer"], {})
            continue
        match = re.search(r"\.(\d+)\.", cache["input"])
        yield cache, layers[int(match.group(1))] if match and int(match.group(1)) < len(layers) else {}


def ring_spare_slots(engine: dict) -> int | None:
    """None when no layer has a ring cache. Else the fewest spare slots of any ring layer (its ring slots beyond
    sinks + window): how many tokens past a row's end the runtime may write and then step back over, as drafts the
    model rejects or a batch's right padding do. 0 for engines compiled before rings had spare slots."""
    spares = [cache["shape"][2] - layer.get("sinks", 0) - layer["window"]
              for cache, layer in cache_layers(engine) if layer.get("ring")]
    return min(spares) if spares else None
