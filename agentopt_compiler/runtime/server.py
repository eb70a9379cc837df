"""An OpenAI-compatible HTTP server over one engine: FastAPI on uvicorn, continuous batching underneath (no torch).

    GET  /v1/models, /v1/models/{id}   the served model
    POST /v1/chat/completions          messages, tools, tool_choice, stream (SSE), max_tokens, temperature, top_p,
                                       seed, stop; usage with the prompt tokens served from cache
    GET  /health                       liveness, slots and queue
    GET  /metrics                      Prometheus text: queue depth, busy slots, tokens/s, prefix-cache hit tokens

Requests are validated field by field (server_api.py): anything malformed is a JSON 400 naming the field; bodies
over the size limit are 413, bodies that do not arrive in time 408, and a full queue is 429 with Retry-After.

Every request becomes a scheduler request (scheduler.py): sessions decode together, one batched call per step, each
in its own KV slot. The API is stateless (every request carries the whole conversation), so KV reuse works by
matching: a request continues the pooled conversation that caches the longest prefix of its prompt beyond the part
sessions share, and that shared part (system prompt and tool schemas) comes from the prefix cache. A client that
disconnects stops its generation and frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, AsyncIterator

from starlette.requests import Request  # route signatures are resolved at module level (postponed annotations)

from ..errors import AgentOptError
from .chat import ChatTemplateError, render_chat
from .constraints import (Grammar, call_syntax, check_grammar, check_writable, json_schema_grammar, no_call_grammar,
                          reasoning_left, tool_call_grammar)
from .conversation import check_prompt_lookup
from .generation import GenerationConfig, TokenPicker
from .prefix_cache import PrefixCache
from .scheduler import MIN_SHARED_PREFIX, QueueFullError, Scheduler
from .server_api import ApiError, ChatRequest, check_tool_history, load_json, parse_chat_request
from .tools import parse_tool_calls

@dataclass
class PreparedChat:
    """A validated request, rendered and tokenized."""

    request: ChatRequest
    ids: list[int]
    shared_prefix: int  # tokens of the system turn (system prompt and tools): what other sessions likely share
    config: GenerationConfig
    tools_offered: bool
    call_open: str  # the model family's tool-call opening tag (streamed text from it on is held back)
    short_call_ids: bool = False  # ids of 9 alphanumerics, as Mistral's templates demand (else call_ + 24 hex)
    picker: TokenPicker | None = None  # built here when a grammar constrains it (the scheduler uses it as it is)


# the arguments of a non-strict tool whose schema the call grammar cannot use: any JSON object (a schema without
# additionalProperties would be closed by the call grammar, constraints._strict_object)
ANY_OBJECT = {"type": "object", "additionalProperties": True}


class ChatService:
    """The request logic, independent of HTTP (the app below is a thin shell over it)."""

    def __init__(self, engine, model_name: str | None = None, prompt_lookup: int = 0, prefill_chunk: int = 64,
                 max_waiting: int = 64, prefix_cache_bytes: int = 256 << 20):
        if engine.tokenizer is None:
            raise AgentOptError("serving needs an engine with a tokenizer and chat template")
        self.engine = engine
        self.model_name = model_name or engine.manifest["model"]["name"]
        self.prompt_lookup = prompt_lookup  # drafts per decode call, for every request
        # KV of system turns shared by sessions; 0 bytes: none (each session prefills its own)
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
        self._usable_schemas: dict[str, bool] = {}  # a tool schema's JSON -> whether the call grammar can use it
        self.scheduler = Scheduler(engine, prefill_chunk=prefill_chunk, max_waiting=max_waiting,
                                   prefix_cache=self.prefix_cache)
        if prompt_lookup:  # refuse at start, not at every request
            check_prompt_lookup(engine.session, GenerationConfig(prompt_lookup=prompt_lookup).prompt_lookup)
        self.created = int(time.time())
        template = engine.tokenizer.chat_template
        self.call_syntax = call_syntax(template)
        self.reasoning = ("<think>", "</think>") if template and "<think>" in template else None
        # Mistral's templates refuse a conversation whose tool call ids are not 9 alphanumerics
        self.short_call_ids = bool(template) and "|length != 9" in template
        self.vocab_size = engine.manifest["model"]["config"]["vocab_size"]

    def start(self) -> "ChatService":
        self.scheduler.start()
        return self

    def stop(self) -> None:
        self.scheduler.stop()

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "agentopt"}

    # -- a request ------------------------------------------------------------------------------------------------
    def prepare(self, request: ChatRequest) -> PreparedChat:
        if request.model != self.model_name:
            raise ApiError(HTTPStatus.NOT_FOUND, f"model '{request.model}' not found; this server serves "
                                                 f"'{self.model_name}'", "model_not_found", "model")
        tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
        choice = request.tool_choice or ("auto" if tools else "none")
        offered = tools if choice != "none" else None
        if choice == "required" and not tools:
            raise ApiError(HTTPStatus.BAD_REQUEST, "tool_choice 'required' needs tools", "invalid_value",
                           "tool_choice")
        if not isinstance(choice, str) and not any(t["function"]["name"] == choice.function.name
                                                   for t in tools or ()):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"tool_choice names '{choice.function.name}', which is not "
                                                   "among the tools", "invalid_value", "tool_choice")
        messages = [_template_message(m, i) for i, m in enumerate(request.messages)]
        check_tool_history(request.messages)
        template = self.engine.tokenizer.chat_template if self.engine.tokenizer is not None else None
        if template and "developer" not in template:
            # OpenAI's newer name for system messages: a template that does not know it shows it as system
            messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
        # the system turn (with the tool schemas) is what sessions share: the prefix cache holds its KV
        system = next((i for i, m in enumerate(messages) if m["role"] not in ("system", "developer")), len(messages))
        tokenizer = self.engine.tokenizer
        try:
            variables = request.chat_template_kwargs or {}
            # tool_choice none keeps the tools in the prompt (as OpenAI does): the model still reads them, and the
            # conversation's cached prefix is the same as under auto; the grammar keeps calls out
            prompt = render_chat(tokenizer, messages, tools, **variables)
            head = render_chat(tokenizer, messages[:system], tools, add_generation_prompt=False,
                               **variables) if system else ""
        except ChatTemplateError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value", "messages") from None
        _check_all_shown(messages, prompt)
        grammar = self._grammar(request, offered, choice if isinstance(choice, str) else choice.function.name,
                                reasoning_left(prompt, self.reasoning))
        try:
            ids = self.engine.encode(prompt, add_special_tokens=False)
        except AgentOptError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value", "messages") from None
        if len(ids) >= self.engine.context_length:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"the conversation is {len(ids)} tokens and this engine's context "
                                                   f"holds {self.engine.context_length} (prompt plus at least one "
                                                   "new token); shorten the messages", "context_length_exceeded",
                           "messages")
        head_ids = self.engine.encode(head, add_special_tokens=False) if head else []
        shared = len(head_ids) if len(head_ids) >= MIN_SHARED_PREFIX and ids[:len(head_ids)] == head_ids else 0
        max_tokens = request.max_completion_tokens or request.max_tokens or self.engine.context_length
        stop = request.stop or ()
        if request.ignore_eos and grammar is not None:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"ignore_eos cannot be combined with {grammar.what}: the grammar "
                                                   "says where the answer ends; drop ignore_eos", "invalid_value",
                           "ignore_eos")
        try:  # (every field is range-checked already: what is left is stop strings against a JSON answer)
            config = GenerationConfig(
                max_new_tokens=max_tokens, grammar=grammar,
                temperature=1.0 if request.temperature is None else request.temperature,
                top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed,
                stop_strings=(stop,) if isinstance(stop, str) else tuple(stop), stops_skip_calls=bool(offered),
                prompt_lookup=self.prompt_lookup,
                ignore_eos=bool(request.ignore_eos))
        except AgentOptError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value", "stop") from None
        picker = None
        if grammar is not None:  # a required call or JSON answer that max_tokens leaves no room for: say so now
            try:
                picker = self.engine.token_picker(config)
            except AgentOptError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value", "max_completion_tokens"
                               if request.max_completion_tokens else "max_tokens") from None
        return PreparedChat(request, ids, shared, config, bool(offered), self.call_syntax.open, self.short_call_ids,
                            picker)

    def _grammar(self, request: ChatRequest, tools: list[dict] | None, choice: str,
                 reasoning: tuple[str, str] | None) -> Grammar | None:
        """What constrains the answer: response_format json_object / json_schema; tool_choice required or named
        (a call first); otherwise, with tools, free text and then calls that name one of them; tool_choice none with
        tools (text, no call). None: free text (no tools). A call's arguments fit its tool's schema, as in
        ``agentopt run``; a tool that is not ``strict`` and whose schema the grammar cannot use (``_schema_usable``)
        takes any JSON object, as OpenAI's non-strict tools promise no more. A grammar llguidance cannot build (a
        strict tool's unsatisfiable schema, a malformed regex) is a 400 naming the field."""
        form = request.response_format
        strict = tools is not None and any(t["function"].get("strict") for t in tools)
        constrains_calls = tools is not None and (choice != "auto" or strict)
        if form is not None and form.type != "text" and constrains_calls:
            raise ApiError(HTTPStatus.BAD_REQUEST, "response_format json_object/json_schema together with "
                                                   "tool_choice 'required', a named tool or strict tools is not "
                                                   "supported yet; send one of them", "invalid_value",
                           "response_format")
        if form is not None and form.type == "json_schema":
            try:
                check_writable(form.json_schema.schema_, self.engine.tokenizer, "response_format.json_schema.schema")
            except AgentOptError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value",
                               "response_format.json_schema.schema") from None
            grammar, param = json_schema_grammar(form.json_schema.schema_, "response_format.json_schema.schema"), \
                "response_format.json_schema.schema"
        elif form is not None and form.type == "json_object":
            grammar, param = json_schema_grammar({"type": "object"}, "response_format json_object"), \
                "response_format"
        elif choice == "none" and request.tools:  # the tools are not shown, and no call may be written either
            grammar, param = no_call_grammar(self.call_syntax), "tool_choice"
        elif tools is not None:
            self._refuse_unusable_strict_tools(tools)
            functions = [t if t["function"].get("strict") or self._schema_usable(t) else
                         {**t, "function": {**t["function"], "parameters": ANY_OBJECT}} for t in tools]
            param = "tools"
            grammar = tool_call_grammar(functions, self.call_syntax, self.engine.tokenizer, choice, reasoning,
                                        parallel=request.parallel_tool_calls is not False)
        else:
            return None
        try:
            check_grammar(grammar, self.engine.tokenizer, self.vocab_size, self.engine.eos_token_ids)
        except AgentOptError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, str(exc), "invalid_value", param) from None
        return grammar

    def _refuse_unusable_strict_tools(self, tools: list[dict]) -> None:
        """A strict tool promises calls that fit its schema: one the grammar cannot use (unsatisfiable, or naming
        text no call can write) is a 400 naming it, also beside other tools (among which it could never be
        called)."""
        for index, tool in enumerate(tools):
            function = tool["function"]
            if not function.get("strict") or self._schema_usable(tool):
                continue
            what = f"tools[{index}].function.parameters (tool '{function['name']}')"
            reason = AgentOptError(f"{what} cannot constrain decoding")
            try:
                parameters = function.get("parameters") or {"type": "object"}
                check_writable(parameters, self.engine.tokenizer, what)
                check_grammar(json_schema_grammar(parameters, what), self.engine.tokenizer, self.vocab_size,
                              self.engine.eos_token_ids)
            except AgentOptError as exc:
                reason = exc
            raise ApiError(HTTPStatus.BAD_REQUEST, str(reason), "invalid_value", f"tools[{index}].function.parameters")

    def _schema_usable(self, tool: dict) -> bool:
        """Whether the call grammar can use this tool's schema (remembered per schema: clients send the same tools
        with every request)."""
        key = json.dumps(tool["function"].get("parameters"), sort_keys=True, default=str)
        if key not in self._usable_schemas:
            if len(self._usable_schemas) >= 4096:  # bounded, whatever clients send
                self._usable_schemas.clear()
            try:
                check_grammar(tool_call_grammar([tool], self.call_syntax, self.engine.tokenizer, "required"),
                              self.engine.tokenizer, self.vocab_size, self.engine.eos_token_ids)
                self._usable_schemas[key] = True
            except AgentOptError:
                self._usable_schemas[key] = False
        return self._usable_schemas[key]

    def submit(self, prepared: PreparedChat, on_event):
        """Queue ``prepared`` on the scheduler; a full queue is a 429."""
        try:
            return self.scheduler.submit(prepared.ids, prepared.config, on_event,
                                         shared_prefix=prepared.shared_prefix, picker=prepared.picker)
        except QueueFullError as exc:
            raise ApiError(HTTPStatus.TOO_MANY_REQUESTS, str(exc), "rate_limit_exceeded") from None

    @staticmethod
    def final_message(prepared: PreparedChat, text: str, reason: str) -> tuple[dict, str]:
        """The assistant message (tool calls parsed out when tools were offered) and the OpenAI finish reason:
        ``tool_calls`` when the message ended after its calls, ``length`` when a limit ended it (a call the grammar
        closed early at the limit is valid, but its arguments may be cut short: the client must be able to tell)."""
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = "length" if reason in ("length", "context") else "stop"
        if prepared.tools_offered:
            parsed = parse_tool_calls(text)
            if parsed.calls:
                message = {"role": "assistant", "content": parsed.content or None, "tool_calls": [
                    {"id": uuid.uuid4().hex[:9] if prepared.short_call_ids else f"call_{uuid.uuid4().hex[:24]}",
                     "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.arguments)}}
                    for c in (parsed.calls[:1] if prepared.request.parallel_tool_calls is False else parsed.calls)]}
                finish = "tool_calls" if finish == "stop" else finish
        return message, finish

    @staticmethod
    def usage(done: dict) -> dict:
        usage = done["usage"]
        return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]}}

    def metrics(self) -> dict:
        """What /metrics reports, read at scrape time."""
        scheduler, slots = self.scheduler, self.engine.slots
        return {"queue_depth": scheduler.waiting, "active_requests": scheduler.active,
                "slots": slots.count, "busy_slots": sum(h is not None and h.busy for h in slots.holders),
                "tokens_per_second": scheduler.recent_tokens_per_second(),
                "prefix_cache_bytes": self.prefix_cache.bytes_used if self.prefix_cache else 0,
                "evicted_host_bytes": slots.host_bytes_used, **scheduler.stats,
                "evictions": slots.evictions, "dropped_sessions": slots.drops}


def _check_all_shown(messages: list[dict], prompt: str) -> None:
    """Every system, developer and user message's text is in the prompt: a chat template that leaves one out (a
    second system message, one after the first turn) would answer a conversation the client did not send."""
    for index, message in enumerate(messages):
        text = message["content"].strip()
        if message["role"] in ("system", "developer", "user") and text and text not in prompt:
            fix = ("give one system message, at the start of the conversation" if message["role"] != "user" else
                   "check the order of the messages' roles")
            raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}]: this model's chat template leaves this "
                                                   f"{message['role']} message out of the prompt; {fix}",
                           "invalid_value", f"messages[{index}]")


def _template_message(message, index: int) -> dict:
    """OpenAI wire format -> template input: tool-call arguments as objects, content parts joined, None as ''."""
    out = message.model_dump(exclude_none=True)
    content = message.content
    out["content"] = "".join(p.text or "" for p in content) if isinstance(content, list) else (content or "")
    calls = []
    for call in out.get("tool_calls") or []:
        function = dict(call["function"])
        if isinstance(function["arguments"], str):
            try:
                function["arguments"] = load_json(function["arguments"] or "{}")
            except ValueError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}]: tool call {call.get('id') or ''} has "
                                                       f"arguments that are not valid JSON ({exc})", "invalid_value",
                               f"messages[{index}].tool_calls") from None
        if not isinstance(function["arguments"], dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, f"messages[{index}]: tool call {call.get('id') or ''} has "
                                                   "arguments that are not a JSON object", "invalid_value",
                           f"messages[{index}].tool_calls")
        calls.append({**call, "function": function})
    if calls:
        out["tool_calls"] = calls
    return out


def split_visible(text: str, call_open: str = "<tool_call>") -> tuple[str, str]:
    """Split streamed text into what can be shown now and what must be held back: everything from a tool call's
    opening tag on, or a trailing piece that may be the start of one."""
    at = text.find(call_open)
    if at >= 0:
        return text[:at], text[at:]
    for keep in range(min(len(call_open) - 1, len(text)), 0, -1):
        if call_open.startswith(text[-keep:]):
            return text[:-keep], text[-keep:]
    return text, ""


async def chat_events(service: ChatService, request: ChatRequest) -> AsyncIterator[dict]:
    """A request's life as response events: {"accepted"} once queued, {"delta": text} as visible text arrives
    (with tools offered, text from a ``<tool_call>`` marker on is held back), then {"final": {"message",
    "finish_reason", "usage", "held"}}; or {"error": {"status", "body"}} (a 4xx before "accepted", or a failure
    later). Closing the iterator before "final" cancels the request (the client went away) and frees its slot."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    try:
        prepared = await asyncio.to_thread(service.prepare, request)
        scheduled = service.submit(prepared, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    except ApiError as exc:
        yield {"error": {"status": exc.status, "body": exc.body()}}
        return
    finished = False
    try:
        yield {"accepted": True}
        held = ""
        while True:
            event = await events.get()
            if "error" in event:
                finished = True
                error = _as_api_error(event["error"])
                yield {"error": {"status": error.status, "body": error.body()}}
                return
            if "done" in event:
                finished = True
                message, finish = service.final_message(prepared, event["text"], event["done"])
                yield {"final": {"message": message, "finish_reason": finish, "usage": service.usage(event),
                                 "held": held}}
                return
            held += event["text"]
            send, held = split_visible(held, prepared.call_open) if prepared.tools_offered else (held, "")
            if send:
                yield {"delta": send}
    finally:
        if not finished:
            scheduled.cancel()
            service.scheduler.wake()


def _as_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    status = HTTPStatus.INTERNAL_SERVER_ERROR if str(error).startswith("internal error") else HTTPStatus.BAD_REQUEST
    return ApiError(status, str(error))


class LocalBackend:
    """What the HTTP layer serves in one process: the ChatService and its scheduler thread."""

    def __init__(self, service: ChatService):
        self.service, self.model_name = service, service.model_name

    def start(self) -> None:
        self.service.start()

    def stop(self) -> None:
        self.service.stop()

    def models(self) -> dict:
        return self.service.models()

    def chat(self, request: ChatRequest) -> AsyncIterator[dict]:
        return chat_events(self.service, request)

    async def health(self) -> dict:
        metrics = self.service.metrics()
        return {"status": "ok", "slots": metrics["slots"], "busy_slots": metrics["busy_slots"],
                "queue_depth": metrics["queue_depth"]}

    async def metrics_text(self) -> bytes:
        from .metrics import prometheus_text

        return prometheus_text(self.service.metrics(), self.model_name)


def make_app(backend, api_key: str | None = None, max_body_bytes: int = 4 << 20, read_timeout_s: float = 30.0):
    """The FastAPI application over a backend (LocalBackend, or serve_ray's replicas): the backend is started and
    stopped with the app."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(_app):
        backend.start()
        try:
            yield
        finally:
            backend.stop()

    app = FastAPI(title="agentopt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, body: dict) -> JSONResponse:
        headers = {"Retry-After": "1"} if status == HTTPStatus.TOO_MANY_REQUESTS else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return error(exc.status, exc.body())

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown routes and methods, in the same JSON shape
        return error(exc.status_code, ApiError(exc.status_code, f"{exc.detail}: {request.method} "
                                                                f"{request.url.path}").body())

    @app.exception_handler(Exception)
    async def internal_error(_request, exc: Exception):
        return error(500, ApiError(500, f"internal error: {type(exc).__name__}: {exc}").body())

    def authorize(request: Request) -> None:
        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        # the scheme is case-insensitive (RFC 7235); the key is compared in constant time
        if api_key and (scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode())):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "missing or wrong API key (Authorization: Bearer ...)",
                           "invalid_api_key")

    @app.get("/health")
    async def health():
        return await backend.health()

    @app.get("/metrics")
    async def metrics():
        return Response(await backend.metrics_text(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return backend.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        card = next((m for m in backend.models()["data"] if m["id"] == model_id), None)
        if card is None:
            raise ApiError(HTTPStatus.NOT_FOUND, f"model '{model_id}' not found", "model_not_found")
        return card

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        chat = parse_chat_request(await _read_body(request, max_body_bytes, read_timeout_s))
        if chat.model != backend.model_name:
            raise ApiError(HTTPStatus.NOT_FOUND, f"model '{chat.model}' not found; this server serves "
                                                 f"'{backend.model_name}'", "model_not_found", "model")
        events = backend.chat(chat)
        first = await anext(events)
        if "error" in first:  # refused before it was queued: a 4xx with the reason
            return error(first["error"]["status"], first["error"]["body"])
        if chat.stream:
            return StreamingResponse(_sse(events, backend.model_name, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _respond(events, backend.model_name, request)

    return app


async def _read_body(request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if declared.isdigit() else HTTPStatus.BAD_REQUEST
        raise ApiError(status, f"request body of {declared} bytes; this server takes at most {limit}",
                       "body_too_large" if declared.isdigit() else "invalid_content_length")
    chunks, size = [], 0

    async def collect():
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {limit} bytes",
                               "body_too_large")
            chunks.append(chunk)

    from starlette.requests import ClientDisconnect

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except ClientDisconnect:  # nobody will read the answer; said so rather than logged as a traceback
        raise ApiError(HTTPStatus.BAD_REQUEST, "the client went away before its request body arrived",
                       "client_disconnected") from None
    except asyncio.TimeoutError:
        raise ApiError(HTTPStatus.REQUEST_TIMEOUT, f"the request body did not arrive within {timeout_s:g}s",
                       "timeout") from None
    return b"".join(chunks)


DISCONNECT_CHECK_SECONDS = 0.25  # how often a non-streamed request asks whether its client is still there


async def _respond(events: AsyncIterator[dict], model: str, request):
    """The whole answer as one JSON response; a client that goes away meanwhile cancels its request."""
    from fastapi.responses import JSONResponse

    pending = asyncio.ensure_future(anext(events))
    checked = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait([pending], timeout=DISCONNECT_CHECK_SECONDS)
            if not done or time.monotonic() - checked >= DISCONNECT_CHECK_SECONDS:  # also while tokens flow
                checked = time.monotonic()
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)  # nobody reads it; closing ``events`` cancels
                if not done:
                    continue
            event = pending.result()
            if "error" in event:
                return JSONResponse(event["error"]["body"], status_code=event["error"]["status"])
            if "final" in event:
                final = event["final"]
                return JSONResponse({
                    "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                    "model": model, "choices": [{"index": 0, "message": final["message"],
                                                 "finish_reason": final["finish_reason"]}],
                    "usage": final["usage"]})
            pending = asyncio.ensure_future(anext(events))
    finally:
        if not pending.done():  # cancelled inside the generator, which then cancels the request
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await events.aclose()


async def _sse(events: AsyncIterator[dict], model: str, chat: ChatRequest):
    """Server-sent events in the OpenAI chunk format: a role chunk, content chunks, tool calls, the finish reason,
    usage when ``stream_options.include_usage``, then [DONE]."""
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = chat.stream_options is not None and chat.stream_options.include_usage

    def sse(delta: dict | None, finish=None, usage=None) -> str:
        out = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:  # null on every chunk but the last, as OpenAI sends them
            out["usage"] = usage
        return f"data: {json.dumps(out)}\n\n"

    try:
        yield sse({"role": "assistant", "content": ""})
        async for event in events:
            if "delta" in event:
                yield sse({"content": event["delta"]})
            elif "error" in event:
                yield f"data: {json.dumps(event['error']['body'])}\n\n"
                return
            elif "final" in event:
                final = event["final"]
                if final["message"].get("tool_calls"):
                    yield sse({"tool_calls": [{"index": i, **call}
                                              for i, call in enumerate(final["message"]["tool_calls"])]})
                elif final["held"]:
                    yield sse({"content": final["held"]})
                yield sse({}, final["finish_reason"])
                if include_usage:
                    yield sse(None, usage=final["usage"])
                yield "data: [DONE]\n\n"
                return
    finally:
        await events.aclose()  # before "final": the client went away, and closing cancels the request


class HttpServer:
    """uvicorn serving an app on a socket bound here (a port in use is one clear error): ``run()`` in this thread
    (the CLI), or ``start()`` in a background thread (tests, benchmarks). Port 0 picks a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False):
        import socket

        import uvicorn

        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.socket = socket.socket(family, socket.SOCK_STREAM)
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
        except (OSError, OverflowError) as exc:
            raise AgentOptError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
        self.host, self.port = host, self.socket.getsockname()[1]
        config = uvicorn.Config(app, log_level="info" if verbose else "warning", access_log=verbose,
                                timeout_keep_alive=5, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        self.server.run(sockets=[self.socket])

    def start(self) -> int:
        self._thread = threading.Thread(target=self.run, name="agentopt-http", daemon=True)
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise AgentOptError(f"the HTTP server on {self.host}:{self.port} did not start")
            time.sleep(0.02)
        return self.port

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
