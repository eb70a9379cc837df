"""An OpenAI-compatible HTTP server over one engine (standard library only: no torch, no web framework).

    GET  /v1/models                 the served model
    POST /v1/chat/completions       messages, tools, tool_choice, stream (SSE), max_tokens, temperature, top_p,
                                    seed, stop; usage with the prompt tokens served from cache

The API is stateless (every request carries the whole conversation), so KV reuse works by matching: a pool of recent
conversations is kept, and each request continues the one whose cached tokens share the longest prefix with its
prompt (rewinding where the re-rendered history differs). Requests are served one at a time on the engine (one cache
buffer); each conversation's rows are saved and restored when another takes the engine, so there is no cross-talk.
A client that disconnects mid-stream stops its generation and frees its conversation. With ``prompt_lookup``
(``agentopt serve --prompt-lookup N``), requests decode with drafts from their own conversation (prompt_lookup.py):
fewer engine calls; greedy requests get the same text, sampled ones the same distribution.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from ..errors import AgentOptError, ContextOverflowError
from .chat import ChatTemplateError, render_chat
from .conversation import _common_prefix, check_prompt_lookup
from .engine import GenerationConfig
from .prefix_cache import PrefixCache
from .tokenizer import IncrementalDecoder
from .tools import parse_tool_calls


MIN_SHARED_PREFIX = 16  # tokens; shorter heads are not worth a prefix-cache entry


class ApiError(Exception):
    def __init__(self, status: HTTPStatus, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


def _bad_request(message: str, code: str | None = None) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, code)


class ChatService:
    """The request logic, independent of HTTP (the handler below is a thin shell over it)."""

    def __init__(self, engine, model_name: str | None = None, max_conversations: int = 8,
                 prefix_cache: PrefixCache | None = None, prompt_lookup: int = 0):
        if engine.tokenizer is None:
            raise AgentOptError("serving needs an engine with a tokenizer and chat template")
        self.engine = engine
        self.model_name = model_name or engine.manifest["model"]["name"]
        self.max_conversations = max_conversations
        self.prefix_cache = prefix_cache or PrefixCache()
        self.prompt_lookup = prompt_lookup  # drafts per decode call, for every request
        if prompt_lookup:
            check_prompt_lookup(engine.session, prompt_lookup)  # refuse at start, not at every greedy request
        self.conversations: list = []  # most recently used last
        self.lock = threading.Lock()
        self.created = int(time.time())

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "agentopt"}]}

    # -- request parsing ------------------------------------------------------------------------------------
    def _prepare(self, body: Any) -> tuple[list[int], int, str, GenerationConfig, bool]:
        if not isinstance(body, dict):
            raise _bad_request("the request body must be a JSON object")
        model = body.get("model")
        if model != self.model_name:
            raise ApiError(HTTPStatus.NOT_FOUND, f"model '{model}' not found; this server serves "
                                                 f"'{self.model_name}'", "model_not_found")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise _bad_request("'messages' must be a non-empty list of objects with a 'role'")
        tools = body.get("tools") or None
        choice = body.get("tool_choice", "auto" if tools else "none")
        offered = tools if choice != "none" else None
        # tool_choice is honoured by starting the answer for the model: "required" opens a call, a named function
        # opens a call to it, and a named function that takes no arguments is called outright
        forced, call_is_complete = "", False
        if tools and choice == "required":
            forced = "<tool_call>"
        elif tools and isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            chosen = next((t["function"] for t in tools if (t.get("function") or {}).get("name") == name), None)
            if chosen is None:
                raise _bad_request(f"tool_choice names '{name}', which is not among the tools")
            forced = '<tool_call>{"name": ' + json.dumps(name) + ', "arguments": '
            if not (chosen.get("parameters") or {}).get("properties"):
                forced, call_is_complete = forced + "{}}</tool_call>", True
        messages = [_normalize(m) for m in messages]
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=0)
        try:
            prompt = render_chat(self.engine.tokenizer, messages, offered) + forced
            # the history before the last user turn: the part other conversations are likely to share
            head = render_chat(self.engine.tokenizer, messages[:last_user], offered, add_generation_prompt=False) \
                if last_user else ""
        except ChatTemplateError as exc:
            raise _bad_request(str(exc)) from None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        stop = body.get("stop") or ()
        try:
            config = GenerationConfig(
                max_new_tokens=int(max_tokens) if max_tokens is not None else self.engine.context_length,
                temperature=float(body.get("temperature", 1.0)), top_p=float(body.get("top_p", 1.0)),
                seed=body.get("seed"), stop_strings=(stop,) if isinstance(stop, str) else tuple(stop),
                prompt_lookup=self.prompt_lookup)
        except (TypeError, ValueError, AgentOptError) as exc:
            raise _bad_request(f"invalid generation parameters: {exc}") from None
        if call_is_complete:
            config = GenerationConfig(max_new_tokens=0)
        ids = self.engine.tokenizer.encode(prompt, add_special_tokens=False)
        head_ids = self.engine.tokenizer.encode(head, add_special_tokens=False) if head else []
        head_length = len(head_ids) if ids[:len(head_ids)] == head_ids else 0
        return ids, head_length, forced, config, bool(offered)

    def _conversation_for(self, ids: list[int]):
        """The pooled conversation sharing the longest cached prefix with ``ids`` (or a new one)."""
        best = max(self.conversations, key=lambda c: _common_prefix(c.tokens[:c.cached], ids), default=None)
        if best is None or _common_prefix(best.tokens[:best.cached], ids) == 0:
            best = self.engine.conversation(self.prefix_cache)
            if len(self.conversations) >= self.max_conversations:
                self.conversations.pop(0).release()
        else:
            self.conversations.remove(best)
        self.conversations.append(best)
        return best

    # -- generation -----------------------------------------------------------------------------------------
    def complete(self, body: Any) -> Iterator[dict]:
        """Yield events: {"delta": text} pieces, then {"done": response fields}. Raises ApiError before the first."""
        ids, head_length, forced, config, tools_offered = self._prepare(body)
        with self.lock:
            conversation = self._conversation_for(ids)
            prefilled_before = conversation.prefilled_tokens
            try:
                logits = conversation.prefill_to(ids)
            except ContextOverflowError as exc:
                conversation.release()
                self.conversations.remove(conversation)
                raise _bad_request(str(exc), "context_length_exceeded") from None
            cached_tokens = len(ids) - (conversation.prefilled_tokens - prefilled_before)
            if head_length >= MIN_SHARED_PREFIX and self.prefix_cache.lookup(ids[:head_length])[0] != head_length:
                conversation.remember_prefix(head_length)
            decoder = IncrementalDecoder(self.engine.tokenizer)
            emitted, completion_tokens, reason = 0, 0, "length"
            tokens = conversation.generate(logits, config)
            try:
                while True:
                    try:
                        token = next(tokens)
                    except StopIteration as stop:
                        reason = stop.value or "length"
                        break
                    completion_tokens += 1
                    decoder.push(token)
                    hit = min((decoder.text.find(s) for s in config.stop_strings if s in decoder.text), default=-1)
                    end = hit if hit >= 0 else len(decoder.text)
                    if end > emitted:
                        yield {"delta": decoder.text[emitted:end]}
                        emitted = end
                    if hit >= 0:
                        reason = "stop"
                        break
            except GeneratorExit:  # the client went away: free its conversation
                tokens.close()
                conversation.release()
                self.conversations.remove(conversation)
                raise
            tokens.close()
        text = forced + decoder.text[:emitted]
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = {"stop": "stop", "length": "length", "context": "length"}[reason]
        if tools_offered:
            parsed = parse_tool_calls(text)
            if parsed.calls:
                message = {"role": "assistant", "content": parsed.content or None, "tool_calls": [
                    {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                     "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in parsed.calls]}
                finish = "tool_calls"
        yield {"done": {"message": message, "finish_reason": finish, "usage": {
            "prompt_tokens": len(ids), "completion_tokens": completion_tokens,
            "total_tokens": len(ids) + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}}}


def _normalize(message: dict) -> dict:
    """OpenAI wire format -> template input: tool-call arguments as objects, missing content as ''."""
    out = dict(message)
    if out.get("content") is None:
        out["content"] = ""
    if isinstance(out.get("content"), list):  # content parts: keep the text ones
        out["content"] = "".join(p.get("text", "") for p in out["content"] if isinstance(p, dict))
    calls = []
    for call in out.get("tool_calls") or []:
        function = dict(call.get("function") or {})
        if isinstance(function.get("arguments"), str):
            try:
                function["arguments"] = json.loads(function["arguments"] or "{}")
            except json.JSONDecodeError:
                raise _bad_request(f"tool call {call.get('id', '')} has arguments that are not valid JSON") from None
        calls.append({**call, "function": function})
    if calls:
        out["tool_calls"] = calls
    return out


class _Handler(BaseHTTPRequestHandler):
    service: ChatService
    api_key: str | None
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one quiet line per request on stderr
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        if not self.api_key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {self.api_key}":
            return True
        self._send_json(401, {"error": {"message": "missing or wrong API key (Authorization: Bearer ...)",
                                        "type": "invalid_request_error", "code": "invalid_api_key"}})
        return False

    def do_GET(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, self.service.models())
        elif self.path.rstrip("/") == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error",
                                            "code": None}})

    def do_POST(self):
        if not self._authorized():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error",
                                            "code": None}})
            return
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._send_json(400, _bad_request(f"invalid JSON body: {exc}").body())
            return
        events = self.service.complete(body)
        try:
            first = next(events)
        except ApiError as exc:
            self._send_json(exc.status, exc.body())
            return
        except AgentOptError as exc:
            self._send_json(400, _bad_request(str(exc)).body())
            return
        stream = isinstance(body, dict) and bool(body.get("stream"))
        (self._stream if stream else self._respond)(body, first, events)

    def _respond(self, body, first, events) -> None:
        text = []
        for event in _chain(first, events):
            if "delta" in event:
                text.append(event["delta"])
            else:
                done = event["done"]
        self._send_json(200, {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                              "created": int(time.time()), "model": self.service.model_name,
                              "choices": [{"index": 0, "message": done["message"],
                                           "finish_reason": done["finish_reason"]}],
                              "usage": done["usage"]})

    def _stream(self, body, first, events) -> None:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        tools_offered = bool(body.get("tools")) and body.get("tool_choice") != "none"
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict | None, finish=None, usage=None) -> dict:
            out = {"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                   "model": self.service.model_name,
                   "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
            if usage is not None:
                out["usage"] = usage
            return out

        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            self._sse(chunk({"role": "assistant", "content": ""}))
            held = ""  # with tools, text from "<tool_call>" on is held back and sent as tool_calls at the end
            for event in _chain(first, events):
                if "delta" in event:
                    held += event["delta"]
                    send, held = _split_visible(held) if tools_offered else (held, "")
                    if send:
                        self._sse(chunk({"content": send}))
                    continue
                done = event["done"]
                message = done["message"]
                if message.get("tool_calls"):
                    self._sse(chunk({"tool_calls": [{"index": i, **call}
                                                     for i, call in enumerate(message["tool_calls"])]}))
                elif held:
                    self._sse(chunk({"content": held}))
                self._sse(chunk({}, done["finish_reason"]))
                if include_usage:
                    self._sse(chunk(None, usage=done["usage"]))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            events.close()  # stops generation and frees the conversation

    def _sse(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


def _chain(first, rest):
    yield first
    yield from rest


def _split_visible(text: str) -> tuple[str, str]:
    """Split streamed text into what can be shown now and what must be held back: everything from a
    ``<tool_call>`` marker on, or a trailing piece that may be the start of one."""
    marker = "<tool_call>"
    at = text.find(marker)
    if at >= 0:
        return text[:at], text[at:]
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return text[:-keep], text[-keep:]
    return text, ""


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                verbose: bool = False) -> ThreadingHTTPServer:
    handler = type("Handler", (_Handler,), {"service": service, "api_key": api_key})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.verbose = verbose
    return server
