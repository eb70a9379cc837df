"""Shared fixtures: a tiny engine compiled once per session, and an eager greedy reference."""

from __future__ import annotations

import pytest

TINY_CONTEXT = 96


def eager_greedy(model, prompt_ids: list[int], steps: int, capacity: int) -> list[int]:
    """Greedy tokens from the eager reference model with a fresh cache: prefill, then one token per step."""
    import torch

    model.setup_cache(1, capacity)
    tokens, length = [], len(prompt_ids)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids]), torch.arange(length), torch.tensor([length - 1]))
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]]), torch.tensor([length]))
            length += 1
    return tokens


@pytest.fixture(scope="session", autouse=True)
def fixed_cost_model(tmp_path_factory):
    """The planner's per-machine cost model, fixed and cached in a temporary folder: no test times kernels unless it
    asks to (analysis/cost_model.py), and none writes to ~/.cache."""
    import json
    import os

    from agentopt_compiler.analysis.cost_model import CACHE_FILE, machine_key

    folder = tmp_path_factory.mktemp("agentopt-cache")
    # per weight, ordered by bytes (as a bytes model would): tests about choices need a strict order, not a host's
    constants = {"seconds_per_weight": {"fp32": 4e-10, "int8@32": 1.7e-10, "int8@64": 1.6e-10, "int8@128": 1.55e-10,
                                        "int4@32": 1.2e-10, "int4@64": 1.1e-10, "int4@128": 1.05e-10},
                 "noise": {}, "machine": {},
                 "measured_at": "fixed by tests/conftest.py"}
    entries = {json.dumps(machine_key(threads, symmetric), sort_keys=True): constants
               for threads in (None, 1, 2) for symmetric in (True, False)}
    (folder / CACHE_FILE).write_text(json.dumps(entries))
    saved = os.environ.get("AGENTOPT_CACHE_DIR")
    os.environ["AGENTOPT_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("AGENTOPT_CACHE_DIR", None)
    else:
        os.environ["AGENTOPT_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def tiny_engine_dir(tmp_path_factory):
    import agentopt_compiler as ao

    out = tmp_path_factory.mktemp("engines") / "tiny"
    ao.compile("tiny-random", out=out, context_length=TINY_CONTEXT)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_engine_dir):
    import agentopt_compiler as ao

    return ao.load_engine(tiny_engine_dir)


@pytest.fixture()
def tiny_model():
    from agentopt_compiler.models.registry import load_model

    return load_model("tiny-random").model


@pytest.fixture(scope="session")
def chat_engine(tmp_path_factory):
    """tiny-random with room for chat prompts: its byte-level tokenizer makes a system turn with tool schemas
    several hundred tokens long."""
    import agentopt_compiler as ao

    return ao.compile("tiny-random", out=tmp_path_factory.mktemp("engines") / "chat", context_length=2048)
