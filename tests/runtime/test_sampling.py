import numpy as np

from agentopt_compiler.runtime.sampling import distribution, filter_top_k, filter_top_p, greedy, sample

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0])


def test_greedy_and_zero_temperature_pick_the_argmax():
    rng = np.random.default_rng(0)
    assert greedy(LOGITS) == 1
    assert all(sample(LOGITS, rng, temperature=0.0) == 1 for _ in range(5))


def test_top_k_keeps_the_k_largest():
    kept = np.isfinite(filter_top_k(LOGITS, 2))
    assert kept.tolist() == [False, True, True, False, False]


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum()  # ~[.08, .61, .23, .05, .01]
    assert np.isfinite(filter_top_p(LOGITS, 0.5)).tolist() == [False, True, False, False, False]
    assert np.isfinite(filter_top_p(LOGITS, 0.8)).tolist() == [False, True, True, False, False]
    assert probs[1] + probs[2] > 0.8


def test_sampling_is_seeded_and_respects_filters():
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    a = [sample(LOGITS, rng_a, 1.0, top_k=3) for _ in range(50)]
    b = [sample(LOGITS, rng_b, 1.0, top_k=3) for _ in range(50)]
    assert a == b and set(a) <= {0, 1, 2} and len(set(a)) > 1


def test_sampling_follows_the_distribution():
    """One uniform draw per token through the inverse CDF: the counts follow ``distribution`` (what a drafted token
    is checked against too: prompt lookup keeps a draft exactly when it is the token sampled)."""
    rng = np.random.default_rng(0)
    draws = 40_000
    for temperature, top_k in ((1.0, 0), (0.7, 3), (1.0, 2)):
        want = distribution(LOGITS, temperature, top_k)
        counts = np.bincount([sample(LOGITS, rng, temperature, top_k) for _ in range(draws)], minlength=LOGITS.size)
        # within 4 standard errors of a binomial count for every token; none outside the top-k
        assert np.all(np.abs(counts - draws * want) <= 4 * np.sqrt(draws * want * (1 - want)) + 1), counts
        assert np.all(counts[want == 0] == 0)
