"""`agentopt serve` end to end: a live server on a free localhost port, driven by the official openai client."""

import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from agentopt_compiler.runtime.server import ChatService, make_server  # noqa: E402

API_KEY = "test-key"
TOOLS = [{"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                           "parameters": {"type": "object", "properties": {}, "required": []}}}]


@pytest.fixture(scope="module")
def server(chat_engine):
    service = ChatService(chat_engine)
    httpd = make_server(service, "127.0.0.1", 0, api_key=API_KEY)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", service
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=API_KEY, max_retries=0, timeout=60)


def _ask(client, text, max_tokens=12, **extra):
    return client.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=max_tokens, **extra)


def test_models_and_a_completion_with_usage(client, chat_engine):
    assert [m.id for m in client.models.list().data] == ["tiny-random"]
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
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_tool_call_round_trip(client):
    # a model with random weights never writes a tool call by itself; tool_choice naming a function that takes no
    # arguments makes the server call it outright, which exercises the whole tool-call path of the API
    choice = {"type": "function", "function": {"name": "get_time"}}
    first = _ask(client, "What time is it?", tools=TOOLS, tool_choice=choice)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {} and call.id
    streamed = list(_ask(client, "What time is it?", tools=TOOLS, tool_choice=choice, stream=True))
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


def test_multi_turn_requests_reuse_the_cache(client):
    first = _ask(client, "Tell me a story")
    history = [{"role": "user", "content": "Tell me a story"},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "Go on"}]
    second = client.chat.completions.create(model="tiny-random", messages=history, temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_concurrent_requests_do_not_share_kv(client):
    prompts = [f"Question number {i} about something else entirely" for i in range(4)]
    sequential = [_ask(client, p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda p: _ask(client, p).choices[0].message.content, prompts))
    assert concurrent == sequential


def _post(url, body, key=API_KEY, raw=None):
    request = urllib.request.Request(url + "/chat/completions", data=raw if raw is not None else json.dumps(
        body).encode(), headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_bad_requests(server):
    url = server[0]
    status, body = _post(url, None, raw=b"{not json")
    assert status == 400 and "invalid JSON body" in body["error"]["message"]
    status, body = _post(url, {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert status == 404 and "'gpt-4' not found" in body["error"]["message"]
    status, body = _post(url, {"model": "tiny-random", "messages": "hi"})
    assert status == 400 and "messages" in body["error"]["message"]
    status, body = _post(url, {"model": "tiny-random", "messages": [{"role": "user", "content": "x" * 3000}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    status, body = _post(url, {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}]}, key="no")
    assert status == 401


def test_client_disconnect_mid_stream_frees_its_conversation(server):
    url, service = server
    request = urllib.request.Request(url + "/chat/completions", data=json.dumps({
        "model": "tiny-random", "messages": [{"role": "user", "content": "A long answer please"}],
        "stream": True, "max_tokens": 1500, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    response = urllib.request.urlopen(request, timeout=30)
    response.readline()  # the first event arrived: generation is under way
    response.close()  # the client goes away
    for _ in range(100):  # the server notices at its next write, stops, and frees the conversation
        if service.lock.acquire(timeout=0.1):
            service.lock.release()
            break
    assert not any(c.tokens[-1:] and len(c.tokens) > 1000 for c in service.conversations)
    assert _post(url, {"model": "tiny-random", "messages": [{"role": "user", "content": "still there?"}],
                       "max_tokens": 2})[0] == 200


def test_prompt_lookup_serves_requests_with_the_same_greedy_text(chat_engine, tmp_path):
    import agentopt_compiler as ao
    from agentopt_compiler.errors import AgentOptError

    body = {"model": "tiny-random", "messages": [{"role": "user", "content": "echo echo echo echo"}],
            "temperature": 0, "max_tokens": 30}
    plain = list(ChatService(chat_engine).complete(dict(body)))[-1]["done"]
    service = ChatService(chat_engine, prompt_lookup=4)
    assert list(service.complete(dict(body)))[-1]["done"]["message"] == plain["message"]
    assert service._prepare(dict(body))[3].prompt_lookup == 4
    assert service._prepare({**body, "temperature": 0.7})[3].prompt_lookup == 4  # sampled requests draft too
    ring = ao.compile("tiny-random", out=tmp_path / "ring", context_length=256, sparse_attention="window=16")
    with pytest.raises(AgentOptError, match="ring caches"):
        ChatService(ring, prompt_lookup=65)  # more drafts than its rings have spare slots
