import pytest
import torch

from agentopt_compiler.errors import UnsupportedModelError
from agentopt_compiler.models.config import ModelConfig
from agentopt_compiler.models.registry import BUILTIN_MODELS, build_model


def test_cached_chunks_equal_full_causal_forward(tiny_model):
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny_model(ids)  # no cache: causal over the 12 tokens
        tiny_model.setup_cache(1, 32)
        chunks = [tiny_model(ids[:, a:b], torch.arange(a, b)) for a, b in [(0, 5), (5, 6), (6, 10), (10, 12)]]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_sliding_window_limits_what_a_query_sees():
    config = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                         num_kv_heads=1, max_position_embeddings=64)
    windowed = ModelConfig(**{**config.to_dict(), "eos_token_ids": (), "sliding_window": 4})
    dense_model, window_model = build_model(config, seed=1), build_model(windowed, seed=1)
    ids = torch.randint(0, 50, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense, window = dense_model(ids), window_model(ids)
        # changing a token 5+ positions back changes the dense output but not the windowed one
        edited = ids.clone()
        edited[0, 2] = (edited[0, 2] + 1) % 50
        assert not torch.allclose(window[0, 4:6], window_model(edited)[0, 4:6])  # pos 2 is inside their window
        assert torch.allclose(window[0, -1], window_model(edited)[0, -1], atol=1e-6)
        assert not torch.allclose(dense[0, -1], dense_model(edited)[0, -1], atol=1e-4)
    assert torch.allclose(dense[0, :4], window[0, :4], atol=1e-6)  # positions < window see the same keys


def test_builtin_ref_60m_matches_the_issue_spec():
    config = BUILTIN_MODELS["ref-60m"].config
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.vocab_size) == (
        512, 8, 8, 2, 32000)
    assert 50e6 < config.num_params < 60e6


def test_random_weights_are_seeded():
    config = BUILTIN_MODELS["tiny-random"].config
    a, b = build_model(config, seed=3), build_model(config, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_configs_are_refused_with_the_reason():
    with pytest.raises(UnsupportedModelError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=6, num_kv_heads=4)
    with pytest.raises(UnsupportedModelError, match="supported: default, linear, llama3"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
