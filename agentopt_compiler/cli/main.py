"""``agentopt`` command line: one module per subcommand, each a thin shell over the Python API.

What reaches the user when something goes wrong, in one place:
    bad input (``AgentOptError``, a usage error)  one ``error: ...`` line that says what to do; exit status 2
    an OS error naming a file                     one ``error: ...`` line with the file and the reason; exit 2
    a package of an optional install missing      one ``error: ...`` line naming the install (torch: [compile]); 2
    anything else (a bug)                         ``error: internal error ...`` and a pointer to ``--debug``, which
                                                  prints the traceback; exit status 1
    Ctrl-C                                        ``interrupted``; exit status 130
    a closed pipe (``agentopt inspect E | head``) nothing; exit status 141, as for a process killed by SIGPIPE
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import AgentOptError, missing_package_error
from . import compile_cmd, eval_cmd, inspect_cmd, plan_cmd, rebuild_cmd, run_cmd, serve_cmd

SUBCOMMANDS = (compile_cmd, plan_cmd, run_cmd, serve_cmd, eval_cmd, inspect_cmd, rebuild_cmd)
DEBUG_FLAG = "--debug"


class UsageError(Exception):
    """A command line argparse refused (unknown option, a value out of its declared range)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one ``error:`` line like every other (its default prints the whole usage and
    exits from inside parse_args, which an in-process caller cannot tell from --help), and no abbreviated options
    (``--json`` was taken as ``--json-schema``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="agentopt", description="Compile decoder LLMs into fast engines for agent workloads, and "
                                                  "run them.")
    parser.add_argument("--version", action="version", version=f"agentopt {__version__}")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an internal error, print the Python traceback (may be given anywhere)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # --debug is taken from anywhere on the line (it belongs to no subcommand); a value equal to it would be read
    # as an option by argparse anyway
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        args = build_parser().parse_args(argv)
        code = args.handler(args) or 0
        sys.stdout.flush()  # here, where a closed pipe is caught, not in the interpreter's final flush
        return code
    except (UsageError, AgentOptError) as exc:
        _error(str(exc))
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141
    except OSError as exc:
        if exc.filename is None:
            return _internal_error(exc, debug)
        _error(f"cannot use '{exc.filename}': {exc.strerror or exc}")
        return 2
    except ImportError as exc:  # a package of an optional install the command needs (torch on a deploy install)
        missing = missing_package_error(exc, f"agentopt {argv[0] if argv else ''}".strip())
        if missing is None:
            return _internal_error(exc, debug)
        _error(str(missing))
        return 2
    except MemoryError:
        _error("out of memory; use a smaller model, --context-length or --batch-size, or a machine with more memory")
        return 2
    except Exception as exc:
        return _internal_error(exc, debug)


def _error(message: str) -> None:
    # one line, whatever the message holds (a library's multi-line text must not look like several errors)
    print("error: " + " ".join(message.split()), file=sys.stderr)


def _internal_error(exc: Exception, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc)
    summary = " ".join(str(exc).split())[:300]
    _error(f"internal error ({type(exc).__name__}{': ' + summary if summary else ''}); this is a bug in agentopt: "
           + ("the traceback is above" if debug else f"rerun with {DEBUG_FLAG} for the traceback") + " and report it")
    return 1


def _silence_stdout() -> None:
    """After the reader of stdout went away, point stdout at /dev/null so the interpreter's final flush cannot
    raise again (the recipe in Python's signal module documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (captured in tests): nothing to do
        pass


if __name__ == "__main__":
    sys.exit(main())
