"""Tools for agents: JSON schemas from plain Python functions, tool-call parsing, and running calls safely.

    def get_weather(city: str, unit: str = "C") -> str:
        '''Current weather in a city.

        Args:
            city: the city name
            unit: C or F
        '''
    tool = Tool.from_function(get_weather)     # name, description, JSON schema (required: city)
    calls = parse_tool_calls('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>')
    result = run_tool_call(calls[0], {"get_weather": tool}, timeout_s=10)   # never raises
    tool = load_tool("mytools:get_weather")    # a module:function spec (agentopt run --tools), or AgentOptError

Malformed calls, unknown tools, bad arguments, exceptions (``SystemExit`` and ``KeyboardInterrupt`` raised by a
tool included) and timeouts all become ``ToolResult(error=...)`` whose text is fed back to the model as the
observation, so an agent loop never crashes on them; each call runs isolated (isolated_call.py), so a tool that
hangs never stops the loop, later calls or the process's exit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import importlib
import inspect
import json
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import AgentOptError
from .isolated_call import call_isolated

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI's API (and the server's) accepts as a function name


def _json_type(annotation) -> dict[str, Any]:
    """The JSON schema of a parameter's type hint, as pydantic writes it for the same types; {} (any JSON value)
    for a type JSON has no form for. ``_from_json`` turns a call's JSON value back into the hinted type."""
    origin = typing.get_origin(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return _json_type(typing.Literal[tuple(member.value for member in annotation)])
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        hints = typing.get_type_hints(annotation)
        fields = dataclasses.fields(annotation)
        return {"type": "object", "properties": {f.name: _json_type(hints.get(f.name, Any)) for f in fields},
                "required": [f.name for f in fields if f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING]}
    if isinstance(annotation, type) and hasattr(annotation, "model_json_schema"):  # a pydantic model
        return annotation.model_json_schema()
    if origin is tuple:
        args = typing.get_args(annotation)
        if not args or (len(args) == 2 and args[1] is Ellipsis):  # tuple[X, ...]: any length
            return {"type": "array", **({"items": _json_type(args[0])} if args else {})}
        return {"type": "array", "prefixItems": [_json_type(a) for a in args], "minItems": len(args),
                "maxItems": len(args)}
    if origin is list:
        args = typing.get_args(annotation)
        return {"type": "array", **({"items": _json_type(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if origin is typing.Literal:  # with the values' JSON type when they share one, as pydantic writes it
        values = list(typing.get_args(annotation))
        kinds = {_JSON_TYPES.get(type(v)) for v in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 and None not in kinds else {"enum": values}
    if origin in (typing.Union, types.UnionType):  # Optional[X]: X or null
        return {"anyOf": [_json_type(a) if a is not type(None) else {"type": "null"}
                          for a in typing.get_args(annotation)]}
    return {}


def _from_json(annotation, value):
    """A call's JSON ``value`` as the hinted type: an Enum member, a dataclass or pydantic model, a tuple, an int
    for a whole float; anything else as it came."""
    if value is None:
        return value
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return annotation(value)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type) and isinstance(value, dict):
        hints = typing.get_type_hints(annotation)
        return annotation(**{k: _from_json(hints.get(k, Any), v) for k, v in value.items()})
    if isinstance(annotation, type) and hasattr(annotation, "model_validate"):
        return annotation.model_validate(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin in (list, tuple) and isinstance(value, list):
        args = typing.get_args(annotation)
        items = [_from_json(args[0] if len(args) == 1 or args[1:] == (Ellipsis,) else
                            args[i] if i < len(args) else Any, v) for i, v in enumerate(value)] if args else value
        return tuple(items) if origin is tuple else items
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _from_json(options[0], value) if len(options) == 1 else value
    return value


async def _awaited(awaitable):
    return await awaitable


def _json_default(value):
    """A parameter's default as JSON (an Enum member as its value), or None where JSON has no form for it (the
    schema then leaves the default out: the parameter stays optional)."""
    value = value.value if isinstance(value, enum.Enum) else value
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return value


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """Summary and per-argument descriptions from a Google-style ``Args:`` section."""
    lines = inspect.cleandoc(doc or "").splitlines()
    summary, params, in_args = [], {}, False
    for line in lines:
        stripped = line.strip()
        if stripped.lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            match = re.match(r"(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)", stripped)
            if match:
                params[match.group(1)] = match.group(2)
            elif stripped.endswith(":"):
                in_args = False
        elif stripped and not params:
            summary.append(stripped)
    return " ".join(summary), params


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    function: Callable[..., Any]
    hints: dict[str, Any] = field(default_factory=dict)  # parameter -> type hint (a call's values are converted to it)
    positional: tuple[str, ...] = ()  # positional-only parameters, passed by position

    def __post_init__(self):
        if not isinstance(self.name, str) or not TOOL_NAME.fullmatch(self.name):
            raise AgentOptError(f"tool name {self.name!r} is not one a model can call: use 1-64 ASCII letters, "
                                "digits, '_' or '-' (give a def function, or Tool.from_function(f, name=...))")
        if not callable(self.function):
            raise AgentOptError(f"tool '{self.name}': function must be callable, got {type(self.function).__name__}")
        if not isinstance(self.parameters, dict) or self.parameters.get("type", "object") != "object":
            raise AgentOptError(f"tool '{self.name}': parameters must be the JSON schema of an object, got "
                                f"{self.parameters!r}")
        if not isinstance(self.description, str):
            raise AgentOptError(f"tool '{self.name}': description must be text")

    @classmethod
    def from_function(cls, function: Callable[..., Any], name: str | None = None) -> "Tool":
        """The tool's schema from ``function``'s signature, type hints and docstring. A signature that cannot be
        read (a builtin without one, a hint naming a type that is not defined) is an AgentOptError."""
        # what holds the hints and the docstring, and names the tool: a partial's function; a callable object's
        # __call__, named after its class
        target = function.func if isinstance(function, functools.partial) else function
        label = name or getattr(target, "__name__", None) or type(target).__name__
        if not (inspect.isfunction(target) or inspect.ismethod(target) or inspect.isbuiltin(target)
                or inspect.isclass(target)):
            target = type(target).__call__
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError) as exc:
            raise AgentOptError(f"tool '{label}': its signature cannot be read ({exc}); wrap it in a Python "
                                "function with named parameters") from None
        try:
            hints = typing.get_type_hints(target)
        except Exception as exc:  # noqa: BLE001  NameError for an undefined type, TypeError for a malformed hint
            raise AgentOptError(f"tool '{label}': a type hint cannot be resolved ({type(exc).__name__}: {exc}); "
                                "import that type in the tool's module, or drop the hint") from None
        doc = getattr(target, "__doc__", None) or getattr(function, "__doc__", None)
        summary, described = _docstring_parts(doc if isinstance(doc, str) else "")
        properties, required, open_ended, positional = {}, [], False, []
        for pname, param in signature.parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                open_ended |= param.kind == param.VAR_KEYWORD  # **kwargs: arguments beyond the named ones are taken
                continue
            if param.kind is param.POSITIONAL_ONLY:
                positional.append(pname)
            schema = _json_type(hints[pname]) if pname in hints else {}  # no hint: any JSON value
            if pname in described:
                schema["description"] = described[pname]
            if param.default is inspect.Parameter.empty:
                required.append(pname)
            elif (default := _json_default(param.default)) is not None:
                schema["default"] = default
            properties[pname] = schema
        parameters = {"type": "object", "properties": properties, "required": required,
                      **({"additionalProperties": True} if open_ended else {})}
        return cls(label, summary or label, parameters, function, {k: v for k, v in hints.items() if k != "return"},
                   tuple(positional))

    def call(self, values: dict[str, Any]) -> Any:
        """Call the function with a call's arguments (converted to their hinted types by ``_from_json``),
        positional-only ones by position; an async function is run to completion."""
        values = dict(values)
        value = self.function(*[values.pop(k) for k in self.positional if k in values], **values)
        return asyncio.run(_awaited(value)) if inspect.isawaitable(value) else value

    def schema(self) -> dict[str, Any]:
        """OpenAI-style tool entry: {"type": "function", "function": {name, description, parameters}}."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass
class ParsedOutput:
    content: str  # text outside the tool calls
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # malformed calls, described for the model


_TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
# Each family's tool-call syntax, as its chat template asks the model to write it; a block holds JSON: one call
# object or a list of them (Mistral's newer form, name[ARGS]{...}, is read separately).
_BLOCKS = (
    ("<tool_call>", _TAGGED),  # Qwen 2.5 / Qwen3, Hermes, SmolLM3: <tool_call>{...}</tool_call>, one per call
    ("<|tool_call|>", re.compile(r"<\|tool_call\|>(.*?)(?:<\|/tool_call\|>|$)", re.S)),  # Phi-4-mini: [{...}]
    ("[TOOL_CALLS]", re.compile(r"\[TOOL_CALLS\](.*?)(?:</s>|(?=\[TOOL_CALLS\])|$)", re.S)),  # Mistral: [{...}]
    ("<|python_tag|>", re.compile(r"<\|python_tag\|>(.*?)(?:<\|eom_id\|>|<\|eot_id\|>|$)", re.S)),  # Llama 3.1+
)
_MISTRAL_ARGS = re.compile(r"^\s*([\w.-]+)\[ARGS\](.*)$", re.S)  # Mistral v11+: [TOOL_CALLS]name[ARGS]{...}


def parse_tool_calls(text: str) -> ParsedOutput:
    """Find tool calls in model output, in each family's syntax:

        <tool_call>{"name": ..., "arguments": {...}}</tool_call>     Qwen 2.5 / Qwen3, Hermes, SmolLM3
        <|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>  Phi-4-mini
        [TOOL_CALLS][{"name": ..., "arguments": {...}}]              Mistral (and [TOOL_CALLS]name[ARGS]{...})
        <|python_tag|>{"name": ..., "parameters": {...}}             Llama 3.1+ (JSON calls ';'-separated)
        {"name": ..., "parameters": {...}}                           Llama 3.x JSON calls, or any bare call object

    A call object is {"name", "arguments" or "parameters"} or OpenAI's {"function": {"name", "arguments"}}, one or
    a list. Gemma has no tool-call syntax of its own (its prompts ask for one of these). Returns the text outside
    the calls, the calls, and a description of each malformed one (for the model to see)."""
    calls, errors = [], []
    for marker, pattern in _BLOCKS:
        if marker not in text:
            continue
        for block in pattern.findall(text):
            _parse_block(block.strip(), calls, errors)
        return ParsedOutput(pattern.sub("", text).strip(), calls, errors)
    for closing, opening in (("</tool_call>", "<tool_call>"), ("<|/tool_call|>", "<|tool_call|>")):
        if closing in text:  # a closing tag with no opening one: not an answer, a call that lost its start
            return ParsedOutput(text.replace(closing, "").strip(), [], [
                f"malformed tool call: {closing} without an opening {opening}; write "
                f'{opening}{{"name": ..., "arguments": {{...}}}}{closing} to call a tool, or answer without tags'])
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError:
            return ParsedOutput(text)
        items = data if isinstance(data, list) else [data]
        if items and all(isinstance(i, dict) and ("name" in i or "function" in i) for i in items):
            for item in items:
                _parse_call_json(json.dumps(item), calls, errors)
            return ParsedOutput("", calls, errors)
    return ParsedOutput(text)


def _parse_block(block: str, calls: list[ToolCall], errors: list[str]) -> None:
    """One tagged block: a call object, a list of them, ';'-separated objects (Llama), or name[ARGS]{...}."""
    named = _MISTRAL_ARGS.match(block)
    if named:
        block = json.dumps({"name": named.group(1), "arguments": _json_or_text(named.group(2).strip())})
    try:
        data = json.loads(block)
    except json.JSONDecodeError:
        parts = [p for p in block.split(";") if p.strip()]
        if len(parts) > 1:  # Llama: {...}; {...}
            for part in parts:
                _parse_call_json(part.strip(), calls, errors)
            return
        _parse_call_json(block, calls, errors)  # reports the JSON error
        return
    for item in data if isinstance(data, list) else [data]:
        _parse_call_json(json.dumps(item), calls, errors)


def _json_or_text(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw  # left for _parse_call_json to report as arguments that are not JSON


def _parse_call_json(raw: str, calls: list[ToolCall], errors: list[str]) -> None:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        errors.append(f"malformed tool call (invalid JSON: {exc}): {raw[:200]}")  # "...: line 1 column 2 (char 1)"
        return
    if isinstance(data, dict) and isinstance(data.get("function"), dict):
        data = {**data["function"], "id": data.get("id", "")}
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        errors.append(f"malformed tool call (expected {{\"name\": ..., \"arguments\": {{...}}}}): {raw[:200]}")
        return
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            errors.append(f"malformed tool call: arguments of {data['name']} are not valid JSON")
            return
    if not isinstance(arguments, dict):
        errors.append(f"malformed tool call: arguments of {data['name']} must be an object")
        return
    calls.append(ToolCall(data["name"], arguments, str(data.get("id", ""))))


@dataclass
class ToolResult:
    call: ToolCall | None
    output: str = ""
    error: str | None = None

    @property
    def text(self) -> str:
        """What the model sees as the observation."""
        return f"error: {self.error}" if self.error else self.output


def _check_arguments(tool: Tool, arguments: dict[str, Any]) -> str | None:
    schema = tool.parameters
    missing = [r for r in schema.get("required", []) if r not in arguments]
    if missing:
        return f"{tool.name} is missing required argument(s): {', '.join(missing)}"
    unknown = [a for a in arguments if a not in schema.get("properties", {})]
    if unknown and schema.get("additionalProperties") is not True:
        return (f"{tool.name} got unknown argument(s): {', '.join(unknown)}; it takes: "
                f"{', '.join(schema.get('properties', {})) or 'none'}")
    for argument, value in arguments.items():  # the JSON type each parameter's hint asks for (calls not decoded
        prop = schema.get("properties", {}).get(argument, {})  # under the grammar may differ)
        kind = prop.get("type") if isinstance(prop, dict) else None
        if isinstance(kind, str) and kind in _JSON_VALUE_CHECKS and not _JSON_VALUE_CHECKS[kind](value):
            return f"{tool.name}: argument '{argument}' must be {_ARTICLE.get(kind, 'a')} {kind}, got {json.dumps(value)}"
        if isinstance(prop, dict) and isinstance(prop.get("enum"), list) and value not in prop["enum"]:
            return (f"{tool.name}: argument '{argument}' must be one of {json.dumps(prop['enum'])[:200]}, got "
                    f"{json.dumps(value)}")
    return None


_JSON_VALUE_CHECKS = {  # JSON-schema type -> whether a decoded JSON value is of that type
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict),
}
_ARTICLE = {"integer": "an", "array": "an", "object": "an"}


def run_tool_call(call: ToolCall, tools: dict[str, Tool], timeout_s: float = 30.0) -> ToolResult:
    """Run one call isolated (its own daemon thread, stopped at ``timeout_s``); every failure becomes an error
    result the model can react to."""
    tool = tools.get(call.name)
    if tool is None:
        return ToolResult(call, error=f"unknown tool '{call.name}'; available tools: {', '.join(tools) or 'none'}")
    problem = _check_arguments(tool, call.arguments)
    if problem:
        return ToolResult(call, error=problem)

    try:
        values = {k: _from_json(tool.hints.get(k, Any), v) for k, v in call.arguments.items()}
    except Exception as exc:  # noqa: BLE001  an enum value or model field the type refuses
        return ToolResult(call, error=f"{tool.name}: an argument does not fit its type ({type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())[:300]})")

    def call_and_render(**arguments) -> str | _Untextual:  # rendering runs isolated too: __str__ may hang or raise
        value = tool.call(arguments)
        try:
            return _as_text(value)
        except Exception as exc:  # noqa: BLE001  the call succeeded; its value has no text
            return _Untextual(f"{tool.name} returned a {type(value).__name__} that cannot be turned into text "
                              f"({type(exc).__name__}: {exc}); return a str or JSON-like data")

    outcome = call_isolated(call_and_render, values, timeout_s, call.name)
    error = outcome.error or (outcome.value.reason if isinstance(outcome.value, _Untextual) else None)
    return ToolResult(call, error=error) if error else ToolResult(call, output=outcome.value)


@dataclass
class _Untextual:
    """A tool returned, but its value cannot be shown to the model as text: why."""
    reason: str


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:  # valid JSON: a NaN or infinity becomes its name, as a string
        return json.dumps(_finite(value), default=str, allow_nan=False)
    except (ValueError, TypeError, RecursionError):  # a circular structure, keys JSON cannot have, too deep
        return str(value)


def _finite(value: Any, depth: int = 0) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"  # JavaScript's names
    if depth < 32 and isinstance(value, dict):
        return {k: _finite(v, depth + 1) for k, v in value.items()}
    if depth < 32 and isinstance(value, (list, tuple)):
        return [_finite(v, depth + 1) for v in value]
    return value


def load_tool(spec: str) -> Tool:
    """The tool for ``module:function`` (the module imported with the current folder on the path). A module that
    is missing, fails to import (a syntax error, an exception or ``sys.exit`` while importing), a missing
    attribute, a non-callable or an unreadable signature is one AgentOptError that names the spec."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise AgentOptError(f"tool '{spec}' must be written MODULE:FUNCTION, e.g. mytools:search")
    if "/" in module_name or "\\" in module_name or module_name.endswith(".py"):
        stem = os.path.splitext(os.path.basename(module_name))[0]
        raise AgentOptError(f"tool '{spec}' names a file; give the module's name instead ({stem}:{name}), run from "
                            f"the folder that holds {stem}.py or with that folder on PYTHONPATH")
    # the current folder by its absolute name, and fresh finder caches: "." would share one cached directory
    # listing across chdir()s in a long-lived process
    sys.path.insert(0, os.getcwd())
    importlib.invalidate_caches()
    try:
        function = getattr(importlib.import_module(module_name), name)
    except AttributeError:
        raise AgentOptError(f"cannot load tool '{spec}': module '{module_name}' has no '{name}'") from None
    except SyntaxError as exc:
        raise AgentOptError(f"cannot load tool '{spec}': syntax error in {exc.filename}, line {exc.lineno}: "
                            f"{exc.msg}") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001  whatever the module does while importing
        raise AgentOptError(f"cannot load tool '{spec}': importing '{module_name}' raised "
                            f"{type(exc).__name__}: {exc}") from None
    finally:
        sys.path.pop(0)
    if not callable(function):
        raise AgentOptError(f"tool '{spec}' is not a function")
    try:
        return Tool.from_function(function)
    except AgentOptError as exc:
        raise AgentOptError(f"cannot load tool '{spec}': {exc}") from None
