"""``agentopt serve ENGINE --replicas N``: N replicas of one engine folder behind Ray Serve, with the same HTTP API.

    client -> Ray Serve HTTP proxy -> Ingress (the FastAPI app of server.py: validation, SSE / JSON)
           -> EngineReplica x N (each its own engine, KV slots and scheduler thread: a ChatService)

Which replica answers is Ray's decision, made by Ray Serve's ``PrefixCacheAffinityRouter`` over the text of the
request's messages: a conversation's next turn shares its whole history with the turn before, so it goes back to the
replica that holds that history's KV (and its prefix cache); a new conversation goes to the replicas with the
smallest prefix trees. Ray handles queueing, back-pressure and replica failures; nothing here balances load.

Ray ships the router in ``ray.llm``, whose public import path needs vLLM; the module it lives in needs only Ray
Serve, and is imported by that path (checked by the tests, pinned to the Ray release range in pyproject.toml).

Point it at an existing cluster with ``--address`` (e.g. ``ray://head-node:10001``, or ``auto`` on a cluster node);
every node needs this package and the engine folder at the same path.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import AsyncIterator

from ..errors import AgentOptError
from .server_api import ApiError, ChatRequest

PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"


@dataclass
class RoutedChat:
    """What the ingress hands a replica: the request, and its messages where the router reads them."""

    messages: list[dict]  # {"content": text}: the router matches the concatenated contents against its prefix tree
    body: dict  # the validated ChatRequest


class EngineReplica:
    """One replica: an engine folder loaded with its own slots and scheduler (a ChatService)."""

    def __init__(self, folder: str, threads: int | None, slots: int | None, service_options: dict):
        from .engine import load_engine
        from .server import ChatService

        self.service = ChatService(load_engine(folder, threads=threads, slots=slots), **service_options).start()

    async def chat(self, routed: RoutedChat) -> AsyncIterator[dict]:
        from .server import chat_events

        async for event in chat_events(self.service, ChatRequest.model_validate(routed.body)):
            yield event

    def models(self) -> dict:
        return self.service.models()

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.stop()


class RayBackend:
    """What the ingress's FastAPI app serves: requests go to the replicas through a Ray Serve handle."""

    def __init__(self, handle, models: dict, replicas: int):
        self.handle, self._models, self.replicas = handle, models, replicas
        self.model_name = models["data"][0]["id"]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def models(self) -> dict:
        return self._models

    async def chat(self, request: ChatRequest) -> AsyncIterator[dict]:
        # by_alias: fields named differently in Python (response_format's "schema") go under their wire names
        routed = RoutedChat([{"content": _text(m.content)} for m in request.messages],
                            request.model_dump(mode="json", exclude_unset=True, by_alias=True))
        response = self.handle.options(stream=True).chat.remote(routed)
        finished = False
        try:
            async for event in response:
                finished = finished or "final" in event or "error" in event
                yield event
        except Exception as exc:  # a replica failed (RayTaskError, a dead actor): one line, not Ray's traceback
            finished = True
            cause = getattr(exc, "cause", None) or exc
            message = f"internal error in a replica: {type(cause).__name__}: {str(cause).strip().splitlines()[-1]}"
            yield {"error": {"status": 500, "body": ApiError(500, message).body()}}
        finally:
            if not finished:
                response.cancel()  # the client went away: the replica's generator is cancelled, freeing its slot

    async def health(self) -> dict:
        return {"status": "ok", "replicas": self.replicas}

    async def metrics_text(self) -> bytes:
        raise ApiError(404, "with --replicas, each replica keeps its own scheduler; use Ray Serve's metrics "
                            "(ray_serve_* on the Ray metrics port) or serve one replica for agentopt_* metrics",
                       "not_available")


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(part.text or "" for part in content)
    return content or ""


def build_application(folder: str, replicas: int, threads: int | None = None, slots: int | None = None,
                      service_options: dict | None = None, app_options: dict | None = None,
                      cpus_per_replica: float = 1.0):
    """The Ray Serve application: N engine replicas routed by prefix affinity, behind a FastAPI ingress."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    service_options, app_options = service_options or {}, app_options or {}
    replica = serve.deployment(
        EngineReplica, name="agentopt-engine", num_replicas=replicas,
        ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=service_options.get("max_waiting", 64) + (slots or 8),
        request_router_config=RequestRouterConfig(request_router_class=PREFIX_ROUTER))

    @serve.deployment(name="agentopt-ingress", ray_actor_options={"num_cpus": 0})
    @serve.ingress()
    class Ingress:
        def __init__(self, engine_handle):
            self.engine_handle = engine_handle

        async def __serve_build_asgi_app__(self):
            from .server import make_app

            models = await self.engine_handle.models.remote()
            return make_app(RayBackend(self.engine_handle, models, replicas), **app_options)

    return Ingress.bind(replica.bind(folder, threads, slots, service_options))


def serve_replicas(folder: str, replicas: int, address: str | None, host: str, port: int, threads: int | None,
                   slots: int | None, service_options: dict, app_options: dict) -> int:
    """Start (or join) Ray, run the application, block until Ctrl-C."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise AgentOptError("--replicas needs Ray Serve: pip install 'agentopt-compiler[ray]'") from None
    from .manifest import read_manifest

    read_manifest(folder)  # a missing or corrupt engine is one clear error here, not a replica crash loop
    ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
             **({} if address else {"_node_ip_address": "127.0.0.1"}))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_application(folder, replicas, threads, slots, service_options, app_options),
              name="agentopt", route_prefix="/")
    # SIGTERM (a service manager, `kill`) stops as Ctrl-C does; Ray's core worker would otherwise answer it with a
    # native stack dump and exit without shutting Serve down
    signal.signal(signal.SIGTERM, _interrupt)
    print(f"serving {folder} with {replicas} replica(s) behind Ray Serve on http://{host}:{port}/v1; Ctrl-C stops",
          file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping the replicas", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
