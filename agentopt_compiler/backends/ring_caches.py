"""What an engine's ring caches (bounded sparse-attention layers) allow, read from its manifest (deploy side)."""

from __future__ import annotations

import re


def ring_spare_slots(engine: dict) -> int | None:
    """None when no layer has a ring cache. Else the fewest spare slots of any ring layer (its ring slots beyond
    sinks + window): how many tokens past a row's end the runtime may write and then step back over, as drafts the
    model rejects or a batch's right padding do. 0 for engines compiled before rings had spare slots."""
    layers = engine.get("attention", {}).get("layers", [])
    spare = None
    for cache in engine.get("caches", []):
        match = re.search(r"\.(\d+)\.", cache["input"])  # past.<layer>.key
        layer = layers[int(match.group(1))] if match and int(match.group(1)) < len(layers) else {}
        if layer.get("ring"):
            slots = cache["shape"][2] - layer.get("sinks", 0) - layer["window"]
            spare = slots if spare is None else min(spare, slots)
    return spare
