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
    """Sample one token id from 1-D ``logits``; temperature <= 0 means greedy."""
    if temperature <= 0:
        return greedy(logits)
    probs = distribution(logits, temperature, top_k, top_p)
    return int(rng.choice(probs.shape[0], p=probs))


def check_draft(logits: np.ndarray, draft: int, rng: np.random.Generator, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> int:
    """The token at a position where ``draft`` was drafted (prompt lookup): the draft when it is kept, otherwise
    another token, such that the result is distributed exactly as ``sample``'s.

    Greedy: the argmax (the draft is kept when it is the argmax). Sampling: the draft is a point mass, so
    speculative sampling keeps it with probability min(1, p(draft) / 1) = p(draft) and otherwise draws from
    max(0, p - point mass), renormalized, which is p without the draft. Then P(draft) = p(draft), and for any other
    x, P(x) = (1 - p(draft)) * p(x) / (1 - p(draft)) = p(x). (Not the same tokens as ``sample`` for a seed: the
    random stream is used differently.)"""
    if temperature <= 0:
        return greedy(logits)
    probs = distribution(logits, temperature, top_k, top_p)
    if rng.random() < probs[draft]:
        return int(draft)
    rest = probs.copy()
    rest[draft] = 0.0  # reached only when p(draft) < 1, so something else has mass
    return int(rng.choice(rest.shape[0], p=rest / rest.sum()))
