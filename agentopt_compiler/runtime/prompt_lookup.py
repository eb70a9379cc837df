"""Prompt-lookup drafts: guess the next tokens by finding the conversation's last few tokens earlier in it.

Agents copy a lot from their context: tool names and argument values from the request and the schemas, numbers from
observations into the answer, JSON scaffolding they wrote before. When the last ``n`` tokens (n = 3, then 2)
occurred earlier, the tokens that followed that occurrence are a cheap draft of what comes next:

    conversation:  ... Could you figure out (372 + 386) * 36? ... <tool_call>{"name": "calculator",
                   "arguments": {"expression": "(372
    last tokens:   "(372"                       (n = 3 tokens, else 2)
    seen earlier:  "figure out (372| + 386) * 36?"   ->  draft: " + 386) * 36" (up to N tokens)

The decode loop (conversation.py) feeds the pending token and the draft in one call, gets the logits at every
position, and keeps the draft up to the first token the model does not choose (sampling.sample), plus the
model's own token there. CPU decode is bound by reading the weights, and one call over a few tokens reads them once,
so every accepted draft token is nearly free; a rejected draft costs the extra arithmetic of its rows. Greedy output
is the plain greedy output, token for token (the rows are computed by a multi-token call rather than one token at a
time, the same difference chunked prefill has); sampled output is the plain sampled output for the same seed.
"""

from __future__ import annotations

from typing import Sequence

MAX_NGRAM = 3  # longest suffix matched; longer suffixes give fewer but surer matches
# a single matching token drafts too often wrongly: with agent-tiny, minimum 2 accepted 59% of the drafted tokens
# against 49% for minimum 1, at the same speed (benchmarks/prompt_lookup.py, 50 tasks, drafts of 3)
MIN_NGRAM = 2


class DraftIndex:
    """The latest start of every MIN_NGRAM..MAX_NGRAM-token sequence of a growing token list that another token
    follows, so a draft costs a few dict lookups instead of a scan of the whole conversation (a scan of 1,000 tokens
    took ~60 us a call, a sixth of one agent-tiny decode call).

    Decoding appends to the conversation's list. A new list (the conversation's next turn, or a rewind) keeps the
    index when it starts with the tokens indexed so far; otherwise it is indexed again from the start.
    """

    def __init__(self):
        self._tokens: Sequence[int] | None = None
        self._indexed = 0  # n-grams ending before this position are in _latest
        self._latest: dict[tuple[int, ...], int] = {}

    def draft(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the longest matching suffix
        (``MAX_NGRAM`` down to ``MIN_NGRAM`` tokens) of ``tokens``; [] when nothing matches."""
        if tokens is not self._tokens:
            kept = self._indexed
            if self._tokens is None or len(tokens) < kept or list(tokens[:kept]) != list(self._tokens[:kept]):
                self._indexed, self._latest = 0, {}
            self._tokens = tokens
        elif len(tokens) < self._indexed:  # shortened in place
            self._indexed, self._latest = 0, {}
        # index the n-grams that end before the last token (each is followed by a token; the suffix is not indexed)
        for end in range(self._indexed, len(tokens) - 1):
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if end + 1 >= n:
                    self._latest[tuple(tokens[end + 1 - n:end + 1])] = end + 1 - n
        self._indexed = max(self._indexed, len(tokens) - 1)
        if max_tokens <= 0:
            return []
        for n in range(min(MAX_NGRAM, len(tokens) - 1), MIN_NGRAM - 1, -1):
            start = self._latest.get(tuple(tokens[-n:]))
            if start is not None:
                return list(tokens[start + n:start + n + max_tokens])
        return []


def draft_tokens(tokens: Sequence[int], max_tokens: int) -> list[int]:
    """``DraftIndex().draft``: one draft from scratch."""
    return DraftIndex().draft(list(tokens), max_tokens)
