"""Real TensorRT builds and runs: only on a machine with TensorRT and a CUDA GPU (skipped elsewhere, with the reason).
scripts/gpu_check.sh runs these plus the end-to-end token comparison."""

import importlib.util

import numpy as np
import pytest

from tests.conftest import eager_greedy


def _gpu_skip_reason() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install 'agentopt-compiler[tensorrt]' on an NVIDIA GPU machine)"
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_skip_reason() is not None,
                                                  reason=_gpu_skip_reason() or "")]
CONTEXT = 64


@pytest.fixture(scope="module")
def trt_engine(tmp_path_factory):
    import agentopt_compiler as ao

    return ao.compile("tiny-random", out=tmp_path_factory.mktemp("gpu") / "trt", backend="tensorrt", device="cuda",
                      attention_impl="standard", context_length=CONTEXT)


def test_built_engine_records_this_gpu(trt_engine):
    from agentopt_compiler.backends.tensorrt.target import describe_target

    assert trt_engine.manifest["engine"]["tensorrt"]["target"] == describe_target()
    assert (trt_engine.folder / "model.plan").stat().st_size > 0


def test_greedy_tokens_match_eager(trt_engine, tiny_model):
    prompt = [5, 17, 99, 3, 250, 8]
    got = trt_engine.generate_ids(prompt, max_new_tokens=12, ignore_eos=True)
    assert got == eager_greedy(tiny_model, prompt, 12, CONTEXT)


def test_logits_match_onnxruntime_cpu(trt_engine):
    from agentopt_compiler.backends.onnxruntime.session import OrtSession

    engine = trt_engine.manifest["engine"]
    reference = OrtSession(trt_engine.folder, {**engine, "cache_update": "copy"}, device="cpu")
    session = trt_engine.session
    session.reset()
    ids = np.random.default_rng(0).integers(0, 300, size=(1, 10))
    for a, b in [(0, 7), (7, 8), (8, 9), (9, 10)]:
        positions = np.arange(a, b)
        np.testing.assert_allclose(session.run(ids[:, a:b], positions), reference.run(ids[:, a:b], positions),
                                   atol=1e-3, rtol=1e-3)


def test_cache_rows_round_trip(trt_engine):
    session = trt_engine.session
    session.reset()
    session.run(np.array([[1, 2, 3, 4]]), np.arange(4))
    rows = session.read_cache(4)
    first = session.run(np.array([[9]]), np.array([4]))
    session.reset()
    session.write_cache(rows)
    np.testing.assert_allclose(session.run(np.array([[9]]), np.array([4])), first, atol=1e-5)


def test_plan_from_another_target_is_refused(trt_engine, tmp_path):
    import json
    import shutil

    from agentopt_compiler.errors import EngineError
    from agentopt_compiler.runtime.engine import load_engine
    from agentopt_compiler.runtime.manifest import sealed

    folder = tmp_path / "moved"
    shutil.copytree(trt_engine.folder, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engine"]["tensorrt"]["target"]["compute_capability"] = "1.0"
    (folder / "manifest.json").write_text(json.dumps(sealed(manifest)))  # as if built on another GPU
    with pytest.raises(EngineError, match=f"agentopt rebuild {folder}"):
        load_engine(folder, verify_hashes=False)
