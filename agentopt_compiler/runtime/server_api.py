"""The OpenAI chat-completions request, as the server accepts it: every field typed and range-checked (pydantic).

Anything else is refused with the field named (``ApiError`` -> a JSON 4xx): a string seed, a NaN temperature,
``tools: "abc"``, a ``tool_choice`` naming no tool, fields this server does not implement (``n`` > 1, logprobs,
penalties, response formats other than text), and fields OpenAI does not have. Nothing is accepted silently.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator, model_validator

Number = Annotated[float, Field(allow_inf_nan=False, strict=True)]  # ints are numbers too; strings, NaN are not


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = int(status), message, code, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; absent: the function takes no arguments
    strict: StrictBool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object_schema(cls, value):
        """The parts of the schema chat templates and the call grammar read must have their JSON-schema types (a
        schema without ``properties``, or a property without ``type``, is fine: templates show it as it is)."""
        if value is None:
            return value
        if "type" in value and value["type"] != "object":
            raise ValueError(f"a function's parameters are a JSON schema of type 'object', not {value['type']!r}")
        properties = value.get("properties", {})
        if not isinstance(properties, dict) or not all(isinstance(v, (dict, bool)) for v in properties.values()):
            raise ValueError("'properties' must be an object mapping each parameter name to its JSON schema")
        required = value.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise ValueError("'required' must be a list of parameter names")
        return value


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class CalledFunction(_Strict):
    name: StrictStr
    arguments: StrictStr | dict[str, Any]


class ToolCall(_Strict):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # image parts etc. are refused below, by type
    type: StrictStr
    text: StrictStr | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None
    # what the openai client's ChatCompletionMessage.model_dump() carries back into the next request: accepted as
    # it comes (null, or annotations: notes on the text that change nothing in the prompt); audio and the
    # deprecated function_call are not implemented, so anything but null there is refused by name
    refusal: StrictStr | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None

    @model_validator(mode="after")
    def _says_something(self):
        """Only an assistant message that makes tool calls may come without content (as in OpenAI's API)."""
        if (self.content is None or self.content == []) and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"{'an' if self.role == 'assistant' else 'a'} {self.role} message needs its 'content'"
                             + (" (or 'tool_calls')" if self.role == "assistant" else ""))
        return self


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class JsonSchemaFormat(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    schema_: Annotated[dict[str, Any], Field(alias="schema")] = {}  # "schema" would shadow BaseModel's method
    strict: StrictBool | None = None


class ResponseFormat(_Strict):
    """text (free), json_object (any JSON object) or json_schema (JSON valid for the schema): the last two are
    decoded under a grammar (constraints.py), so the answer always parses and validates."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object: {\"name\": ..., \"schema\": {...}}")
        return self


class ChatRequest(_Strict):
    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1)]
    tools: Annotated[list[ToolDefinition], Field(min_length=1)] | None = None  # [] is refused, as OpenAI does
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=4)] | None = None  # "" would stop nothing
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None  # one choice per request
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None  # not implemented: only the neutral 0
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    logprobs: Literal[False] | None = None
    response_format: ResponseFormat | None = None
    user: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    store: Literal[False] | None = None
    ignore_eos: StrictBool | None = False  # vLLM's extension: generate max_tokens tokens whatever the model ends with
    # vLLM's / SGLang's extension: extra chat-template variables, e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables_do_not_replace_the_conversation(cls, value):
        taken = sorted(set(value or ()) & RESERVED_TEMPLATE_VARIABLES)
        if taken:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(taken)}: the request's own fields do")
        return value


RESERVED_TEMPLATE_VARIABLES = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"}


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The request body as a ChatRequest, or an ApiError naming the first problem (its field as ``param``)."""
    try:
        data = load_json(raw)
    except ValueError as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc}", "invalid_json",
                       getattr(exc, "path", None)) from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object", "invalid_json")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if request.stream_options is not None and not request.stream:
        raise ApiError(HTTPStatus.BAD_REQUEST, "stream_options is only allowed with stream: true", "invalid_value",
                       "stream_options")
    names = [tool.function.name for tool in request.tools or ()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"tools: each tool needs its own name; {', '.join(repeated)} is given "
                                               "more than once", "invalid_value", "tools")
    for index, message in enumerate(request.messages):
        if message.role == "tool" and message.tool_call_id is None:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}]: a tool message needs the tool_call_id of the "
                                                   "call it answers", "missing_required_parameter",
                           f"messages[{index}].tool_call_id")
        for part in message.content if isinstance(message.content, list) else ():
            if part.type != "text" or part.text is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}].content: only text parts are supported, "
                                                       f"got a '{part.type}' part", "invalid_value",
                               f"messages[{index}].content")
    return request


def check_tool_history(messages: list[Message]) -> None:
    """Tool messages answer the calls of the assistant message right before them, each call once, and every call is
    answered before the conversation goes on (OpenAI's rule: a prompt built from anything else shows the model a
    history that never happened). Calls without ids are matched by count."""
    calls_at, unanswered = None, []  # the assistant message whose calls are being answered, and its open call ids

    def refuse(message: str, index: int):
        raise ApiError(HTTPStatus.BAD_REQUEST, message, "invalid_value", f"messages[{index}]")

    for index, message in enumerate(messages):
        if message.role == "tool":
            if calls_at is None:
                refuse(f"messages[{index}]: a tool message must follow the assistant message whose tool call it "
                       "answers (or that call's other results); none comes before it", index)
            # its own call by id; else a call without an id (matched by count)
            call = message.tool_call_id if message.tool_call_id in unanswered else None if None in unanswered else ...
            if call is ...:
                refuse(f"messages[{index}]: tool_call_id '{message.tool_call_id}' answers none of the still "
                       f"unanswered calls of messages[{calls_at}]"
                       + (f" ({', '.join(map(str, unanswered))})" if unanswered else " (all are answered)"), index)
            unanswered.remove(call)
            continue
        if unanswered:
            break
        calls_at, unanswered = (index, [c.id for c in message.tool_calls]) if message.tool_calls else (None, [])
    if unanswered:
        refuse(f"messages[{calls_at}] makes tool calls that no tool message answers "
               f"({', '.join(map(str, unanswered))}); send each call's result as a tool message with its "
               "tool_call_id right after it", calls_at)


MAX_JSON_DEPTH = 64  # nesting of objects and lists: deeper is refused (it would only exhaust Python's stack later)


class JsonValueError(ValueError):
    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


def load_json(text: str | bytes) -> Any:
    """``json.loads`` for what clients send: no NaN/Infinity, nesting at most MAX_JSON_DEPTH, and no lone UTF-16
    surrogates in strings (``"\\ud800"`` parses, but no tokenizer or UTF-8 encoder takes it). Raises ValueError
    (JsonValueError with ``path``, the offending field, where one is known)."""
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except RecursionError:
        raise JsonValueError(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    _check_json_value(value)
    return value


def _check_json_value(value: Any, path: str = "", depth: int = 0) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise JsonValueError(f"{path or 'a string'} holds a lone UTF-16 surrogate (\\ud800-\\udfff without its "
                                 "pair), which is not text", path or None) from None
        return
    if not isinstance(value, (dict, list)):
        return
    if depth >= MAX_JSON_DEPTH:
        raise JsonValueError(f"{path or 'the value'} is nested more than {MAX_JSON_DEPTH} levels deep", path or None)
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(key, str):
            _check_json_value(key, path or "a key", depth + 1)
        if depth < 4:  # errors name the field a few levels down (messages[0].content), not a 64-level path
            item_path = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        else:
            item_path = path
        _check_json_value(item, item_path, depth + 1)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _validation_error(exc: ValidationError) -> ApiError:
    """One problem pydantic found, as one line naming the field. Of the errors a union's branches give, the one
    that got furthest into the value says most (a ``tool_choice`` object without its function, not "should be
    'auto'"), and a broken constraint more than a wrong type."""
    first_field = exc.errors()[0]["loc"][:1]
    errors = [e for e in exc.errors() if e["loc"][:1] == first_field]
    error = max(errors, key=lambda e: (len(e["loc"]), not e["type"].endswith("_type")))
    path = _field_path(error["loc"])
    if error["type"] == "extra_forbidden":
        parent, unknown = _field_path(error["loc"][:-1]), str(error["loc"][-1])  # the unknown name itself is kept
        path = f"{parent}.{unknown}" if parent else unknown
        return ApiError(HTTPStatus.BAD_REQUEST, f"unrecognized request argument '{path}'", "unknown_parameter", path)
    if error["type"] == "missing":
        return ApiError(HTTPStatus.BAD_REQUEST, f"'{path}' is required", "missing_required_parameter", path)
    hint = _UNSUPPORTED.get(path.split(".")[0].split("[")[0])
    value = json.dumps(error.get("input"), default=str)
    value = value if len(value) <= 60 else value[:57] + "..."
    message = f"invalid value for '{path}': {value} ({error['msg'][:1].lower() + error['msg'][1:]})" + (f"; {hint}" if hint else "")
    return ApiError(HTTPStatus.BAD_REQUEST, message, "invalid_value", path)


_UNSUPPORTED = {
    "n": "this server returns one choice per request",
    "presence_penalty": "penalties are not implemented (only 0)",
    "frequency_penalty": "penalties are not implemented (only 0)",
    "logprobs": "log probabilities are not implemented",
    "response_format": "use {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", "
                       "\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
    "store": "stored completions are not supported",
}


def _field_path(location: tuple) -> str:
    """('messages', 0, 'content', 'str') -> 'messages[0].content': pydantic's union branch names are dropped."""
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _FIELD_NAMES:
            path += ("." if path else "") + part
    return path


_FIELD_NAMES = {name for model in (ChatRequest, Message, ToolDefinition, FunctionDefinition, ToolCall,
                                   CalledFunction, ContentPart, NamedToolChoice, NamedFunction, StreamOptions,
                                   ResponseFormat, JsonSchemaFormat) for name in model.model_fields} | {"schema"}
