"""Prompt-lookup drafts: guess the next tokens by finding the conversation's last few tokens earlier in it.

Agents copy a lot from their context: tool names and argument values from the request and the schemas, numbers from
observations into the answer, JSON scaffolding they wrote before. When the last ``n`` tokens (n = 3, then 2)
occurred earlier, the tokens that followed that occurrence are a cheap draft of what comes next:

    tokens:  ... "expression": "(372 + 386) * 36" ... <tool_call>{"name": "calculator", "arguments": {"expression": "(
    suffix:                                                                                              ^^^^^^^^^^^^ n=3
    earlier: ..."expression": "(|372 + 386) * 36"...                      -> draft: 372 + 386) * 36"

The decode loop (conversation.py) feeds the pending token and the draft in one call, reads the greedy choice at every
position, and keeps the draft up to its first disagreement plus the model's own token there. CPU decode is bound by
reading the weights, and one call over a few tokens reads them once, so every accepted draft token is nearly free;
a rejected draft costs the extra arithmetic of its rows. The output is the greedy output, token for token (the rows
are computed by a multi-token call rather than one token at a time, the same difference chunked prefill has).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MAX_NGRAM = 3  # longest suffix matched; longer suffixes give fewer but surer matches
# a single matching token drafts too often wrongly: with agent-tiny, minimum 2 accepted 59% of the drafted tokens
# against 49% for minimum 1, at the same speed (benchmarks/prompt_lookup.py, 50 tasks, drafts of 3)
MIN_NGRAM = 2


def draft_tokens(tokens: Sequence[int], max_tokens: int) -> list[int]:
    """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the longest matching suffix
    (``MAX_NGRAM`` down to ``MIN_NGRAM`` tokens) of ``tokens``; [] when nothing matches."""
    if max_tokens <= 0 or len(tokens) < 2:
        return []
    ids = np.asarray(tokens, dtype=np.int64)
    for n in range(min(MAX_NGRAM, len(ids) - 1), MIN_NGRAM - 1, -1):
        suffix = ids[-n:]
        # windows starting at 0 .. len-n-1: each is followed by at least one token and is not the suffix itself
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
        starts = np.flatnonzero((windows == suffix).all(axis=1))
        if starts.size:
            follow = int(starts[-1]) + n
            return ids[follow:follow + max_tokens].tolist()
    return []
