"""`agentopt serve` end to end: a live server on a free localhost port, driven by the official openai client."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

import agentopt_compiler as ao  # noqa: E402
from agentopt_compiler.runtime.server import ChatService  # noqa: E402
from tests.helpers import API_KEY, Running  # noqa: E402

TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                           "parameters": {"type": "object", "properties": {}, "required": []}}}]


@pytest.fixture(scope="module")
def slotted_chat(chat_engine):
    return ao.load_engine(chat_engine.folder, slots=4)


@pytest.fixture(scope="module")
def server(slotted_chat):
    running = Running(slotted_chat)
    yield running
    running.http.stop()


@pytest.fixture()
def client(server):
    return server.client()


def _ask(client, text, max_tokens=12, **extra):
    return client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=max_tokens, **extra)


def test_models_and_a_completion_with_usage(client, chat_engine):
    assert [m.id for m in client.models.list().data] == ["tiny-random"]
    assert client.models.retrieve("tiny-random").id == "tiny-random"
    reply = _ask(client, "Hello there")
    assert reply.choices[0].finish_reason in ("length", "stop") and reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens == len(chat_engine.tokenizer.encode(
        "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False))


def test_streaming_gives_the_same_text_and_usage(client):
    whole = _ask(client, "Stream me").choices[0].message.content
    chunks = list(_ask(client, "Stream me", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])  # null until the last, as OpenAI
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_tool_call_round_trip(client):
    # a model with random weights never writes a tool call by itself; tool_choice naming a function that takes no
    # arguments leaves the grammar one call to write (all forced), which exercises the whole tool-call path of the API
    choice = {"type": "function", "function": {"name": "get_time"}}
    first = _ask(client, "What time is it?", max_tokens=64, tools=TOOLS, tool_choice=choice)
    assert first.usage.completion_tokens > 1  # the call's tokens are the answer's (fed in a few engine calls)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {} and call.id
    streamed = list(_ask(client, "What time is it?", max_tokens=64, tools=TOOLS, tool_choice=choice, stream=True))
    deltas = [c.choices[0].delta for c in streamed if c.choices]
    assert [d.tool_calls[0].function.name for d in deltas if d.tool_calls] == ["get_time"]
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "tool_calls"
    # the second half: the client ran the tool and sends the result back; the server renders it and answers
    history = [{"role": "user", "content": "What time is it?"}, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "12:00"}]
    second = client.chat.completions.create(model="tiny-random", messages=history, tools=TOOLS, temperature=0,
                                            max_tokens=8)
    assert second.choices[0].finish_reason in ("length", "stop", "tool_calls")
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # it continued the first conversation's cache


ANSWER_SCHEMA = {  # nested objects, enums, bounded numbers, arrays, optional keys
    "type": "object", "properties": {
        "city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]},
        "readings": {"type": "array", "items": {"type": "number", "minimum": -50, "maximum": 60}, "maxItems": 3},
        "station": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                                     "open": {"type": "boolean"}}, "required": ["id", "open"],
                    "additionalProperties": False},
        "note": {"type": "string", "maxLength": 5}},
    "required": ["city", "unit", "readings", "station"], "additionalProperties": False}  # closed: a random model
# would otherwise add keys of its own until max_tokens (valid JSON, but never finished)


def test_response_format_json_schema_answers_always_validate(client):
    jsonschema = pytest.importorskip("jsonschema")
    form = {"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER_SCHEMA}}
    for seed in range(4):  # random weights sampled at temperature 1: only the grammar makes these valid
        reply = client.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "Weather?"}], temperature=1.0, seed=seed,
            max_tokens=400, response_format=form)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), ANSWER_SCHEMA)
    reply = client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "JSON!"}],
                                           temperature=1.0, seed=9, max_tokens=200,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_strict_tools_and_required_tool_choice_give_calls_that_fit_the_schema(client):
    jsonschema = pytest.importorskip("jsonschema")
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"]}
    tools = [*TOOLS, {"type": "function", "function": {"name": "forecast", "strict": True, "parameters": params}}]
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "Forecast for Oslo?"}], temperature=1.0,
            seed=seed, max_tokens=200, tools=tools, tool_choice="required")
        assert reply.choices[0].finish_reason == "tool_calls"
        call = reply.choices[0].message.tool_calls[0]
        assert call.function.name in ("get_time", "forecast")
        if call.function.name == "forecast":
            jsonschema.validate(json.loads(call.function.arguments), params)


def test_auto_calls_name_an_offered_tool_with_arguments_that_fit_its_schema(server):
    """Under tool_choice auto, text is free and a call, once opened, names one of the offered tools with arguments
    its schema accepts, as agentopt run decodes them (a small model decoding freely called tools never offered:
    rack_of for "hello there"). A non-strict tool whose schema the grammar cannot use takes any JSON object."""
    from agentopt_compiler.runtime.constraints import Matcher
    from agentopt_compiler.runtime.server_api import ChatRequest

    days = {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"]}
    tools = [*TOOLS, {"type": "function", "function": {"name": "lookup", "parameters": days}}]
    service, tok = server.service, server.service.engine.tokenizer

    def accepts(tools, text):
        grammar = service.prepare(ChatRequest.model_validate({**GOOD, "tools": tools})).config.grammar
        ids = tok.encode(text, add_special_tokens=False)
        return Matcher(grammar, tok, service.vocab_size, service.engine.eos_token_ids).valid_prefix(ids) == len(ids)

    assert accepts(tools, 'Let me see. <tool_call>{"name": "lookup", "arguments": {"days": 3}}</tool_call>')
    assert accepts(tools, "No call at all.")
    assert not accepts(tools, '<tool_call>{"name": "rack_of", "arguments": {}}</tool_call>')
    assert not accepts(tools, '<tool_call>{"name": "lookup", "arguments": {"any": ["json"]}}</tool_call>')
    unusable = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                "required": ["a"]}
    loose = [{"type": "function", "function": {"name": "odd", "parameters": unusable}}]
    assert accepts(loose, '<tool_call>{"name": "odd", "arguments": {"any": ["json"]}}</tool_call>')
    status, body, _ = _post(server.url, {**GOOD, "tools": [{"type": "function", "function": {
        "name": "odd", "strict": True, "parameters": unusable}}]})
    assert status == 400 and body["error"]["param"] == "tools[0].function.parameters"  # strict: the schema or none
    assert "(tool 'odd') cannot constrain" in body["error"]["message"] and "property 'a'" in body["error"]["message"]
    strict_beside = [*TOOLS, {"type": "function", "function": {"name": "odd", "strict": True, "parameters": unusable}}]
    status, body, _ = _post(server.url, {**GOOD, "tools": strict_beside})  # it could never be called: refused too
    assert status == 400 and body["error"]["param"] == "tools[1].function.parameters"
    # text holding the call's closing tag, a special token: no JSON string can hold it (it failed mid-generation,
    # and took the requests decoding beside it down)
    tagged = {"type": "object", "properties": {"code": {"enum": ["</tool_call> code", "7"]}}, "required": ["code"]}
    for strict in (True, False):
        tools = [{"type": "function", "function": {"name": "code", "strict": strict, "parameters": tagged}}]
        if strict:
            status, body, _ = _post(server.url, {**GOOD, "tools": tools})
            assert status == 400 and "special token" in body["error"]["message"], body
        else:  # not strict: any JSON object, as for a schema the grammar cannot use
            assert accepts(tools, '<tool_call>{"name": "code", "arguments": {"other": 1}}</tool_call>')
    form = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"const": "<tool_call>"}}}
    status, body, _ = _post(server.url, {**GOOD, "response_format": form})
    assert status == 400 and body["error"]["param"] == "response_format.json_schema.schema"


def test_a_required_call_is_whole_at_any_max_tokens_that_fits_one_and_refused_below(client, server):
    jsonschema = pytest.importorskip("jsonschema")
    params = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
              "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "strict": True, "parameters": params}}]
    request = {**GOOD, "tools": tools, "tool_choice": "required", "temperature": 1.0}
    status, body, _ = _post(server.url, {**request, "max_tokens": 5})
    assert status == 400 and body["error"]["param"] == "max_tokens" and "too small" in body["error"]["message"]
    shortest = int(body["error"]["message"].split("takes ")[1].split()[0])
    for seed, max_tokens in enumerate((shortest, shortest + 3, shortest + 12)):  # a random model's string runs on:
        reply = client.chat.completions.create(  # the limit cuts it, and the call is closed in the tokens left
            model="tiny-random", messages=request["messages"], temperature=1.0, seed=seed, max_tokens=max_tokens,
            tools=tools, tool_choice="required")
        # finish reason "length" when the limit closed it (its string may be cut short), "tool_calls" otherwise
        assert reply.choices[0].finish_reason in ("tool_calls", "length")
        assert reply.usage.completion_tokens <= max_tokens
        jsonschema.validate(json.loads(reply.choices[0].message.tool_calls[0].function.arguments), params)


def test_tool_choice_none_answers_in_text(client, server):
    status, body, _ = _post(server.url, {**GOOD, "max_tokens": 12, "tools": TOOLS, "tool_choice": "none",
                                         "stop": ["zz"]})
    assert status == 200 and "tool_calls" not in body["choices"][0]["message"], body
    reply = client.chat.completions.create(model="tiny-random", messages=GOOD["messages"], max_tokens=12,
                                           tools=TOOLS, tool_choice="none", temperature=0)
    assert reply.choices[0].message.tool_calls is None and "<tool_call>" not in reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny-random", messages=GOOD["messages"], max_tokens=12,
                                                 tools=TOOLS, tool_choice="none", temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content


def test_chat_template_kwargs_reach_the_template(server, slotted_chat):
    from agentopt_compiler.runtime.chat import render_chat

    template = slotted_chat.tokenizer.chat_template
    slotted_chat.tokenizer.chat_template = template + "{% if greeting %}{{ greeting }}{% endif %}"
    try:
        request = {**GOOD, "max_tokens": 1, "chat_template_kwargs": {"greeting": "Hi!"}}
        status, body, _ = _post(server.url, request)
        assert status == 200
        with_greeting = render_chat(slotted_chat.tokenizer, GOOD["messages"], greeting="Hi!")
        assert body["usage"]["prompt_tokens"] == len(slotted_chat.tokenizer.encode(with_greeting,
                                                                                   add_special_tokens=False))
    finally:
        slotted_chat.tokenizer.chat_template = template


def test_multi_turn_requests_reuse_the_cache(client):
    first = _ask(client, "Tell me a story")
    history = [{"role": "user", "content": "Tell me a story"},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "Go on"}]
    second = client.chat.completions.create(model="tiny-random", messages=history, temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_concurrent_sessions_decode_together_with_the_tokens_they_get_alone(client, server):
    prompts = [f"Question number {i} about something else entirely" for i in range(6)]
    # 64 tokens each, whatever the random model writes: long enough that sessions overlap even when their requests
    # arrive a few steps apart on a loaded machine (at 20 tokens with early stops, CI once saw 1.5 rows per step)
    def ask(prompt):
        return _ask(client, prompt, max_tokens=64, extra_body={"ignore_eos": True}).choices[0].message.content

    alone = [ask(p) for p in prompts]
    steps, rows = server.service.scheduler.stats["decode_steps"], server.service.scheduler.stats["decode_rows"]
    with ThreadPoolExecutor(6) as pool:  # six sessions on four slots
        together = list(pool.map(ask, prompts))
    assert together == alone
    stats = server.service.scheduler.stats
    assert (stats["decode_rows"] - rows) / (stats["decode_steps"] - steps) > 1.5  # several sessions per step


def test_a_shared_system_prompt_is_prefilled_once(server):
    system = {"role": "system", "content": "You are a careful agent with a long list of rules. " * 6}
    before = dict(server.service.scheduler.stats)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: server.client().chat.completions.create(
            model="tiny-random", messages=[system, {"role": "user", "content": f"task {i}"}], max_tokens=4,
            temperature=0), range(4)))
    cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in replies)
    assert cached[0] < 50 and all(c > 200 for c in cached[1:])  # the first computed the head, the rest reused it
    assert server.service.scheduler.stats["reused_tokens"] - before["reused_tokens"] == sum(cached)


def _post(url, body=None, key=API_KEY, raw=None, headers=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + "/chat/completions", data=data, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


GOOD = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
MALFORMED = [  # (field changes, the param the error must name)
    ({"seed": "5"}, "seed"), ({"seed": -1}, "seed"), ({"temperature": "0.5"}, "temperature"), ({"temperature": -1}, "temperature"),
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": "high"}, "top_p"),
    ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 2.5}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"), ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"), ({"tools": "abc"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"), ({"tools": [{"function": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tool_choice": "sometimes"}, "tool_choice"), ({"tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"), ({"stop": 5}, "stop"), ({"stop": ["a"] * 5}, "stop"),
    ({"n": 2}, "n"), ({"presence_penalty": 1.0}, "presence_penalty"), ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"), ({"unknown_field": 1}, "unknown_field"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema.schema"),  # unsatisfiable
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "blob"}}}},
     "response_format.json_schema.schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "minLength": 3, "maxLength": 1}},
        "required": ["a"]}}}]}, "tools[0].function.parameters"),  # the strict tool's own schema is named
    ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"), ({"messages": [{"content": "x"}]},
                                                                     "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "{not json"}}]}]}, "messages[0].tool_calls"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"model": 5}, "model"), ({"model": None}, "model"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"), ({"chat_template_kwargs": 3},
                                                                          "chat_template_kwargs"),
    ({"stop": "}", "response_format": {"type": "json_object"}}, "stop"),  # it could only cut the JSON short
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"tools": [*TOOLS, *TOOLS]}, "tools"),  # two tools of one name
    ({"tools": []}, "tools"),  # no tools: leave the field out
    *[({"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]},
       "tools[0].function.parameters") for parameters in (
        {"type": "object", "properties": [1, 2]}, {"type": "object", "properties": {"a": 3}},
        {"type": "object", "required": "a"}, {"type": "array"})],
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "1"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "f", "arguments": "[1, 2]"}}]}]}, "messages[0].tool_calls"),  # JSON, but not an object
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),  # a lone surrogate
    ({"messages": [{"role": "user"}]}, "messages[0]"), ({"messages": [{"role": "user", "content": None}]},
                                                        "messages[0]"),  # a message that says nothing
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra"),  # named like the others
    ({"ignore_eos": True, "tools": TOOLS}, "ignore_eos"),  # a grammar says where the answer ends
    ({"ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0]"),
    ({"stop": ""}, "stop"), ({"stop": ["}", ""]}, "stop[1]"),  # a stop string of no text
    ({"chat_template_kwargs": {"deep": _nested(70)}}, "chat_template_kwargs.deep[0][0]"),  # over 64 levels
]


def test_malformed_fields_are_4xx_naming_the_field(server):
    for change, param in MALFORMED:
        status, body, _ = _post(server.url, {**GOOD, **change})
        assert status == 400 and body["error"]["param"] == param, (change, status, body)
        assert param.split("[")[0].split(".")[0] in body["error"]["message"]
    status, body, _ = _post(server.url, raw=b'{"model": "tiny-random", "messages": [], "temperature": NaN}')
    assert status == 400 and "NaN" in body["error"]["message"]
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b"", b"null", b"[" * 100000 + b"]" * 100000):
        status, body, _ = _post(server.url, raw=raw)
        assert status == 400 and body["error"]["code"] == "invalid_json"
    status, body, _ = _post(server.url, {**GOOD, "model": "gpt-4"})
    assert status == 404 and "'gpt-4' not found" in body["error"]["message"]
    status, body, _ = _post(server.url, {**GOOD, "messages": [{"role": "user", "content": "x" * 3000}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body, _ = _post(server.url, GOOD, key="no")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert _post(server.url, GOOD)[0] == 200  # and the server still answers
    assert server.idle()


def _raw_http(port, request: bytes, pause_s: float = 0.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        if pause_s:
            time.sleep(pause_s)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_bodies_too_large_slow_or_with_bad_lengths(slotted_chat):
    running = Running(slotted_chat, max_body_bytes=4096, read_timeout_s=0.5)
    try:
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                "Content-Type: application/json\r\nConnection: close\r\n")
        big = json.dumps({**GOOD, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        status, body, _ = _post(running.url, raw=big)
        assert status == 413 and body["error"]["code"] == "body_too_large"
        chunked = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"".join(
            f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in [big[i:i + 1000] for i in range(0, len(big),
                                                                                                   1000)]) + b"0\r\n\r\n"
        assert _raw_http(running.port, chunked).startswith(b"HTTP/1.1 413")  # no Content-Length to check first
        slow = _raw_http(running.port, (head + "Content-Length: 100\r\n\r\n{\"model\":").encode())
        assert slow.startswith(b"HTTP/1.1 408") and b"did not arrive" in slow
        for length in (b"-5", b"abc", b"99999999999999999999"):
            reply = _raw_http(running.port, head.encode() + b"Content-Length: " + length + b"\r\n\r\n{}")
            assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.1 413")), reply[:80]
        for method, path in (("GET", "/v1/chat/completions"), ("POST", "/v1/nothing")):
            reply = _raw_http(running.port, f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                            .encode())
            assert reply.split(b"\r\n")[0] in (b"HTTP/1.1 405 Method Not Allowed", b"HTTP/1.1 404 Not Found")
            assert b'"error"' in reply
    finally:
        running.http.stop()


def test_a_full_queue_answers_429_and_every_client_gets_an_answer(slotted_chat):
    running = Running(slotted_chat, max_waiting=4)
    try:
        def ask(i):
            return _post(running.url, {**GOOD, "messages": [{"role": "user", "content": f"client {i}"}],
                                       "max_tokens": 24, "temperature": 0})
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32)))
        statuses = sorted(status for status, _, _ in answers)
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses
        assert all(headers.get("retry-after") == "1" for status, _, headers in answers if status == 429)
        assert all(body["choices"][0]["message"]["content"] is not None for status, body, _ in answers
                   if status == 200)
        assert running.idle()
    finally:
        running.http.stop()


def test_client_disconnect_mid_stream_frees_its_slot(server):
    request = urllib.request.Request(server.url + "/chat/completions", data=json.dumps({
        "model": "tiny-random", "messages": [{"role": "user", "content": "A long answer please"}],
        "stream": True, "max_tokens": 1500, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    response = urllib.request.urlopen(request, timeout=30)
    response.readline()  # the first event arrived: generation is under way
    response.close()  # the client goes away
    assert server.idle()  # the scheduler cancelled it and freed the slot
    generated = server.service.scheduler.stats["generated_tokens"]
    time.sleep(0.3)
    assert server.service.scheduler.stats["generated_tokens"] == generated
    assert _post(server.url, {**GOOD, "messages": [{"role": "user", "content": "still there?"}]})[0] == 200


def test_a_non_streamed_request_whose_client_left_is_cancelled_while_tokens_flow():
    """Tokens arriving without pause must not keep the check for a gone client from running (it ran only after
    0.5 s without an event: a long answer held its slot to the end)."""
    import asyncio

    from agentopt_compiler.runtime.server import _respond

    closed = []

    async def tokens():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield {"delta": "x"}
        finally:
            closed.append(True)

    class GoneClient:
        async def is_disconnected(self):
            return True

    async def respond():
        return await asyncio.wait_for(_respond(tokens(), "m", GoneClient()), timeout=5)

    assert asyncio.run(respond()).status_code == 499 and closed == [True]


def test_health_and_prometheus_metrics(server):
    history = [{"role": "user", "content": "count the requests"}]
    first = server.client().chat.completions.create(model="tiny-random", messages=history, max_tokens=3)
    history += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "go"}]
    server.client().chat.completions.create(model="tiny-random", messages=history, max_tokens=3)  # a cached prefix
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health").read())
    assert health["status"] == "ok" and health["slots"] == 4
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics").read().decode()
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values["agentopt_slots"] == 4 and values["agentopt_queue_depth"] == 0
    assert values["agentopt_generated_tokens_total"] > 0 and values["agentopt_cached_prompt_tokens_total"] > 0
    assert "agentopt_generated_tokens_per_second" in values and "agentopt_busy_slots" in values


def test_prompt_lookup_serves_requests_with_the_same_greedy_text(slotted_chat, tmp_path):
    from agentopt_compiler.errors import AgentOptError

    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "echo echo echo echo"}],
            "temperature": 0, "max_tokens": 30}
    replies = []
    for lookup in (0, 4):
        running = Running(slotted_chat, prompt_lookup=lookup)
        try:
            replies.append(_post(running.url, body)[1]["choices"][0]["message"])
        finally:
            running.http.stop()
    assert replies[0] == replies[1]
    ring = ao.compile("tiny-random", out=tmp_path / "ring", context_length=256, sparse_attention="window=16")
    with pytest.raises(AgentOptError, match="ring caches"):
        ChatService(ring, prompt_lookup=65)  # more drafts than its rings have spare slots


def test_serve_cli_refuses_a_port_in_use_in_one_line(capsys, chat_engine):
    from tests.helpers import cli_error_line

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        line = cli_error_line(capsys, ["serve", str(chat_engine.folder), "--port", str(taken.getsockname()[1])])
    assert "cannot listen on 127.0.0.1" in line


def test_server_threads_do_not_outlive_stop(slotted_chat):
    before = threading.active_count()
    running = Running(slotted_chat)
    running.http.stop()
    time.sleep(0.2)
    assert threading.active_count() <= before


def _call(call_id):
    return {"id": call_id, "type": "function", "function": {"name": "get_time", "arguments": "{}"}}


ASKED = {"role": "user", "content": "time?"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [_call("a"), _call("b")]}
HISTORIES_THAT_NEVER_HAPPENED = [  # (messages, the message the error names)
    ([ASKED, {"role": "tool", "tool_call_id": "a", "content": "1"}], "messages[1]"),  # no call before it
    ([ASKED, CALLED, {"role": "tool", "tool_call_id": "c", "content": "1"}], "messages[2]"),  # no call of that id
    ([ASKED, CALLED, *[{"role": "tool", "tool_call_id": "a", "content": "1"}] * 2], "messages[3]"),  # answered twice
    ([ASKED, CALLED, {"role": "tool", "tool_call_id": "a", "content": "1"}, ASKED], "messages[1]"),  # b unanswered
    ([ASKED, CALLED], "messages[1]"),
    ([ASKED, {**CALLED, "tool_calls": [{**_call("a"), "id": None}, _call("b")]},  # the id-less call answered twice
      *[{"role": "tool", "tool_call_id": "x", "content": "1"}] * 2], "messages[3]"),
]


def test_tool_histories_that_never_happened_are_refused_and_replayed_messages_accepted(server, client):
    for messages, param in HISTORIES_THAT_NEVER_HAPPENED:
        status, body, _ = _post(server.url, {**GOOD, "tools": TOOLS, "messages": messages})
        assert status == 400 and body["error"]["param"] == param, (messages, body)
    idless = {**CALLED, "tool_calls": [{**_call("a"), "id": None}, _call("b")]}
    for order in ("bx", "xb"):  # a result answers its own call by id first, whatever the order
        history = [ASKED, idless, *[{"role": "tool", "tool_call_id": i, "content": "1"} for i in order]]
        assert _post(server.url, {**GOOD, "tools": TOOLS, "messages": history})[0] == 200, order
    answered = [ASKED, CALLED, *[{"role": "tool", "tool_call_id": i, "content": "12:00"} for i in "ba"]]
    reply = client.chat.completions.create(model="tiny-random", messages=answered, tools=TOOLS, max_tokens=4)
    # the openai client's own message, dumped whole (refusal, annotations, audio, function_call: None) and replayed
    replayed = [*answered, reply.choices[0].message.model_dump(), {"role": "user", "content": "and now?"}]
    if reply.choices[0].message.tool_calls:
        replayed[-1:-1] = [{"role": "tool", "tool_call_id": c.id, "content": "1"}
                           for c in reply.choices[0].message.tool_calls]
    assert _post(server.url, {**GOOD, "tools": TOOLS, "messages": replayed})[0] == 200
    status, body, _ = _post(server.url, {**GOOD, "messages": [{**ASKED, "role": "assistant", "audio": {"id": "x"}}]})
    assert status == 400 and body["error"]["param"] == "messages[0].audio"


def test_the_api_key_scheme_is_case_insensitive_and_the_key_is_not(server):
    for header, status in (("bearer test-key", 200), ("BEARER  test-key", 200), ("Bearer TEST-KEY", 401),
                           ("Basic test-key", 401), ("test-key", 401)):
        assert _post(server.url, GOOD, headers={"Authorization": header})[0] == status, header


def test_tool_choice_none_keeps_the_tools_in_the_prompt_and_stops_cut_calls_only_without_tools(server):
    from agentopt_compiler.runtime.generation import find_stop
    from agentopt_compiler.runtime.server_api import ChatRequest

    def prepared(**fields):
        return server.service.prepare(ChatRequest.model_validate({**GOOD, "stop": "*", **fields}))

    auto, none = prepared(tools=TOOLS), prepared(tools=TOOLS, tool_choice="none")
    assert none.ids == auto.ids and len(auto.ids) > len(prepared().ids)  # the same prompt, tools and all
    assert none.config.grammar is not None  # which keeps calls out
    assert auto.config.stops_skip_calls and not prepared().config.stops_skip_calls
    text = '<tool_call>{"name": "f", "arguments": {"x": "*"}}</tool_call>'
    assert find_stop(text, ["*"]) is None and find_stop(text, ["*"], skip_calls=False)[:2] == (text.index("*"), "*")
    # at an opening tag's first character a stop string would remove the call: not matched; at a closing tag's it
    # ends the step after the call, as an agent's "</tool_call>" does
    assert find_stop(text, ["<"])[:2] == (text.index("</tool_call>"), "<")
    assert find_stop(text, ["<tool"]) is None and find_stop(text, ["<tool_call>"]) is None
    assert find_stop("Sure. <tool", ["<tool"])[2] is False  # undecided until the tag is whole (or not one)


def test_no_system_or_user_message_is_left_out_of_the_prompt_silently(server):
    from types import SimpleNamespace

    from agentopt_compiler.agent_tiny.tasks import CHAT_TEMPLATE
    from agentopt_compiler.runtime.chat import render_chat
    from agentopt_compiler.runtime.server import _check_all_shown
    from agentopt_compiler.runtime.server_api import ApiError, ChatRequest

    def ids(*messages):
        return server.service.prepare(ChatRequest.model_validate({**GOOD, "messages": list(messages)})).ids

    # a developer message is a system message to a template that does not know the role
    assert ids({"role": "developer", "content": "Be brief."}, ASKED) == ids({"role": "system", "content": "Be brief."},
                                                                            ASKED)
    status, body, _ = _post(server.url, {**GOOD, "messages": [ASKED, {"role": "developer", "content": "Be brief."}]})
    assert status == 400 and "must come first" in body["error"]["message"]  # this template says so itself
    late = [{"role": "system", "content": "Be brief."}, ASKED, {"role": "system", "content": "Now in French."}]
    with pytest.raises(ApiError) as refused:  # a template that would drop one without a word
        _check_all_shown(late, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\ntime?<|im_end|>\n")
    assert refused.value.param == "messages[2]" and "leaves this system message out" in refused.value.message
    agent_tiny = SimpleNamespace(chat_template=CHAT_TEMPLATE, config={})  # agent-tiny's own shows it, as Qwen's do
    _check_all_shown(late, render_chat(agent_tiny, late, TOOLS))
