"""agentopt serve: an OpenAI-compatible chat-completions server over an engine folder (no torch needed)."""

from __future__ import annotations

import sys

from .arg_types import TCP_PORT


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve an engine over an OpenAI-compatible HTTP API",
                       description="Serve /v1/chat/completions (tools, tool_choice, streaming) and /v1/models.")
    p.add_argument("engine", help="engine folder written by agentopt compile")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=TCP_PORT, default=8000, help="TCP port, 0 to 65535 (0: any free port)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--model-name", default=None, help="model id to serve (default: the engine's model name)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="check up to N tokens drafted from the conversation per decode call: fewer calls, the same "
                        "text for greedy requests and the same distribution for sampled ones (default 0: off)")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..runtime.engine import load_engine
    from ..runtime.server import ChatService, make_server

    engine = load_engine(args.engine, threads=args.threads)
    service = ChatService(engine, model_name=args.model_name, prompt_lookup=args.prompt_lookup)
    try:
        server = make_server(service, args.host, args.port, api_key=args.api_key, verbose=args.verbose)
    except OSError as exc:
        from ..errors import AgentOptError
        raise AgentOptError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    host, port = server.server_address[:2]
    print(f"serving '{service.model_name}' from {args.engine} on http://{host}:{port}/v1 "
          f"({'API key required' if args.api_key else 'no API key'}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
