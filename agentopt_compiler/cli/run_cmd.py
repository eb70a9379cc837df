"""agentopt run: generate text from an engine folder (deploy side: no torch needed)."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate text with an engine folder",
                       description="Load an engine folder and generate from a prompt, streaming the text.")
    p.add_argument("engine", help="engine folder written by agentopt compile")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="override the engine's device")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..runtime.engine import load_engine

    engine = load_engine(args.engine, device=args.device, threads=args.threads)
    completion = engine.complete(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_strings=args.stop,
                                 ignore_eos=args.ignore_eos, on_text=_write)
    print()
    print(f"[{completion.prompt_tokens} prompt tokens, {len(completion.token_ids)} generated, finish: "
          f"{completion.finish_reason}, first token {completion.time_to_first_token_s * 1000:.0f} ms, "
          f"decode {completion.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
