"""agentopt run: generate text, or run an agent task with tools, on an engine folder (no torch needed)."""

from __future__ import annotations

import re
import sys

from ..errors import AgentOptError, ContextOverflowError
from .arg_types import PROMPT_LOOKUP, SEED, THREADS, float_in, int_in, non_empty_text


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text or run an agent task with an engine folder",
                       description="Generate from a prompt (--prompt), run an agent task with tools (--task), or, "
                                   "with neither, read tasks interactively from standard input. Exit status: 0 "
                                   "done; 1 a --task that ended without a complete answer (the step limit, a "
                                   "repeated failing call, the token limit or the context: the bracketed line on "
                                   "standard error says which); 2 bad input.")
    p.add_argument("engine", help="engine folder written by agentopt compile")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="raw prompt text (no chat template)")
    mode.add_argument("--task", help="a task for the agent loop (chat template, tools, multi-step)")
    p.add_argument("--tools", nargs="+", action="extend", default=[], metavar="MODULE:FUNCTION",
                   help="Python functions the agent may call, e.g. mytools:search (repeat or list several)")
    p.add_argument("--system", default=None, help="system prompt for --task / interactive mode")
    p.add_argument("--memory", metavar="FILE.json", default=None,
                   help="facts for the memory_lookup tool (agentopt_compiler.tools:memory_lookup): a JSON object of "
                        "key -> value, e.g. {\"locker code\": \"4821\"}")
    p.add_argument("--continue", dest="keep_history", action="store_true",
                   help="interactive mode: each task continues the conversation of the ones before (default: each "
                        "task starts afresh); type /reset to start afresh")
    p.add_argument("--max-steps", type=int_in(1, 1000), default=None, help="tool-call rounds per task (default 6)")
    p.add_argument("--tool-timeout", type=float_in(0.0, 86400.0, low_open=True), default=None, metavar="SECONDS",
                   help="stop a tool call after this long; the model sees a timeout error (default 30)")
    p.add_argument("--max-new-tokens", type=int_in(1), default=None,
                   help="per generation (default 32 for --prompt, 256 per agent step)")
    p.add_argument("--temperature", type=float_in(0.0), default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int_in(0), default=0, help="sample from the K likeliest tokens (0: off)")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True), default=1.0,
                   help="sample from the likeliest tokens holding this much probability (1: off)")
    p.add_argument("--seed", type=SEED, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", type=non_empty_text, default=[], metavar="TEXT",
                   help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--prompt-lookup", type=PROMPT_LOOKUP, default=0, metavar="N",
                   help="check up to N tokens drafted from the context per decode call: fewer calls when the model "
                        "copies from its context; the same tokens, greedy or sampled with a seed "
                        "(default 0: off)")
    p.add_argument("--no-constrain", action="store_true",
                   help="with --tools: decode tool calls freely (default: under a grammar from the tools' JSON "
                        "schemas, so every call parses and fits its tool, and forced tokens are fed in one call)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="FILE.json",
                       help="with --prompt: the output is JSON valid for this JSON schema (grammar-constrained)")
    shape.add_argument("--regex", metavar="PATTERN", help="with --prompt: the output matches this regular expression")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="override the engine's device")
    p.add_argument("--threads", type=THREADS, default=None, help="CPU threads for the backend")
    p.set_defaults(handler=run)


DEFAULT_MAX_STEPS = 6
RESET_COMMAND = "/reset"  # interactive mode: forget the conversation kept by --continue
QUIT_COMMANDS = ("/quit", "/exit")


def run(args) -> int:
    from ..runtime.engine import load_engine

    _check_mode_options(args)
    grammar = _output_grammar(args)
    engine = load_engine(args.engine, device=args.device, threads=args.threads)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    stop_strings=args.stop, ignore_eos=args.ignore_eos, prompt_lookup=args.prompt_lookup)
    if args.prompt is not None:
        sampling["grammar"] = grammar
        completion = engine.complete(args.prompt, max_new_tokens=args.max_new_tokens or 32, on_text=_write,
                                     **sampling)
        print()
        print(f"[{completion.prompt_tokens} prompt tokens, {len(completion.token_ids)} generated, finish: "
              f"{completion.finish_reason}, first token {completion.time_to_first_token_s * 1000:.0f} ms, "
              f"decode {completion.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        return 0
    from ..runtime.agent import Agent, describe_event
    from ..runtime.tools import load_tool

    tools = [load_tool(t) for t in args.tools]
    if args.memory is not None:
        tools = _with_memory(tools, _read_memory(args.memory))
    agent = Agent(engine, tools=tools, system=args.system, max_steps=args.max_steps or DEFAULT_MAX_STEPS,
                  tool_timeout_s=args.tool_timeout or 30.0, constrained=bool(tools) and not args.no_constrain)
    fresh = len(agent.messages)  # the system message, if any
    sampling["max_new_tokens"] = args.max_new_tokens or 256

    def show(event: dict) -> None:
        if event["type"] == "token":
            _write(event["text"])
        elif event["type"] == "stopped":  # why the task ends: a status, beside the bracketed line
            print(f"\n{describe_event(event)}", file=sys.stderr, flush=True)
        elif event["type"] != "final":
            print(describe_event(event), flush=True)

    tasks = [args.task] if args.task is not None else _interactive_tasks()
    status = 0
    for task in tasks:
        if args.task is None and task.strip() == RESET_COMMAND:
            del agent.messages[fresh:]
            print("(the conversation starts afresh)", file=sys.stderr, flush=True)
            continue
        if args.task is None and task.strip() in QUIT_COMMANDS:
            break
        if args.task is None and re.fullmatch(r"/\w+", task.strip()):  # a command, not a task for the model
            print(f"error: unknown command {task.strip()}; commands: {RESET_COMMAND} (start afresh), "
                  f"{', '.join(QUIT_COMMANDS)} or Ctrl-D (quit)", file=sys.stderr, flush=True)
            continue
        if not args.keep_history:
            del agent.messages[fresh:]  # a new task starts afresh (the cached system prompt is reused)
        before = len(agent.messages)
        try:
            result = agent.run(task, on_event=show, **sampling)
        except AgentOptError as exc:
            if args.task is not None:
                raise
            # interactive: this task fails (e.g. it does not fit the context), the session goes on without it
            del agent.messages[before:]
            hint = ""
            if isinstance(exc, ContextOverflowError) and before > fresh:
                hint = (f" (the conversation kept by --continue has grown to {before - fresh} messages: type "
                        f"{RESET_COMMAND} to start afresh)")
            print(f"\nerror: {' '.join(str(exc).split())}{hint}", file=sys.stderr, flush=True)
            continue
        print(flush=True)  # the answer's line ends (piped output: the next task's prompt starts on its own line)
        usage = result.usage
        drafts = (f", {usage['accepted_draft_tokens']} of {usage['drafted_tokens']} drafted tokens accepted"
                  if args.prompt_lookup else "")
        drafts += f", {usage['forced_tokens']} forced by the tools' grammar" if agent.grammar else ""
        drafts += f", {usage['closed_at_limit']} call(s) closed early at a token limit" if usage["closed_at_limit"] else ""
        print(f"[{result.finish_reason}: {len(result.steps)} step(s), {usage['prefilled_tokens']} tokens "
              f"prefilled, {usage['reused_tokens']} reused from cache, {usage['generated_tokens']} generated"
              f"{drafts}]", file=sys.stderr, flush=True)
        if args.task is not None and result.finish_reason != "answer":
            status = 1  # a script can tell that the task did not end with a complete answer
    return status


def _check_mode_options(args) -> None:
    """Options of the agent modes given with --prompt (a raw completion, no chat template), where nothing reads them,
    are refused rather than ignored."""
    if args.prompt is None:
        return
    given = [flag for flag, value in (("--tools", args.tools), ("--system", args.system), ("--memory", args.memory),
                                      ("--continue", args.keep_history), ("--no-constrain", args.no_constrain),
                                      ("--max-steps", args.max_steps), ("--tool-timeout", args.tool_timeout))
             if value]
    if given:
        raise AgentOptError(f"{', '.join(given)} belong(s) to agent tasks (--task, or interactive mode without "
                            "--prompt); --prompt is a raw completion without chat template or tools")


def _output_grammar(args):
    """The --json-schema / --regex constraint of --prompt mode (None: free text)."""
    import json
    from pathlib import Path

    from ..runtime.constraints import json_schema_grammar, regex_grammar

    if (args.json_schema or args.regex is not None) and args.prompt is None:
        raise AgentOptError("--json-schema and --regex shape a --prompt's output; agent tasks (--task) are "
                            "constrained by their tools' schemas (see --no-constrain)")
    if args.regex == "":
        raise AgentOptError("--regex '' would allow only an empty output; give a pattern, e.g. --regex '(yes|no)'")
    if args.regex:
        return regex_grammar(args.regex, f"--regex {args.regex!r}")
    if not args.json_schema:
        return None
    path = Path(args.json_schema)
    try:
        schema = json.loads(path.read_text())
    except OSError as exc:
        raise AgentOptError(f"cannot read --json-schema {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AgentOptError(f"--json-schema {path} is not valid JSON: {exc}") from None
    return json_schema_grammar(schema, f"--json-schema {path}")


def _read_memory(path: str) -> dict[str, str]:
    """The --memory file: a JSON object of key -> value (values become text), or one AgentOptError saying what to
    fix."""
    import json

    def refuse_duplicates(pairs):
        keys = [k for k, _ in pairs]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise AgentOptError(f"--memory: '{path}' has the key {twice!r} twice; keep one of them")
        return dict(pairs)

    try:
        data = json.loads(open(path, encoding="utf-8").read(), object_pairs_hook=refuse_duplicates)
    except FileNotFoundError:
        raise AgentOptError(f"--memory: no such file '{path}'; give a JSON file such as "
                            '{"locker code": "4821"}') from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AgentOptError(f"--memory: cannot read '{path}': {exc}") from None
    except ValueError as exc:
        raise AgentOptError(f"--memory: '{path}' is not valid JSON ({exc}); write an object of key -> value, e.g. "
                            '{"locker code": "4821"}') from None
    if not isinstance(data, dict):
        raise AgentOptError(f"--memory: '{path}' holds a JSON {type(data).__name__}; write an object of key -> value, "
                            'e.g. {"locker code": "4821"}')
    from ..agent_tiny.tools import normalize_key

    seen: dict[str, str] = {}
    for key in data:
        same = normalize_key(key)
        if not same:
            raise AgentOptError(f"--memory: '{path}' has the key {key!r}, which names nothing; give each fact a key "
                                "such as \"locker code\"")
        if same in seen:
            raise AgentOptError(f"--memory: '{path}' has the keys {seen[same]!r} and {key!r}, which a lookup cannot "
                                "tell apart (case, a leading 'the'/'my'/'our' and a trailing ?, . or ! are ignored); "
                                "keep one of them")
        seen[same] = key
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}


def _with_memory(tools, memory: dict[str, str]):
    """The tools with agentopt_compiler.tools:memory_lookup bound to ``memory``; an error if it is not among them."""
    from .. import tools as builtin_tools
    from ..agent_tiny.tools import runtime_tools
    from ..runtime.tools import Tool

    bound = Tool.from_function(runtime_tools(memory)[2])
    out = [bound if t.function is builtin_tools.memory_lookup else t for t in tools]
    if all(t is not bound for t in out):
        raise AgentOptError("--memory is read by the memory_lookup tool; add --tools "
                            "agentopt_compiler.tools:memory_lookup")
    return out


MAX_TASK_BYTES = 1 << 20  # one interactive line; longer ones are refused (and would not fit a context anyway)


def _interactive_tasks():
    """Tasks, one per line of standard input. A line that is not UTF-8 or is longer than MAX_TASK_BYTES is
    reported on one ``error:`` line and skipped; the session goes on."""
    print("agent ready; type a task (Ctrl-D to quit)", file=sys.stderr)
    stdin = getattr(sys.stdin, "buffer", None)  # bytes, so that undecodable input is ours to report
    typing = sys.stdin.isatty()
    number = 0
    while True:
        if typing:  # a prompt for a person at a terminal; piped input gets none (it is not part of the output)
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline(MAX_TASK_BYTES + 1) if stdin is not None else sys.stdin.readline()
        if not line:
            print(file=sys.stderr)
            return
        number += 1
        if isinstance(line, bytes):
            if len(line) > MAX_TASK_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the line
                    line = stdin.readline(MAX_TASK_BYTES)
                print(f"error: line {number} is longer than {MAX_TASK_BYTES} bytes; give a shorter task",
                      file=sys.stderr, flush=True)
                continue
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                print(f"error: line {number} is not UTF-8 text (byte {line[exc.start]:#04x} at position "
                      f"{exc.start}); type the task again as UTF-8", file=sys.stderr, flush=True)
                continue
        if line.strip():
            yield line.rstrip("\r\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
