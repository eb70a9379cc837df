"""Stage-2 training data (everyday.py, tool_families.py): every episode's calls are real and fit the offered
schemas, family tools come with their siblings, no generated name holds a held-out tool name, everyday calculator
requests state the operands their expression uses."""

import json
import random
import re

import pytest

from agentopt_compiler.agent_tiny.everyday import (_CONSTANTS, _PERIODS, CALC_CONVERT, EVERYDAY_KINDS,
                                                   HELDOUT_TOOL_NAMES, calc_request, make_everyday_task)
from agentopt_compiler.agent_tiny.tool_families import (ARITHMETIC, COMPOSED_VERBS, arithmetic_tool, family_tools,
                                                        family_value, holds_name)
from agentopt_compiler.agent_tiny.tools import calculator, parse_tool_call

jsonschema = pytest.importorskip("jsonschema")


def _offered(task) -> dict[str, dict]:
    lines = task.messages[0]["content"].splitlines()
    return {t["name"]: t["parameters"] for t in (json.loads(line) for line in lines if line.startswith('{"name"'))}


def test_holds_name_matches_whole_words_only():
    heldout = frozenset({"add", "book_author"})
    assert holds_name("add", heldout) and holds_name("add_numbers", heldout) and holds_name("get_book_author", heldout)
    assert not holds_name("address", heldout) and not holds_name("book", heldout)
    assert not holds_name("author_book", heldout) and not holds_name("sum_two", heldout)


@pytest.mark.parametrize("kind", EVERYDAY_KINDS)
def test_everyday_episodes_call_offered_tools_with_schema_valid_arguments(kind):
    for i in range(150):
        task = make_everyday_task(kind, random.Random(f"test/{kind}/{i}"))
        offered = _offered(task)
        calls = [parse_tool_call(m["content"]) for m in task.episode if m["role"] == "assistant"
                 and "<tool_call>" in m["content"]]
        assert calls, task.episode
        for name, args in calls[-len(task.calls):]:  # the calls after any misnamed one the episode shows
            assert name in offered, (name, sorted(offered))
            schema = {"type": "object", "properties": {p: {"type": t} for p, t in offered[name].items()},
                      "required": list(offered[name]), "additionalProperties": False}
            jsonschema.validate(args, schema)


def test_family_tools_come_with_siblings_of_other_concepts_and_no_held_out_names():
    r = random.Random(0)
    families = set()
    for _ in range(2000):
        tools = family_tools(r, HELDOUT_TOOL_NAMES, r.randint(1, 3))
        names = [t["name"] for t in tools]
        assert len(set(names)) == len(names) and not any(holds_name(n, HELDOUT_TOOL_NAMES) for n in names)
        assert len({t["_concept"] for t in tools}) == len(tools)  # siblings do something else: the name decides
        assert len({t["_concept"][0] for t in tools}) == 1
        families.add(tools[0]["_concept"][0])
    assert families == {"arith", "attr", "composed"}


@pytest.mark.parametrize("op", sorted(ARITHMETIC))
def test_arithmetic_tools_return_their_operation(op):
    r = random.Random(op)
    tool = arithmetic_tool(r, op)
    args = {p: family_value(r, vkind) for p, _, vkind in tool["_params"]}
    x, y = args.values()
    expected = {"sum": x + y, "difference": x - y, "product": x * y, "quotient": round(x / y, 4), "power": x ** y,
                "remainder": x % y}[op]
    assert tool["_result"](args) == expected


UNSPOKEN = {}  # constant -> the unit words that imply it ("hours" and "days": 24)
for small, big, k in _CONSTANTS + _PERIODS:
    UNSPOKEN.setdefault(str(k), set()).update({small, big})


def test_everyday_calculator_requests_state_the_expression_operands():
    r = random.Random(1)
    digits = set()
    for _ in range(3000):
        request, expression = calc_request(r)
        calculator(expression)  # a valid expression of the calculator
        for number in re.findall(r"\d+(?:\.\d+)?", expression):
            # "double", "one tenth of": small ones as words; hours in a day, a dozen: constants named by their units
            if len(number) > 1 and number not in ("10", "100") and not any(
                    word in request.split() for word in UNSPOKEN.get(number, ())):
                assert number in request, (request, expression)
            digits.add(len(number.split(".")[0]))
    assert {2, 3, 4, 5} <= digits  # operands as people write them, not only up to 999


def test_calc_convert_forms_multiply_as_often_as_they_add():
    ops = [op for _, op in CALC_CONVERT]
    assert sum(op in ("*", "*r") for op in ops) >= sum(op == "+" for op in ops)


def test_generated_tool_arguments_are_copied_from_the_request_and_mostly_new():
    """A call's argument values all stand in the request as written (the model can copy them), and most are drawn
    from open generators, not lists a model could learn instead of copying (open_values.py)."""
    from agentopt_compiler.agent_tiny.everyday import _VALUES
    from agentopt_compiler.agent_tiny.tool_families import ATTRIBUTES, COMPOSED_VALUES

    closed = {str(v) for vals in _VALUES.values() for v in vals} | set(COMPOSED_VALUES)
    closed |= {v for _, vals, _ in ATTRIBUTES.values() for v in vals}
    strings, numbers = [], []
    for i in range(600):
        task = make_everyday_task("new_tool", random.Random(f"copy/{i}"))
        request = task.messages[-1]["content"]
        for value in task.calls[0][1].values():
            assert str(value) in request, (value, request)
            (strings if isinstance(value, str) else numbers).append(value)
    open_strings = [s for s in strings if s not in closed]
    assert len(open_strings) > 0.4 * len(strings) and len(set(open_strings)) > 0.9 * len(open_strings)
    assert max(numbers) >= 100_000 and min(numbers) < 10


def test_made_up_composed_names_are_matched_from_the_request():
    """Composed tools named from made-up words: the request holds the tool's verb and object, a sibling shares one."""
    r = random.Random(1)
    made_up = 0
    for _ in range(600):
        tools = family_tools(r, HELDOUT_TOOL_NAMES, 2)
        if tools[0]["_concept"][0] != "composed" or tools[0]["_concept"][1] in COMPOSED_VERBS:
            continue
        made_up += 1
        _, verb, obj = tools[0]["_concept"]
        assert all(verb in ask and obj in ask for ask in tools[0]["_asks"])
        assert all(t["_concept"][1] == verb or t["_concept"][2] == obj for t in tools[1:])
    assert made_up > 50
