"""``agentopt`` command line: one module per subcommand, each a thin shell over the Python API.

Errors the user can act on (``AgentOptError``) print as one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import AgentOptError
from . import compile_cmd, eval_cmd, inspect_cmd, plan_cmd, rebuild_cmd, run_cmd, serve_cmd

SUBCOMMANDS = (compile_cmd, plan_cmd, run_cmd, serve_cmd, eval_cmd, inspect_cmd, rebuild_cmd)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="agentopt", description="Compile decoder LLMs into fast engines for "
                                     "agent workloads, and run them.")
    parser.add_argument("--version", action="version", version=f"agentopt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except AgentOptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
