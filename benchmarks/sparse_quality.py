#!/usr/bin/env python
"""What sparse attention costs in quality on agent-tiny, and where: KL against dense, perplexity, and a needle check.

    python benchmarks/sparse_quality.py                      # 60 held-out long-context episodes
    python benchmarks/sparse_quality.py --episodes 20 --window 32

Teacher-forced, in the eager model with each variant's masks (``analysis.sparse.sparse_layers``, the masks the
compiled engines are tested against), on held-out long-context episodes (facts and role bindings among 10-22
filler sentences; other seeds and phrasings than training):
    KL, top-1     mean KL(dense || variant) per token and top-1 agreement with dense, over every token
    ppl           perplexity of the gold assistant tokens (tool calls and answers)
    needle        in episodes whose request names a role ("the dentist's age"), the call must name the person
                  bound to that role at the very start of the context: the share of episodes whose person-name tokens
                  in the gold call are all predicted right (argmax), by distance from the binding to the call.
                  A window shorter than that distance cannot see the binding in the layers it covers.
Variants: dense; window W on every layer; sinks S + window W on every layer; local/global (the window on even
layers, odd layers dense); planned (``agentopt plan sparse`` with --max-kl on training-split calibration episodes:
the fewest dense layers meeting the budget), with the planner's KL over every calibration position, and again over
the positions that predict assistant tokens only (``plan_sparse(positions=...)``). Not a test: run it by hand;
markdown to stdout, ``--json`` for numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

BUCKETS = ((0, 256), (256, 512), (512, 768), (768, 10**9))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def long_episodes(tokenizer, n: int, split: str, seed: int, max_tokens: int) -> tuple[list[dict], int]:
    """The first n tokenized long-context episodes that fit in max_tokens (the model's positions), with their
    assistant-token flags and, for role requests, the needle; and how many longer ones were passed over."""
    from agentopt_compiler.agent_tiny.tasks import (ROLES, episode_text, generate_tasks, tokenize_episode)

    # a few percent of them run just past 1024 tokens; generate spares so n still fit
    tasks = generate_tasks(n + n // 4 + 4, split, seed=seed, mix={"long_lookup": 1.0, "long_lookup>calc": 1.0})
    episodes, too_long = [], 0
    for task in tasks:
        if len(episodes) == n:
            break
        text, spans = episode_text(task)
        ids, flags = tokenize_episode(tokenizer, text, spans)
        if len(ids) > max_tokens:
            too_long += 1
            continue
        offsets = tokenizer.encode(text).offsets
        episode = {"ids": ids, "assistant": flags, "needle": None}
        request = task.messages[-1]["content"]
        role = next((r for r in ROLES if f"the {r}'s" in request), None)
        if role is not None:
            key = task.calls[0][1]["key"]  # "Name's attribute": the person the role is bound to
            name = key.split("'s ", 1)[0]
            call_at = text.index(f'"key": "{key}"', text.rindex(request)) + len('"key": "')
            bound_at = text.index(role)  # the role binding sentence, at the start of the memory turn
            name_tokens = [i for i, (s, e) in enumerate(offsets) if s < call_at + len(name) and e > call_at]
            first = name_tokens[0]
            bound_token = next(i for i, (s, e) in enumerate(offsets) if e > bound_at)
            episode["needle"] = {"tokens": name_tokens, "distance": first - bound_token}
        episodes.append(episode)
    if len(episodes) < n:
        raise SystemExit(f"only {len(episodes)} of the generated long-context episodes fit in {max_tokens} tokens; "
                         f"ask for fewer with --episodes")
    return episodes, too_long


def score(model, episodes: list[dict], layers: dict, reference: list | None) -> dict:
    """Log-probs under the variant's masks, and the metrics against gold tokens and (if given) the dense run."""
    import torch

    from agentopt_compiler.analysis.sparse import sparse_layers

    log_probs, nll, count, needles = [], 0.0, 0, []
    with torch.no_grad(), sparse_layers(model, layers):
        for episode in episodes:
            ids = torch.tensor([episode["ids"]])
            lp = torch.log_softmax(model(ids).float(), -1)[0]  # (S, V): position t predicts token t + 1
            log_probs.append(lp)
            for t in range(1, len(episode["ids"])):
                if episode["assistant"][t]:
                    nll -= float(lp[t - 1, episode["ids"][t]])
                    count += 1
            if episode["needle"]:
                ok = all(int(lp[t - 1].argmax()) == episode["ids"][t] for t in episode["needle"]["tokens"])
                needles.append((episode["needle"]["distance"], ok))
    result = {"ppl": round(math.exp(nll / max(count, 1)), 4), "needle": needle_table(needles)}
    if reference is not None:
        kl = agree = tokens = 0.0
        for ref, oth in zip(reference, log_probs):
            kl += float((ref.exp() * (ref - oth)).sum())
            agree += float((ref.argmax(-1) == oth.argmax(-1)).sum())
            tokens += ref.shape[0]
        result.update(kl=round(max(kl / tokens, 0.0), 6), top1=round(agree / tokens, 4))
    return result, log_probs


def needle_table(needles: list[tuple[int, bool]]) -> dict:
    table = {"all": [sum(ok for _, ok in needles), len(needles)]}
    for low, high in BUCKETS:
        hits = [ok for distance, ok in needles if low <= distance < high]
        table[f"{low}-{high if high < 10**9 else ''}"] = [sum(hits), len(hits)]
    return table


def planned_layers(model, tokenizer, pattern, max_kl: float, calib_episodes: int, length: int,
                   assistant_only: bool = False) -> dict:
    """``agentopt plan sparse``'s choice on training-split long episodes (cut to ``length`` tokens), its KL over
    every position or (``assistant_only``) over those whose next token is an assistant token."""
    import torch

    from agentopt_compiler.analysis.sparse import plan_sparse

    calibration, _ = long_episodes(tokenizer, calib_episodes, "train", 5, model.config.max_position_embeddings)
    calibration = [e for e in calibration if len(e["ids"]) >= length]
    if not calibration:
        raise SystemExit(f"no calibration episode reaches {length} tokens; lower --calib-length")
    batches = [torch.tensor([e["ids"][:length]]) for e in calibration]
    # position t predicts token t + 1; an episode shorter than length + 1 has no token after its last position
    positions = [torch.tensor([(e["assistant"][1:length + 1] + [False])[:length]]) for e in calibration]
    result = plan_sparse(model, batches, pattern, max_kl, context_length=model.config.max_position_embeddings,
                         positions=positions if assistant_only else None)
    over = (f"{int(sum(m.sum() for m in positions))} assistant positions" if assistant_only
            else f"all {sum(b.numel() for b in batches)} positions")
    per_layer = ", ".join(f"{i}: {result.measurement.sparse_option(i).kl:.4f}" for i in range(len(model.layers)))
    log(f"planned over {over} of {len(batches)} episodes: sparse layers {result.sparse_layers}, predicted KL "
        f"{result.predicted['kl']:.4f}; per-layer KL {per_layer}")
    return result.plan.resolve(len(model.layers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=None, help="a folder agent_tiny.train wrote (default: shipped)")
    parser.add_argument("--episodes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0, help="held-out seed")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--max-kl", type=float, default=0.05, help="budget of the planned variant")
    parser.add_argument("--calib-episodes", type=int, default=24)
    parser.add_argument("--calib-length", type=int, default=640,
                        help="calibration tokens per episode; as long as the held-out ones, or the budget means less")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    import agentopt_compiler as ao
    from agentopt_compiler.agent_tiny.train import load_trained
    from agentopt_compiler.passes.insert_sparse_attention import SparsePattern

    torch.set_num_threads(args.threads)
    folder = Path(args.model_dir) if args.model_dir else Path(ao.__file__).parent / "models" / "agent_tiny"
    model, tokenizer = load_trained(folder)
    episodes, too_long = long_episodes(tokenizer, args.episodes, "heldout", args.seed,
                                       model.config.max_position_embeddings)
    n_layers = len(model.layers)
    window = SparsePattern(args.window, bounded=False)
    sinks = SparsePattern(args.window, args.sinks, bounded=False)
    variants = {
        "dense": {},
        f"window-{args.window}": {i: window for i in range(n_layers)},
        f"sinks{args.sinks}-window-{args.window}": {i: sinks for i in range(n_layers)},
        f"local/global (window-{args.window} on even layers)": {i: window for i in range(0, n_layers, 2)},
        f"planned (sinks{args.sinks}-window-{args.window}, max KL {args.max_kl})":
            planned_layers(model, tokenizer, sinks, args.max_kl, args.calib_episodes, args.calib_length),
        f"planned on assistant tokens (sinks{args.sinks}-window-{args.window}, max KL {args.max_kl})":
            planned_layers(model, tokenizer, sinks, args.max_kl, args.calib_episodes, args.calib_length,
                           assistant_only=True),
    }
    rows, reference = [], None
    for name, layers in variants.items():
        log(f"{name}...")
        metrics, log_probs = score(model, episodes, layers, reference)
        reference = reference if reference is not None else log_probs
        rows.append({"variant": name, "sparse_layers": sorted(layers), **metrics})
    lengths = [len(e["ids"]) for e in episodes]
    print(f"agent-tiny ({folder}), {len(episodes)} held-out long-context episodes (seed {args.seed}, "
          f"{min(lengths)}-{max(lengths)} tokens; {too_long} longer than the model's "
          f"{model.config.max_position_embeddings} positions passed over), {time.strftime('%Y-%m-%d %H:%M UTC')}\n")
    buckets = list(rows[0]["needle"])
    print("| variant | sparse layers | KL vs dense | top-1 vs dense | ppl (assistant tokens) | "
          + " | ".join(f"needle {b}" for b in buckets) + " |")
    print("|---" * (5 + len(buckets)) + "|")
    for row in rows:
        cells = [f"{hits}/{total}" if total else "-" for hits, total in row["needle"].values()]
        print(f"| {row['variant']} | {row['sparse_layers'] or '-'} | {row.get('kl', 0.0):.4f} | "
              f"{row.get('top1', 1.0):.3f} | {row['ppl']:.3f} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
