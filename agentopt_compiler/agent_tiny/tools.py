"""The three agent tools with real implementations, their schemas, and the tool-call text format of agent-tiny.

``calculator`` (``+ - * / **`` by walking the AST, never ``eval``), ``convert_units`` (km/miles, kg/lb, C/F,
m/ft, l/gal, 2 decimals) and ``memory_lookup`` (facts stated earlier in the conversation, by "Name's attribute" key).
``run_tool`` returns the exact tool-message text the model was trained on (``{"result": ...}`` or ``{"error": ...}``);
``runtime_tools(memory)`` wraps them as plain functions for the runtime ``Agent``.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
import typing
from typing import Any

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class ToolError(Exception):
    """A tool rejected its arguments; the message goes back to the model as ``{"error": ...}``."""


_MAX_EXPR_CHARS = 200
_MAX_ABS_RESULT = 10 ** 30


_MAX_EXPONENT = 64
_DIVISION_DECIMALS = 4
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}


def calculator(expression: str) -> int | float:
    """Arithmetic with ``+ - * /``, ``**`` (or ``^``) for powers, unary minus, parentheses and decimal numbers, by
    walking the AST (never eval). Whole results are ints (exact); a division that does not come out whole is rounded
    to 4 decimals. Anything else (names, calls, ``//``, huge powers, division by zero) is a ToolError saying what to
    write instead."""
    if not isinstance(expression, str):
        raise ToolError("expression must be a string, e.g. \"12 * (3 + 4)\"")
    if len(expression) > _MAX_EXPR_CHARS:
        raise ToolError(f"expression longer than {_MAX_EXPR_CHARS} characters")
    text = expression.replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/")
    bad = sorted(set(re.sub(r"[0-9+\-*/(). ]", "", text)))
    if bad:
        raise ToolError(f"unsupported character {bad[0]!r}; use numbers, + - * / ** and parentheses")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse expression {expression!r}; write it like \"(12 + 3) * 4\"") from None
    try:
        out = _eval_node(tree.body)
    except OverflowError:  # float arithmetic past ~1.8e308 on the way, e.g. (1.5 ** 64) ** 64
        raise ToolError("result too large") from None
    if isinstance(out, float):
        out = round(out, _DIVISION_DECIMALS)
        return int(out) if out.is_integer() else out
    return out


def _eval_node(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        a, b = _eval_node(node.left), _eval_node(node.right)
        if isinstance(node.op, ast.Add):
            out = a + b
        elif isinstance(node.op, ast.Sub):
            out = a - b
        elif isinstance(node.op, ast.Mult):
            out = a * b
        elif isinstance(node.op, ast.Div):
            if b == 0:
                raise ToolError("division by zero")
            out = a // b if isinstance(a, int) and isinstance(b, int) and a % b == 0 else a / b
        else:
            if abs(b) > _MAX_EXPONENT or (isinstance(b, float) and not b.is_integer()):
                raise ToolError(f"exponent {b} not supported; use a whole exponent up to {_MAX_EXPONENT}")
            if a == 0 and b < 0:
                raise ToolError("division by zero")
            out = a ** int(b) if b >= 0 else a ** b
        if abs(out) > _MAX_ABS_RESULT:
            raise ToolError("result too large")
        return out
    raise ToolError(f"unsupported expression element {type(node).__name__}; use numbers, + - * / ** and "
                    "parentheses")


UNITS = ("km", "miles", "kg", "lb", "C", "F", "m", "ft", "l", "gal")
UNIT_PAIRS = (("km", "miles"), ("kg", "lb"), ("C", "F"), ("m", "ft"), ("l", "gal"))
UNIT_NAMES = {"km": "kilometers", "miles": "miles", "kg": "kilograms", "lb": "pounds", "C": "degrees Celsius",
              "F": "degrees Fahrenheit", "m": "meters", "ft": "feet", "l": "liters", "gal": "gallons"}
_UNIT_ALIASES = {
    "km": "km", "kilometer": "km", "kilometers": "km", "kilometre": "km", "kilometres": "km",
    "miles": "miles", "mile": "miles", "mi": "miles",
    "kg": "kg", "kilogram": "kg", "kilograms": "kg", "kgs": "kg",
    "lb": "lb", "lbs": "lb", "pound": "lb", "pounds": "lb",
    "c": "C", "celsius": "C", "degrees celsius": "C", "°c": "C",
    "f": "F", "fahrenheit": "F", "degrees fahrenheit": "F", "°f": "F",
    "m": "m", "meter": "m", "meters": "m", "metre": "m", "metres": "m",
    "ft": "ft", "foot": "ft", "feet": "ft",
    "l": "l", "liter": "l", "liters": "l", "litre": "l", "litres": "l",
    "gal": "gal", "gallon": "gal", "gallons": "gal",
}
# exact definitions: 1 mile = 1.609344 km, 1 lb = 0.45359237 kg, 1 ft = 0.3048 m, 1 US gal = 3.785411784 l
_LINEAR = {("miles", "km"): 1.609344, ("lb", "kg"): 0.45359237, ("ft", "m"): 0.3048, ("gal", "l"): 3.785411784}


def canonical_unit(unit: str) -> str:
    if not isinstance(unit, str) or unit.strip().lower() not in _UNIT_ALIASES:
        raise ToolError(f"unknown unit {unit!r}; use one of {', '.join(UNITS)}")
    return _UNIT_ALIASES[unit.strip().lower()]


def convert_units(value: float, from_unit: str, to_unit: str) -> float | int:
    """km<->miles, kg<->lb, C<->F, m<->ft, l<->gal (US), rounded to 2 decimals (an int when whole)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ToolError("value must be a number")
    if not abs(value) < _MAX_ABS_RESULT:  # also NaN; an int too large for a float would overflow below
        raise ToolError(f"value must be a finite number below {_MAX_ABS_RESULT:.0e} in size")
    a, b = canonical_unit(from_unit), canonical_unit(to_unit)
    if a == b:
        out = float(value)
    elif (a, b) == ("C", "F"):
        out = value * 9 / 5 + 32
    elif (a, b) == ("F", "C"):
        out = (value - 32) * 5 / 9
    elif (a, b) in _LINEAR:
        out = value * _LINEAR[(a, b)]
    elif (b, a) in _LINEAR:
        out = value / _LINEAR[(b, a)]
    else:
        raise ToolError(f"cannot convert {a} to {b}")
    return _clean_number(round(out, 2))


def memory_lookup(key: str, memory: dict[str, str]) -> str:
    """The value stored under ``key`` (matched case-insensitively, ignoring a leading "the", "my" or "our" and end
    punctuation)."""
    if not isinstance(key, str):
        raise ToolError("key must be a string")
    table = {normalize_key(k): v for k, v in memory.items()}
    nk = normalize_key(key)
    if nk not in table:
        raise ToolError(f"no memory for key {key!r}")
    return table[nk]


_MAX_KEYS_LISTED = 10  # keys of 12 tokens fit a quarter of agent-tiny's context (an observation's share)


def _known_keys(key: Any, keys: list[str]) -> str:
    """The end of a failed lookup's error: the stored keys (as training wrote them), or for a large memory the ones
    closest to ``key``, so that one observation cannot fill the context."""
    if not keys:
        return "the memory is empty"
    if len(keys) <= _MAX_KEYS_LISTED:
        return f"known keys: {', '.join(keys)}"
    closest = difflib.get_close_matches(normalize_key(key) if isinstance(key, str) else "",
                                        keys, n=_MAX_KEYS_LISTED, cutoff=0.0)
    return f"the {len(closest)} of {len(keys)} known keys closest to it: {', '.join(closest)}"


def normalize_key(key: str) -> str:
    k = re.sub(r"\s+", " ", key.strip().lower().rstrip("?.!")).replace("\u2019", "'")
    for article in ("the ", "my ", "our "):  # "my locker code" is the user's "locker code"
        if k.startswith(article):
            return k[len(article):]
    return k


TOOLS: list[dict[str, Any]] = [
    {"name": "calculator", "description": "Arithmetic with + - * / ** and parentheses.",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                    "required": ["expression"]}},
    {"name": "convert_units", "description": "Convert km/miles, kg/lb, C/F, m/ft, l/gal; 2 decimals.",
     "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                                     "to_unit": {"type": "string"}},
                    "required": ["value", "from_unit", "to_unit"]}},
    {"name": "memory_lookup", "description": "Read a fact stored in memory by its key.",
     "parameters": {"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}},
]
TOOL_NAMES = tuple(t["name"] for t in TOOLS)


def system_prompt(tools: list[dict] = TOOLS) -> str:
    """The system message: one compact JSON schema per tool (name and parameter types), to keep episodes short."""
    lines = "\n".join(json.dumps({"name": t["name"], "parameters": {k: v["type"] for k, v in
                                                                     t["parameters"]["properties"].items()}})
                      for t in tools)
    return ("You are a helpful assistant with tools. Call one with "
            '<tool_call>{"name": ..., "arguments": {...}}</tool_call>. Tools:\n' + lines)


def run_tool(name: str, arguments: dict, memory: dict[str, str] | None = None) -> str:
    """Run one tool call and return the tool message content (JSON): the result, or ``{"error": ...}``."""
    try:
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be an object")
        schema = next((t for t in TOOLS if t["name"] == name), None)
        if schema is None:
            raise ToolError(f"unknown tool {name!r}; tools: {', '.join(TOOL_NAMES)}")
        params = schema["parameters"]
        missing = [p for p in params["required"] if p not in arguments]
        extra = [p for p in arguments if p not in params["properties"]]
        if missing or extra:
            raise ToolError(f"{name} takes {', '.join(params['properties'])}")
        if name == "calculator":
            return json.dumps({"result": calculator(arguments["expression"])})
        if name == "convert_units":
            out = convert_units(arguments["value"], arguments["from_unit"], arguments["to_unit"])
            return json.dumps({"result": out, "unit": canonical_unit(arguments["to_unit"])})
        memory = memory or {}
        try:
            value = memory_lookup(arguments["key"], memory)
        except ToolError as exc:
            raise ToolError(f"{exc}; {_known_keys(arguments['key'], list(memory))}") from None
        return json.dumps({"key": arguments["key"], "value": value})
    except ToolError as exc:
        return json.dumps({"error": str(exc)})


def runtime_tools(memory: dict[str, str] | None = None) -> list:
    """The three tools as plain functions for the runtime ``Agent`` (``Tool.from_function`` reads their signatures).

    Each returns the exact tool-message text of training (``{"result": ...}`` or ``{"error": ...}``) and never raises,
    so the model sees the observations it was trained on. ``memory_lookup`` is bound to ``memory``."""
    memory = memory if memory is not None else {}

    def calculator(expression: str) -> str:
        """Arithmetic with + - * / ** and parentheses."""
        return run_tool("calculator", {"expression": expression})

    def convert_units(value: float, from_unit: str, to_unit: str) -> str:
        """Convert km/miles, kg/lb, C/F, m/ft, l/gal; 2 decimals."""
        return run_tool("convert_units", {"value": value, "from_unit": from_unit, "to_unit": to_unit})

    def memory_lookup(key: str) -> str:
        """Read a fact stored in memory by its key."""
        return run_tool("memory_lookup", {"key": key}, memory)

    if memory:  # the stored keys are the only ones that can succeed: the schema says so (an enum), and constrained
        # decoding then writes one of them; the prompt is unchanged (the chat template shows a parameter's type only)
        memory_lookup.__annotations__["key"] = typing.Literal[tuple(memory)]
    return [calculator, convert_units, memory_lookup]


def format_tool_call(name: str, arguments: dict) -> str:
    return f"{TOOL_CALL_OPEN}{json.dumps({'name': name, 'arguments': arguments})}{TOOL_CALL_CLOSE}"


def parse_tool_call(text: str) -> tuple[str, dict] | None:
    """(name, arguments) from an assistant message holding ``<tool_call>{json}</tool_call>``; None when malformed."""
    m = re.search(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + "|$)", text, re.S)
    if not m:
        return None
    try:
        obj = json.loads(m.group(1).strip())
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(obj.get("arguments"),
                                                                                               dict):
        return None
    return obj["name"], obj["arguments"]


def fmt_num(x: float | int) -> str:
    x = _clean_number(x)
    return str(x) if isinstance(x, int) else f"{x:.2f}".rstrip("0").rstrip(".")


def _clean_number(x: float | int) -> float | int:
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


def _num_value(text: str) -> float | int:
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
