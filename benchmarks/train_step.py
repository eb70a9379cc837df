#!/usr/bin/env python
"""Training-step throughput of agent-tiny's trainer: the same fixed batches through variants of the training forward.

    python benchmarks/train_step.py                      # current, gqa, current again: 30 steps each
    python benchmarks/train_step.py --variants current,compiled,current --steps 30

Variants (same model, same batches, AdamW step included, ``--threads`` intra-op threads; bf16 autocast where the
trainer uses it, ``agent_tiny.train.bf16_is_fast``, fp32 otherwise):
    current     ``agent_tiny.train.batch_loss`` as the trainer runs it (K/V repeat_interleave'd, causal SDPA)
    gqa         ``batch_loss(..., attn="sdpa_gqa")``: SDPA's ``enable_gqa`` instead of the repeated K/V copies
    compiled    ``torch.compile(batch_loss, dynamic=True)``; its compile time is reported as warm-up, not counted
Name a variant twice (first and last) to see how much the machine itself drifted during the run: separate processes
on this 2-core VM measured current 2671 and gqa 3911 tokens/s, this script current 2835, gqa 2725, current 2626.

Batches are phase-3 curriculum batches from ``EpisodeStream`` (the longest, the ones the last hour trains on). Each
variant warms up on 8 batches, then runs ``--steps`` timed steps; tokens/s counts every token of the padded rows'
real lengths, as the trainer's log does. Starting weights are the same for every variant; the loss of its first
(warm-up) step is printed, so a variant that changed the math shows. Not a test: run it by hand on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="current,gqa,current")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from agentopt_compiler.agent_tiny import train as T
    from agentopt_compiler.agent_tiny.tasks import episode_text, generate_tasks, train_tokenizer
    from agentopt_compiler.models.registry import build_model

    torch.set_num_threads(args.threads)
    bf16 = T.bf16_is_fast(torch.device("cpu"))
    print(f"training precision: {'bf16 autocast' if bf16 else 'fp32'} (CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()})", file=sys.stderr, flush=True)
    print("building tokenizer, model and batches ...", file=sys.stderr, flush=True)
    tok = train_tokenizer([episode_text(t)[0] for t in generate_tasks(1500, "train", 10_000)], 512)
    eos = tuple(tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
    base = build_model(T.agent_model_config(tok.get_vocab_size(), "small", eos), 0)
    T.init_for_training(base, 0)
    stream = T.EpisodeStream(tok, 0, 1024, 6144)
    batches = [stream.next_batch(T.mix_at(0.6)) for _ in range(args.steps + 8)]

    make_loss = {  # built per variant, so a repeated "compiled" compiles again
        "current": lambda: T.batch_loss,
        "gqa": lambda: functools.partial(T.batch_loss, attn="sdpa_gqa"),
        "compiled": lambda: torch.compile(T.batch_loss, dynamic=True),
    }
    rows = []
    for name in args.variants.split(","):
        if name not in make_loss:
            p.error(f"unknown variant {name!r}; choose from {', '.join(make_loss)}")
        loss_fn = make_loss[name]()
        model = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(batch):
            x, y, m, _, n_tok = batch
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model, x, y, m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return n_tok, loss.item()

        print(f"{name}: warm-up ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        first_loss = step(batches[0])[1]
        for b in batches[1:8]:
            step(b)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_tok = sum(step(b)[0] for b in batches[8:])
        dt = time.perf_counter() - t0
        rows.append((name, warm, dt, n_tok / dt, first_loss))

    ref = rows[0][3]
    print(f"| variant | warm-up s | {args.steps} steps s | tokens/s | vs {rows[0][0]} | first-step loss |")
    print("|---|---|---|---|---|---|")
    for name, warm, dt, tps, first_loss in rows:
        print(f"| {name} | {warm:.1f} | {dt:.1f} | {tps:.0f} | {tps / ref:.2f}x | {first_loss:.5f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
