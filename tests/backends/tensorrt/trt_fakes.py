"""Stand-ins for the TensorRT build where TensorRT cannot run (shared by the tests of this folder)."""

from __future__ import annotations

FAKE_TARGET = {"tensorrt": "10.14.1", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def fake_build(onnx_path, plan, out_file):
    """Stands in for builder.build_plan_file where TensorRT cannot run: records what it was asked to build."""
    out_file.write_bytes(b"not a real TensorRT plan: built by the test suite's fake builder\n")
    return {"target": dict(FAKE_TARGET), "fp32_layers_pinned": 0, "layers": 0}
