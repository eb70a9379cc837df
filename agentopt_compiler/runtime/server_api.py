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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Strict):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


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
    refusal: StrictStr | None = None  # echoed back by clients that replay assistant messages


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
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None  # one choice per request
    presence_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None  # not implemented: only the neutral 0
    frequency_penalty: Annotated[Number, Field(ge=0, le=0)] | None = None
    logprobs: Literal[False] | None = None
    response_format: ResponseFormat | None = None
    user: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    store: Literal[False] | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: generate max_tokens tokens whatever the model ends with
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
        data = json.loads(raw, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"invalid JSON body: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object", "invalid_json")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    for index, message in enumerate(request.messages):
        for part in message.content if isinstance(message.content, list) else ():
            if part.type != "text" or part.text is None:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}].content: only text parts are supported, "
                                                       f"got a '{part.type}' part", "invalid_value",
                               f"messages[{index}].content")
    return request


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
        path = ".".join(str(p) for p in error["loc"])
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
