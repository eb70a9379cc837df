"""`agentopt serve --replicas N`: two engine replicas behind Ray Serve on a local Ray instance (127.0.0.1 only),
driven by the official openai client."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from agentopt_compiler.runtime.serve_ray import PREFIX_ROUTER, build_application  # noqa: E402


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ray_server(chat_engine):
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(str(chat_engine.folder), replicas=2, threads=1, slots=2,
                                    app_options={"api_key": "k"}, cpus_per_replica=0.5),
                  name="agentopt", route_prefix="/")
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_the_router_is_ray_serves_prefix_affinity_router():
    module, name = PREFIX_ROUTER.split(":")
    router = getattr(__import__(module, fromlist=[name]), name)
    from ray.serve._private.request_router.request_router import RequestRouter

    assert issubclass(router, RequestRouter)


def test_sigterm_stops_the_replicas_as_ctrl_c_does(chat_engine, tmp_path):
    """A service manager stops the server with SIGTERM: Serve and Ray shut down and the exit is 0 (Ray's core worker
    answered it with a native stack dump, leaving the local Ray instance running). Runs before ``ray_server`` starts
    its own Ray instance in this process."""
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "agentopt_compiler.cli.main", "serve",
                                    str(chat_engine.folder), "--replicas", "1", "--threads", "1",
                                    "--port", str(_free_port())], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while "Ctrl-C stops" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Ctrl-C stops" in log.read_text(), log.read_text()[-2000:]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=180) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
    err = log.read_text()
    assert "stopping the replicas" in err and "SIGTERM received" not in err


def test_replicas_serve_the_same_api_and_keep_a_conversation_on_its_replica(ray_server):
    client = ray_server
    assert [m.id for m in client.models.list().data] == ["tiny-random"]
    system = {"role": "system", "content": "You are an agent that follows the rules below. " * 4}
    sessions = [[system, {"role": "user", "content": f"session {i} starts with its own words"}] for i in range(4)]
    previous = [0] * len(sessions)
    for turn in range(3):
        for index, history in enumerate(sessions):
            reply = client.chat.completions.create(model="tiny-random", messages=history, max_tokens=6,
                                                   temperature=0)
            # the turn went to the replica that holds the conversation's KV: the whole previous prompt was cached
            # there (another replica holds at most the shared system prompt, through its prefix cache)
            assert reply.usage.prompt_tokens_details.cached_tokens >= previous[index]
            previous[index] = reply.usage.prompt_tokens
            history += [{"role": "assistant", "content": reply.choices[0].message.content},
                        {"role": "user", "content": f"observation {turn}"}]
    streamed = list(client.chat.completions.create(model="tiny-random", messages=sessions[0], max_tokens=6,
                                                   temperature=0, stream=True, stream_options={"include_usage": True}))
    whole = client.chat.completions.create(model="tiny-random", messages=sessions[0], max_tokens=6, temperature=0)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == whole.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_tools_and_errors_through_the_replicas(ray_server):
    tools = [{"type": "function", "function": {"name": "get_time", "description": "Current time.",
                                               "parameters": {"type": "object", "properties": {}}}}]
    reply = ray_server.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "time?"}],
                                               tools=tools, tool_choice={"type": "function",
                                                                         "function": {"name": "get_time"}})
    assert reply.choices[0].finish_reason == "tool_calls"
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {}
    with pytest.raises(openai.BadRequestError, match="seed"):
        ray_server.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x"}],
                                           extra_body={"seed": "five"})
    with pytest.raises(openai.BadRequestError, match="context"):
        ray_server.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "x" * 5000}])
    # a field whose Python name differs from its wire name (response_format's "schema") reaches the replica intact
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = ray_server.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "x"}], max_tokens=20, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert set(json.loads(reply.choices[0].message.content)) == {"ok"}
