"""agentopt serve: an OpenAI-compatible chat-completions server over an engine folder (no torch needed).

One process (FastAPI on uvicorn, continuous batching over the engine's KV slots), or ``--replicas N`` copies of it
behind Ray Serve's HTTP proxy, a conversation routed to the replica that holds its KV (serve_ray.py).
"""

from __future__ import annotations

import sys

from ..errors import AgentOptError
from .arg_types import PROMPT_LOOKUP, TCP_PORT, THREADS, int_in, non_blank_text


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an engine over an OpenAI-compatible HTTP API",
                       description="Serve /v1/chat/completions (tools, tool_choice, streaming), /v1/models, /health "
                                   "and /metrics; concurrent requests decode together in the engine's KV slots.")
    p.add_argument("engine", help="engine folder written by agentopt compile")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=TCP_PORT, default=8000, help="TCP port, 0 to 65535 (0: any free port)")
    p.add_argument("--api-key", type=non_blank_text, default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--model-name", type=non_blank_text, default=None,
                   help="model id to serve (default: the engine's model name)")
    p.add_argument("--threads", type=THREADS, default=None, help="CPU threads for the backend (per replica)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.add_argument("--prompt-lookup", type=PROMPT_LOOKUP, default=0, metavar="N",
                   help="check up to N tokens drafted from the conversation per decode call: fewer calls, the same "
                        "text, greedy or sampled with a seed (default 0: off)")
    p.add_argument("--slots", type=int_in(1, 1024), default=None, metavar="S",
                   help="KV slots: conversations held at once, decoded together (default: the engine's compiled "
                        "batch size; any S for engines with dynamic rows; 1 serves one request at a time)")
    p.add_argument("--prefill-chunk", type=int_in(1, 1 << 20), default=64, metavar="N",
                   help="prompt tokens computed per scheduler step, between decode steps (default 64: smaller keeps "
                        "other sessions' inter-token latency low, larger gives a faster first token)")
    p.add_argument("--max-waiting", type=int_in(0, 1 << 16), default=64, metavar="N",
                   help="requests that may wait for a slot; more are answered 429 with Retry-After (default 64)")
    p.add_argument("--prefix-cache-mb", type=int_in(0, 1 << 20), default=256, metavar="MB",
                   help="memory for the KV of system prompts (and tool schemas) that sessions share, prefilled once "
                        "(default 256; 0: off)")
    p.add_argument("--max-body-bytes", type=int_in(1024, 1 << 30), default=4 << 20, metavar="N",
                   help="largest request body accepted (413 beyond; default 4 MiB)")
    p.add_argument("--replicas", type=int_in(1, 1024), default=None, metavar="N",
                   help="run N replicas of the engine behind Ray Serve (pip install 'agentopt-compiler[ray]'); a "
                        "conversation goes to the replica that holds its KV")
    p.add_argument("--address", default=None, metavar="RAY",
                   help="with --replicas: the Ray cluster to join (e.g. ray://head:10001 or auto; default: start a "
                        "local Ray instance on this machine)")
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.address and not args.replicas:
        raise AgentOptError("--address names a Ray cluster for --replicas; give --replicas N as well")
    try:
        from ..runtime.server import ChatService, HttpServer, LocalBackend, make_app
    except ImportError as exc:
        raise AgentOptError(f"agentopt serve needs the serve extra ({exc.name} is missing): "
                            "pip install 'agentopt-compiler[serve]'") from None
    options = dict(api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    service_options = dict(model_name=args.model_name, prompt_lookup=args.prompt_lookup,
                           prefill_chunk=args.prefill_chunk, max_waiting=args.max_waiting,
                           prefix_cache_bytes=args.prefix_cache_mb << 20)
    if args.replicas:
        from ..runtime.serve_ray import serve_replicas

        return serve_replicas(args.engine, args.replicas, args.address, args.host, args.port, args.threads,
                              args.slots, service_options, options)
    from ..runtime.engine import load_engine

    engine = load_engine(args.engine, threads=args.threads, slots=args.slots)
    service = ChatService(engine, **service_options)
    server = HttpServer(make_app(LocalBackend(service), **options), args.host, args.port, verbose=args.verbose)
    print(f"serving '{service.model_name}' from {args.engine} on http://{server.host}:{server.port}/v1 with "
          f"{engine.slots.count} KV slot(s) ({'API key required' if args.api_key else 'no API key'}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    server.run()
    return 0
