"""Choosing the next token from logits: pure numpy functions, seeded by the caller's Generator."""

from __future__ import annotations

import numpy as np


def greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits, set the rest to -inf (k <= 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, -np.inf)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability sums to >= p."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits)
    probs = softmax(logits[order])
    keep_sorted = np.cumsum(probs) - probs < p  # a token stays if the mass before it is still < p; the top one always
    keep = np.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return np.where(keep, logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - np.max(logits))
    return shifted / shifted.sum()


def distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """The probabilities ``sample`` draws from (temperature > 0), in float64."""
    scaled = logits.astype(np.float64) / temperature
    return softmax(filter_top_p(filter_top_k(scaled, top_k), top_p))


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> int:
    """Sample one token id from 1-D ``logits``; temperature <= 0 means greedy. One uniform draw u per token, turned
    into a token by the inverse of the distribution's CDF (in vocabulary order).

    This is also how a drafted token is checked (prompt lookup): the draft is kept when the token u picks is the
    draft, which happens with probability p(draft), as speculative sampling keeps a point-mass draft; otherwise the
    token is distributed as p without the draft, renormalized (u is uniform over the rest of the CDF). So sampled
    tokens follow the model's distribution exactly, and a seed gives the same tokens whether a position's token was
    drafted or not (under load, a session may decode with or without drafts)."""
    if temperature <= 0:
        return greedy(logits)
    return _inverse_cdf(distribution(logits, temperature, top_k, top_p), rng.random())


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The token whose CDF interval holds ``u`` in [0, 1): never one of probability 0."""
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, u * cdf[-1], side="right"))  # scaled: rounding leaves cdf[-1] a hair off 1
    return index if index < probs.shape[0] else int(np.flatnonzero(probs)[-1])
