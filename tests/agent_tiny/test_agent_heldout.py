"""The hand-written held-out sets: their size and kinds, answers that the real tools give, and proof that training
never sees them (no generated request equals one up to numbers and punctuation, none shares seven words in a row)."""

import json
import random

import pytest

from agentopt_compiler.agent_tiny import heldout_tools
from agentopt_compiler.agent_tiny.eval import HANDWRITTEN, UNSEEN_TOOLS, load_task_file
from agentopt_compiler.agent_tiny.everyday import (EVERYDAY_KINDS, HELDOUT_TOOL_NAMES, make_everyday_task,
                                                   normalize_request)
from agentopt_compiler.agent_tiny.tool_families import holds_name
from agentopt_compiler.agent_tiny.tasks import answer_matches, generate_tasks
from agentopt_compiler.agent_tiny.tools import fmt_num, run_tool
from agentopt_compiler.agent_tiny.train import CURRICULUM, STAGE2_MIX

NGRAM = 7


@pytest.fixture(scope="module")
def handwritten():
    return load_task_file(HANDWRITTEN)


@pytest.fixture(scope="module")
def unseen():
    return load_task_file(UNSEEN_TOOLS)


def test_sizes_and_kinds(handwritten, unseen):
    kinds = {}
    for t in handwritten:
        kinds[t.category] = kinds.get(t.category, 0) + 1
    assert len(handwritten) >= 150 and kinds["single"] >= 100 and kinds["two_step"] >= 30
    assert {t.kind for t in handwritten} >= {"calc", "convert", "lookup", "calc>convert", "lookup>calc",
                                              "lookup>convert"}
    assert len(unseen) >= 30 and len({t.calls[0][0] for t in unseen}) >= 12
    assert len({t.id for t in handwritten + unseen}) == len(handwritten) + len(unseen)


def test_expected_calls_give_the_expected_answers(handwritten, unseen):
    for t in handwritten:
        out = None
        for name, args in t.calls:
            res = json.loads(run_tool(name, args, t.memory))
            assert "error" not in res, (t.id, res)
            out = res.get("result", res.get("value"))
        assert answer_matches(t.answer, str(out)), (t.id, t.answer, out)
    for t in unseen:
        (name, args), = t.calls
        assert any(spec.endswith(":" + name) for spec in t.tools) and len(t.tools) >= 3
        result = getattr(heldout_tools, name)(**args)
        assert t.answer == (fmt_num(result) if isinstance(result, (int, float)) else result), t.id


def _training_requests(n_stage2: int, n_phase: int) -> set[str]:
    requests = set()
    for mix, n in [(STAGE2_MIX, n_stage2)] + [(m, n_phase) for _, m in CURRICULUM]:
        for t in generate_tasks(n, "train", seed=1, mix=mix):
            requests.update(normalize_request(m["content"]) for m in t.messages if m["role"] == "user")
    return requests


def test_no_training_request_matches_a_held_out_one(handwritten, unseen):
    # (a 30,000 + 3 x 5,000 task sample, 53,539 distinct requests, was checked when the sets were written)
    requests = _training_requests(6000, 1500)
    grams = {tuple(w[i:i + NGRAM]) for r in requests for w in [r.split()] for i in range(len(w) - NGRAM + 1)}
    for t in handwritten + unseen:
        norm = normalize_request(t.request)
        words = norm.split()
        assert norm not in requests, t.id
        shared = [g for g in (tuple(words[i:i + NGRAM]) for i in range(len(words) - NGRAM + 1)) if g in grams]
        assert not shared, (t.id, shared)


def test_held_out_tools_never_appear_in_training(unseen):
    assert {t.calls[0][0] for t in unseen} <= HELDOUT_TOOL_NAMES
    for i in range(3000):
        task = make_everyday_task(EVERYDAY_KINDS[i % len(EVERYDAY_KINDS)], random.Random(f"tools/{i}"))
        system = task.messages[0]["content"]
        names = {json.loads(line)["name"] for line in system.splitlines() if line.startswith('{"name"')}
        assert not names & HELDOUT_TOOL_NAMES, names
        assert not any(holds_name(n, HELDOUT_TOOL_NAMES) for n in names), names  # nor add_numbers, multiply_by


def test_normalized_requests_ignore_numbers_case_and_punctuation():
    assert normalize_request("What's 17 times 23?") == normalize_request("what's 4 times 5")
    assert normalize_request("add 3 and 4") != normalize_request("add 3 to 4")
