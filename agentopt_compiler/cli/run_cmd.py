"""agentopt run: generate text, or run an agent task with tools, on an engine folder (no torch needed)."""

from __future__ import annotations

import importlib
import sys

from ..errors import AgentOptError


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text or run an agent task with an engine folder",
                       description="Generate from a prompt (--prompt), run an agent task with tools (--task), or, "
                                   "with neither, read tasks interactively from standard input.")
    p.add_argument("engine", help="engine folder written by agentopt compile")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="raw prompt text (no chat template)")
    mode.add_argument("--task", help="a task for the agent loop (chat template, tools, multi-step)")
    p.add_argument("--tools", nargs="*", default=[], metavar="MODULE:FUNCTION",
                   help="Python functions the agent may call, e.g. mytools:search")
    p.add_argument("--system", default=None, help="system prompt for --task / interactive mode")
    p.add_argument("--max-steps", type=int, default=6, help="tool-call rounds per task")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per generation (default 32 for --prompt, "
                                                                    "256 per agent step)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                   help="check up to N tokens drafted from the context per decode call: fewer calls when the model "
                        "copies from its context; greedy: the same tokens, sampling: the same distribution "
                        "(default 0: off)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="override the engine's device")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    p.set_defaults(handler=run)


def load_tool(spec: str):
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise AgentOptError(f"tool '{spec}' must be written MODULE:FUNCTION")
    sys.path.insert(0, ".")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise AgentOptError(f"cannot load tool '{spec}': {exc}") from None
    finally:
        sys.path.pop(0)
    if not callable(function):
        raise AgentOptError(f"tool '{spec}' is not a function")
    return function


def run(args) -> int:
    from ..runtime.engine import load_engine

    engine = load_engine(args.engine, device=args.device, threads=args.threads)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    stop_strings=args.stop, ignore_eos=args.ignore_eos, prompt_lookup=args.prompt_lookup)
    if args.prompt is not None:
        completion = engine.complete(args.prompt, max_new_tokens=args.max_new_tokens or 32, on_text=_write,
                                     **sampling)
        print()
        print(f"[{completion.prompt_tokens} prompt tokens, {len(completion.token_ids)} generated, finish: "
              f"{completion.finish_reason}, first token {completion.time_to_first_token_s * 1000:.0f} ms, "
              f"decode {completion.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
        return 0
    from ..runtime.agent import Agent, describe_event

    agent = Agent(engine, tools=[load_tool(t) for t in args.tools], system=args.system, max_steps=args.max_steps)
    sampling["max_new_tokens"] = args.max_new_tokens or 256

    def show(event: dict) -> None:
        if event["type"] == "token":
            _write(event["text"])
        elif event["type"] != "final":
            print(describe_event(event), flush=True)

    tasks = [args.task] if args.task is not None else _interactive_tasks()
    for task in tasks:
        result = agent.run(task, on_event=show, **sampling)
        usage = result.usage
        drafts = (f", {usage['accepted_draft_tokens']} of {usage['drafted_tokens']} drafted tokens accepted"
                  if args.prompt_lookup else "")
        print(f"\n[{result.finish_reason}: {len(result.steps)} step(s), {usage['prefilled_tokens']} tokens "
              f"prefilled, {usage['reused_tokens']} reused from cache, {usage['generated_tokens']} generated"
              f"{drafts}]", file=sys.stderr, flush=True)
    return 0


def _interactive_tasks():
    print("agent ready; type a task (Ctrl-D to quit)", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip():
            yield line


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
