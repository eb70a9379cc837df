"""The compile pipeline, in the order it runs. Read this file to know what ``agentopt compile`` does to a graph.

Phase 1, canonicalize: make the captured graph regular, so each later fusion needs one pattern.
    remove_noop_ops      identity casts, clones, metadata asserts, eval-mode dropout
Later phases (see the open issues): fuse KV-cache ops, insert sparse attention, apply a precision plan.
"""

from __future__ import annotations

from .infra import PassPipeline
from .remove_noop_ops import RemoveNoopOps


def default_pipeline() -> PassPipeline:
    return PassPipeline([
        # phase 1: canonicalize
        RemoveNoopOps(),
    ])
