"""ORT in-place caches on a device (DeviceCaches): the OrtValue code path is exercised here with device 'cpu'
OrtValues; the real CUDA run is a gpu test, skipped without onnxruntime's CUDAExecutionProvider."""

import numpy as np
import onnxruntime as ort
import pytest

from agentopt_compiler.backends.onnxruntime.session import DeviceCaches, OrtSession
from agentopt_compiler.errors import ProviderUnavailableError

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


class OrtValueCacheSession(OrtSession):
    """The CUDA cache path (ortvalue_from_shape_and_type, update_inplace, numpy copies) on CPU OrtValues."""

    def __init__(self, folder, engine):
        super().__init__(folder, engine, device="cpu", threads=1)

    def _make_caches(self, device):
        return DeviceCaches(self.caches_spec, device)


def test_device_cache_path_matches_host_caches(tiny_engine):
    reference = tiny_engine.session
    assert reference.in_place
    session = OrtValueCacheSession(tiny_engine.folder, tiny_engine.manifest["engine"])
    addresses = session.cache_addresses()
    reference.reset()
    ids = np.random.default_rng(3).integers(0, 300, size=(1, 10))
    for a, b in [(0, 6), (6, 7), (7, 8)]:
        positions = np.arange(a, b)
        np.testing.assert_allclose(session.run(ids[:, a:b], positions), reference.run(ids[:, a:b], positions),
                                   atol=1e-5)
    assert session.cache_addresses() == addresses  # written in place, never reallocated
    rows = session.read_cache(8)
    expected = reference.read_cache(8)
    assert all(np.allclose(rows[name], expected[name], atol=1e-5) for name in rows)
    step = session.run(ids[:, 8:9], np.array([8]))
    session.reset()
    assert not any(session.read_cache(8)[name].any() for name in rows)
    session.write_cache(rows)  # the saved conversation comes back through OrtValue copies
    np.testing.assert_allclose(session.run(ids[:, 8:9], np.array([8])), step, atol=1e-6)


@pytest.mark.skipif(HAS_CUDA_EP, reason="onnxruntime's CUDAExecutionProvider is available here")
def test_in_place_engine_on_cuda_without_the_provider_fails_loudly(tiny_engine):
    with pytest.raises(ProviderUnavailableError, match="CUDAExecutionProvider"):
        OrtSession(tiny_engine.folder, tiny_engine.manifest["engine"], device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA_EP, reason="needs onnxruntime-gpu with CUDAExecutionProvider and a GPU")
def test_cuda_in_place_caches_match_cpu(tiny_engine):
    session = OrtSession(tiny_engine.folder, tiny_engine.manifest["engine"], device="cuda")
    reference = tiny_engine.session
    reference.reset()
    ids = np.random.default_rng(4).integers(0, 300, size=(1, 9))
    for a, b in [(0, 7), (7, 8), (8, 9)]:
        positions = np.arange(a, b)
        np.testing.assert_allclose(session.run(ids[:, a:b], positions), reference.run(ids[:, a:b], positions),
                                   atol=1e-3)
    rows = session.read_cache(9)
    session.reset()
    session.write_cache(rows)
    assert all(np.allclose(session.read_cache(9)[n], rows[n]) for n in rows)
