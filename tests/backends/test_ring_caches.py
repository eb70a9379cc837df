"""What the runtime may write past a row's end, read from an engine manifest's attention layers and cache shapes."""

from agentopt_compiler.backends.ring_caches import ring_spare_slots


def _engine(layers, slots):
    caches = [{"input": f"past.{i}.{kind}", "shape": [1, 2, n, 8]} for i, n in enumerate(slots)
              for kind in ("key", "value")]
    return {"attention": {"layers": layers}, "caches": caches}


def test_spare_slots_are_the_fewest_of_any_ring_layer():
    dense = {"op": "GroupQueryAttention", "window": -1, "sinks": 0, "ring": False}
    ring = {"op": "Attention", "window": 6, "sinks": 2, "ring": True}
    assert ring_spare_slots(_engine([dense, dense], [64, 64])) is None  # no ring: nothing to protect
    assert ring_spare_slots(_engine([dense, ring], [64, 16])) == 8
    assert ring_spare_slots(_engine([ring, {**ring, "window": 10}], [16, 16])) == 4
    assert ring_spare_slots(_engine([ring], [8])) == 0  # compiled before rings had spare slots
