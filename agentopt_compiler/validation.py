"""Small explicit validators for the JSON that reaches us from outside: config.json, plan files, engine manifests.

A schema is built from a handful of specs and checked in one call; the first problem becomes one line that names
the file, the field and the fix:

    CONFIG = record({"hidden_size": integer(minimum=1), "rms_norm_eps": number(above=0)})
    check(data, CONFIG, source="ckpt/config.json", fix="correct config.json", error=ModelNotFoundError)
    -> ModelNotFoundError: ckpt/config.json: hidden_size must be an integer >= 1, got "sixty-four"; correct ...

Why our own ~150 lines rather than pydantic or jsonschema: manifests are validated on the deploy side, which we keep
to onnxruntime + numpy + tokenizers (pydantic would add a compiled dependency and ~0.2 s of import to every
``agentopt run``; jsonschema pulls in several packages); our schemas are small and mostly flat; and every message
must end in a fix specific to the file (recompile the engine, rerun ``agentopt plan``, correct config.json), which
we would have to re-word from either library's errors anyway. This module imports nothing heavy.
"""

from __future__ import annotations

import codecs
import json
import math
from pathlib import Path
from typing import Any, Callable

from .errors import AgentOptError


class Invalid(Exception):
    """One problem at ``path`` inside a document (internal: ``check`` turns it into the caller's error)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path} {problem}" if path else problem)


class Spec:
    """A check of one value: ``validate(value, path)`` returns the value (possibly normalized) or raises Invalid."""

    description = "a value"

    def validate(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def fail(self, value: Any, path: str) -> Invalid:
        return Invalid(path, f"must be {self.description}, got {shown(value)}")


def shown(value: Any) -> str:
    """A short rendering of a bad value for an error message (JSON spelling, cut at 40 characters)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Integer(Spec):
    def __init__(self, minimum: int | None, maximum: int | None, choices: tuple[int, ...] | None):
        self.minimum, self.maximum, self.choices = minimum, maximum, choices
        bounds = (f"from {minimum} to {maximum}" if minimum is not None and maximum is not None else
                  f">= {minimum}" if minimum is not None else f"<= {maximum}" if maximum is not None else "")
        self.description = (f"one of {', '.join(map(str, choices))}" if choices else
                            str(minimum) if minimum is not None and minimum == maximum else
                            f"an integer {bounds}".strip())

    def validate(self, value, path):
        # bool is an int in Python but never a count in our files; JSON 2.0 is accepted as 2
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if (not isinstance(value, int) or isinstance(value, bool)
                or (self.minimum is not None and value < self.minimum)
                or (self.maximum is not None and value > self.maximum)
                or (self.choices and value not in self.choices)):
            raise self.fail(value, path)
        return value


class _Number(Spec):
    def __init__(self, minimum: float | None, above: float | None, maximum: float | None):
        self.minimum, self.above, self.maximum = minimum, above, maximum
        parts = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
                 f"<= {maximum:g}" if maximum is not None else ""]
        self.description = " ".join(["a finite number", *filter(None, parts)])

    def validate(self, value, path):
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or (self.minimum is not None and value < self.minimum)
                or (self.above is not None and value <= self.above)
                or (self.maximum is not None and value > self.maximum)):
            raise self.fail(value, path)
        return value


class _Simple(Spec):
    def __init__(self, kind: type, description: str, choices: tuple | None = None):
        self.kind, self.choices = kind, choices
        self.description = (description if not choices else json.dumps(choices[0]) if len(choices) == 1
                            else f"one of {', '.join(map(json.dumps, choices))}")

    def validate(self, value, path):
        if not isinstance(value, self.kind) or (self.choices and value not in self.choices):
            raise self.fail(value, path)
        return value


class _Optional(Spec):
    def __init__(self, inner: Spec):
        self.inner, self.description = inner, f"{inner.description} or null"

    def validate(self, value, path):
        return None if value is None else self.inner.validate(value, path)


class _OneOf(Spec):
    """The first spec that accepts the value (e.g. an id or a list of ids)."""

    def __init__(self, *options: Spec):
        self.options = options
        self.description = " or ".join(o.description for o in options)

    def validate(self, value, path):
        for option in self.options:
            try:
                return option.validate(value, path)
            except Invalid:
                continue
        raise self.fail(value, path)


class _ListOf(Spec):
    def __init__(self, item: Spec, length: int | None, min_length: int):
        self.item, self.length, self.min_length = item, length, min_length
        size = f"{length} " if length is not None else "non-empty " if min_length else ""
        self.description = f"a {size}list, each {item.description}"

    def validate(self, value, path):
        if not isinstance(value, list) or (self.length is not None and len(value) != self.length) \
                or len(value) < self.min_length:
            raise self.fail(value, path)
        return [self.item.validate(v, f"{path}[{i}]") for i, v in enumerate(value)]


class _MapOf(Spec):
    """An object whose keys are names (validated by ``key``) and whose values all follow ``value``."""

    def __init__(self, value: Spec, key: Callable[[str], str | None] | None, min_length: int):
        self.value, self.key, self.min_length = value, key, min_length
        self.description = f"{'a non-empty' if min_length else 'an'} object whose values are each {value.description}"

    def validate(self, data, path):
        if not isinstance(data, dict) or len(data) < self.min_length:
            raise self.fail(data, path)
        for name in data:
            problem = self.key(name) if self.key else None
            if problem:
                raise Invalid(path, f"key {shown(name)} {problem}")
        return {name: self.value.validate(v, f"{path}[{json.dumps(name)}]") for name, v in data.items()}


class Record(Spec):
    """An object with known fields. ``extra``: "forbid" (unknown keys are errors: typos in hand-written files)
    or "keep" (files written by other tools carry keys we do not read)."""

    description = "an object"

    def __init__(self, fields: dict[str, Spec], required: tuple[str, ...] = (), extra: str = "forbid",
                 check: Callable[[dict, str], None] | None = None):
        self.fields, self.required, self.extra, self.check = fields, required, extra, check

    def validate(self, data, path):
        if not isinstance(data, dict):
            raise self.fail(data, path)
        missing = [name for name in self.required if name not in data]
        if missing:
            raise Invalid(path, f"lacks the field '{missing[0]}'")
        unknown = [name for name in data if name not in self.fields]
        if unknown and self.extra == "forbid":
            raise Invalid(path, f"unknown field {shown(unknown[0])}; known fields: {', '.join(self.fields)}")
        out = dict(data)
        for name, spec in self.fields.items():
            if name in data:
                out[name] = spec.validate(data[name], _join(path, name))
        if self.check:  # relations between fields, once each field is known to be well-typed
            self.check(out, path)
        return out


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else str(name)


def integer(minimum: int | None = None, maximum: int | None = None, choices: tuple[int, ...] | None = None) -> Spec:
    return _Integer(minimum, maximum, choices)


def number(minimum: float | None = None, above: float | None = None, maximum: float | None = None) -> Spec:
    return _Number(minimum, above, maximum)


def boolean() -> Spec:
    return _Simple(bool, "true or false")


def string(choices: tuple[str, ...] | None = None) -> Spec:
    return _Simple(str, "a string", choices)


def anything_object() -> Spec:
    return _Simple(dict, "an object")


def optional(spec: Spec) -> Spec:
    return _Optional(spec)


def one_of(*specs: Spec) -> Spec:
    return _OneOf(*specs)


def list_of(item: Spec, length: int | None = None, min_length: int = 0) -> Spec:
    return _ListOf(item, length, min_length)


def map_of(value: Spec, key: Callable[[str], str | None] | None = None, min_length: int = 0) -> Spec:
    return _MapOf(value, key, min_length)


def record(fields: dict[str, Spec], required: tuple[str, ...] = (), extra: str = "forbid",
           check: Callable[[dict, str], None] | None = None) -> Record:
    return Record(fields, required, extra, check)


def check(data: Any, spec: Spec, source: str, fix: str, error: type[AgentOptError] = AgentOptError) -> Any:
    """``data`` validated by ``spec``; the first problem raises ``error("<source>: <field> <problem>; <fix>")``."""
    try:
        return spec.validate(data, "")
    except Invalid as problem:
        raise error(f"{source}: {problem}; {fix}") from None


def read_text(path: Path, what: str, fix: str, error: type[AgentOptError] = AgentOptError,
              max_bytes: int | None = None) -> str:
    """A text file's content (its first ``max_bytes``, cut at a whole character, when given: what a caller needs
    of a large file); a missing, unreadable or non-UTF-8 file raises ``error`` naming the file."""
    try:
        if max_bytes is not None:
            with open(path, "rb") as handle:
                return codecs.getincrementaldecoder("utf-8")().decode(handle.read(max_bytes), final=False)
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} '{path}' does not exist; {fix}") from None
    except IsADirectoryError:
        raise error(f"{what} '{path}' is a folder, not a file; {fix}") from None
    except OSError as exc:
        raise error(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise error(f"{what} '{path}' is not UTF-8 text; {fix}") from None


def read_json(path: Path, what: str, fix: str, error: type[AgentOptError] = AgentOptError) -> Any:
    """A JSON file's content; unreadable, undecodable or malformed files raise ``error`` naming the file."""
    text = read_text(path, what, fix, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                    f"{fix}") from None
    except RecursionError:
        raise error(f"{what} '{path}' nests too deeply to be a {what}; {fix}") from None
