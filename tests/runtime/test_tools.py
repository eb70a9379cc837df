import time
from typing import Literal

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
    assert run_tool_call(ToolCall("add", {"a": 3.0, "b": 2}), tools).text == "5.0"  # JSON 3.0 is an integer
    assert run_tool_call(ToolCall("Multiply", {"a": 2, "b": 1.5}), tools).text == "3.0"
    # results are valid JSON: a NaN or infinity is written by name
    nan = Tool.from_function(lambda: {"v": float("nan"), "w": [float("inf")]}, name="nan")
    assert json.loads(run_tool_call(ToolCall("nan", {}), {"nan": nan}).text) == {"v": "NaN", "w": ["Infinity"]}
