"""Fixtures for the TensorRT backend without a GPU: a tensorrt engine folder whose ``model.plan`` comes from a fake
builder (everything up to the TensorRT API call is real: lowering, ONNX checks, plan, manifest, atomic rename)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.backends.tensorrt.trt_fakes import fake_build
from tests.conftest import TINY_CONTEXT

@pytest.fixture(scope="session")
def trt_engine_dir(tmp_path_factory):
    """``compile(backend="tensorrt")`` of tiny-random with the fake builder; load_engine is skipped (no GPU)."""
    import agentopt_compiler as ao
    from agentopt_compiler.backends.tensorrt import lower
    from agentopt_compiler.runtime import engine as engine_module

    out = tmp_path_factory.mktemp("engines") / "tiny-trt"
    patch = pytest.MonkeyPatch()
    patch.setattr(lower, "build_plan_file", fake_build)
    # (the compile also runs the engine it loaded once: this stand-in generates nothing)
    patch.setattr(engine_module, "load_engine", lambda *args, **kwargs: SimpleNamespace(
        generate_ids=lambda *args, **kwargs: []))
    try:
        ao.compile("tiny-random", out=out, backend="tensorrt", device="cuda", attention_impl="standard",
                   context_length=TINY_CONTEXT)
    finally:
        patch.undo()
    return out
