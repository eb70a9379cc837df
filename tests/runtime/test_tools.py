import asyncio
import dataclasses
import enum
import math
import time
from typing import Literal, Optional

import pytest

from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.runtime.tools import Tool, ToolCall, parse_tool_calls, run_tool_call


def convert(value: float, unit: Literal["km", "mi"], digits: int = 2) -> str:
    """Convert a distance.

    Args:
        value: the distance
        unit: the unit of value
        digits: rounding
    """
    return str(round(value * (0.621371 if unit == "km" else 1.609344), digits))


def slow() -> str:
    """Takes too long."""
    time.sleep(5)
    return "late"


def broken(x: int) -> int:
    """Always fails."""
    raise ValueError("no luck")


TOOLS = {t.name: t for t in map(Tool.from_function, (convert, slow, broken))}


def test_schema_from_signature_hints_and_docstring():
    schema = TOOLS["convert"].schema()["function"]
    assert schema["name"] == "convert" and schema["description"] == "Convert a distance."
    params = schema["parameters"]
    assert params["required"] == ["value", "unit"]
    assert params["properties"]["value"] == {"type": "number", "description": "the distance"}
    assert params["properties"]["unit"]["enum"] == ["km", "mi"]
    assert params["properties"]["digits"]["default"] == 2


def test_parses_hermes_tags_and_json_objects():
    text = 'Sure.<tool_call>{"name": "convert", "arguments": {"value": 5, "unit": "km"}}</tool_call>'
    parsed = parse_tool_calls(text)
    assert parsed.content == "Sure." and parsed.calls[0].arguments == {"value": 5, "unit": "km"}
    openai_style = parse_tool_calls('{"function": {"name": "convert", "arguments": "{\\"value\\": 1, \\"unit\\": '
                                    '\\"mi\\"}"}}')
    assert openai_style.calls[0].name == "convert" and openai_style.calls[0].arguments["unit"] == "mi"
    assert parse_tool_calls("just an answer").calls == []
    assert parse_tool_calls('{"not": "a call"}').calls == []


def test_malformed_calls_become_errors_not_exceptions():
    parsed = parse_tool_calls('<tool_call>{"name": "convert", "arguments": {"value": 5,</tool_call>')
    assert parsed.calls == [] and "invalid JSON" in parsed.errors[0]
    assert "expected" in parse_tool_calls("<tool_call>[1, 2]</tool_call>").errors[0]


def test_tool_failures_become_observations():
    assert run_tool_call(ToolCall("convert", {"value": 10, "unit": "km"}), TOOLS).output == "6.21"
    assert "unknown tool 'nope'" in run_tool_call(ToolCall("nope", {}), TOOLS).text
    assert "missing required argument(s): unit" in run_tool_call(ToolCall("convert", {"value": 1}), TOOLS).text
    assert "unknown argument(s): colour" in run_tool_call(ToolCall("broken", {"x": 1, "colour": 2}), TOOLS).text
    assert "raised ValueError: no luck" in run_tool_call(ToolCall("broken", {"x": 1}), TOOLS).text
    started = time.perf_counter()
    assert "timed out after 0.2s" in run_tool_call(ToolCall("slow", {}), TOOLS, timeout_s=0.2).text
    assert time.perf_counter() - started < 2


def test_a_closing_tag_without_its_opening_is_a_parse_error():
    for text, tag in [("The answer is 42.</tool_call>", "</tool_call>"), ("42<|/tool_call|>", "<|/tool_call|>")]:
        parsed = parse_tool_calls(text)
        assert not parsed.calls and len(parsed.errors) == 1 and tag in parsed.errors[0]
        assert tag not in parsed.content
    assert parse_tool_calls("The answer is 42.").errors == []


def test_partials_callable_objects_and_kwargs_make_tools():
    import functools
    import json

    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    class Multiply:
        def __call__(self, a: int, b: float) -> float:
            """Multiply two numbers."""
            return a * b

    def echo(text: str, **extra) -> dict:
        """Echo the text and whatever else is given."""
        return {"text": text, **extra}

    plus_one = Tool.from_function(functools.partial(add, b=1))
    assert plus_one.name == "add" and plus_one.parameters["required"] == ["a"]
    times = Tool.from_function(Multiply())
    assert times.name == "Multiply" and times.description == "Multiply two numbers."
    assert times.parameters["properties"] == {"a": {"type": "integer"}, "b": {"type": "number"}}
    tools = {t.name: t for t in (Tool.from_function(add), times, Tool.from_function(echo))}
    assert run_tool_call(ToolCall("echo", {"text": "hi", "n": 2}), tools).text == '{"text": "hi", "n": 2}'
    # arguments of the wrong JSON type are an observation naming the argument (calls decoded without the grammar)
    wrong = run_tool_call(ToolCall("add", {"a": "(1 + 2)", "b": 2}), tools)
    assert wrong.error == "add: argument 'a' must be an integer, got \"(1 + 2)\""
    assert run_tool_call(ToolCall("add", {"a": 3.0, "b": 2}), tools).text == "5"  # JSON 3.0 is an integer: 3
    assert run_tool_call(ToolCall("Multiply", {"a": 2, "b": 1.5}), tools).text == "3.0"
    # results are valid JSON: a NaN or infinity is written by name
    nan = Tool.from_function(lambda: {"v": float("nan"), "w": [float("inf")]}, name="nan")
    assert json.loads(run_tool_call(ToolCall("nan", {}), {"nan": nan}).text) == {"v": "NaN", "w": ["Infinity"]}


class _Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclasses.dataclass
class _Point:
    x: int
    y: int = 0


def _paint(color: _Color = _Color.RED, at: Optional[_Point] = None, times: Optional[int] = None,
           pair: tuple[int, str] = (1, "a"), when=frozenset()) -> str:
    """Paint."""
    return repr((color, at, times, pair, when))


async def _search(query: str) -> str:
    await asyncio.sleep(0)
    return f"found {query}"


def _subtract(a: int, /, b: int) -> int:
    return a - b


def test_tools_of_everyday_python_types_get_their_schema_and_their_values():
    """Enums, dataclasses, Optional, tuples, defaults JSON has no form for, async functions, positional-only
    parameters and parameters without hints: a schema the call can satisfy, and the function gets values of the
    types it declares (a TypeError from the schema writer, a coroutine never awaited, or raw strings before)."""
    paint = Tool.from_function(_paint)
    properties = paint.parameters["properties"]
    assert properties["color"] == {"type": "string", "enum": ["red", "blue"], "default": "red"}
    assert properties["at"]["anyOf"][0]["required"] == ["x"] and properties["at"]["anyOf"][1] == {"type": "null"}
    assert properties["times"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert properties["pair"]["prefixItems"] == [{"type": "integer"}, {"type": "string"}]
    assert properties["when"] == {}  # no hint: any JSON value; a default JSON cannot hold is left out
    tools = {"_paint": paint, "_search": Tool.from_function(_search), "_subtract": Tool.from_function(_subtract)}
    called = run_tool_call(ToolCall("_paint", {"color": "blue", "at": {"x": 1}, "times": None, "pair": [2, "b"]}),
                           tools)
    assert called.text == repr((_Color.BLUE, _Point(1, 0), None, (2, "b"), frozenset()))
    assert run_tool_call(ToolCall("_paint", {"color": "green"}), tools).error == \
        "_paint: argument 'color' must be one of [\"red\", \"blue\"], got \"green\""
    assert run_tool_call(ToolCall("_search", {"query": "x"}), tools).text == "found x"
    assert run_tool_call(ToolCall("_subtract", {"a": 5, "b": 2}), tools).text == "3"
    assert Tool.from_function(math.sqrt).parameters["properties"] == {"x": {}}  # a builtin without hints: any value
    for bad, says in ((dict(name="my tool"), "not one a model can call"), (dict(parameters=None), "JSON schema"),
                      (dict(function=None), "must be callable")):
        with pytest.raises(AgentOptError, match=says):
            Tool(**{"name": "ok", "description": "d", "parameters": {"type": "object"}, "function": print, **bad})
