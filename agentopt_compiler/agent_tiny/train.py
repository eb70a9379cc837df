"""Train a tiny tool-using Llama-family model on procedural agent episodes (tasks.py, everyday.py), on CPU or GPU.

agent-tiny's shipped weights are the midpoint (interpolate.py) of one run of both stages from scratch and its
fine-tune on the stage-2 mix (its MODEL_CARD.md names the commits and hosts; the first run, at commit 6030301's data,
was bounded by 7.5 minutes on an H200: ``--tokens`` reproduces it):

    python -m agentopt_compiler.agent_tiny.train --out BASE --mix full --tokens 53.4e6 --seed 6 --minutes 600 \
        --device cuda --data-workers 3 --eval-tasks 0     # about 5 hours with --device cpu --threads 2 on 2 cores
    python -m agentopt_compiler.agent_tiny.train --out TUNED --init-from BASE --mix stage2 --tokens 12.5e6 \
        --seed 10 --lr 2e-4 --warmup-steps 30 --minutes 600 --threads 2 --eval-tasks 0   # 72 minutes on 2 cores
    python -m agentopt_compiler.agent_tiny.interpolate BASE TUNED --weight 0.5 --out RUN

``--mix curriculum`` is stage 1 alone (the previous weights: 49.6M tokens on CPU), ``--mix stage2`` the everyday
phrasings and generated tools alone, for fine-tuning with ``--init-from`` (alone, a fine-tune trades the
generator's multiplicative chains for everyday phrasing; the midpoint with the run it started from keeps both).

Steps: train a 512-token byte-level BPE on generated episodes (or take the tokenizer of ``--init-from``); build the
model with ``build_model`` (then re-initialise it for training: N(0, 0.02), residual projections scaled down); train
with loss on assistant tokens only (AdamW, warmup + cosine over ``--tokens`` tokens, ``--max-steps`` steps or else the
wall-clock budget; a token bound gives the same run on a slower host); bf16 autocast on CUDA and AVX-512 CPUs, fp32 on
others or with ``--no-bf16``), through a curriculum (single tool, then chains and error recovery, then long contexts)
or the stage-2 mix (``--mix stage2``: everyday phrasings and generated tools, everyday.py, with the last curriculum
phase replayed), or both in one run (``--mix full``); log every ~30 s; checkpoint every 10 minutes and at the end;
then compile the folder and run the agent-loop evaluation (eval.py, the runtime Agent) on held-out generator tasks
and print it. ``--compile`` runs the training step through ``torch.compile`` (about 1.15x the tokens/s on 2 cores
after ~3 minutes of compiling).

DIR receives ``model.safetensors`` (fp32 or ``--save-dtype``, names exactly as ``LlamaDecoder.state_dict()``, the
tied ``lm_head.weight`` stored as its own copy), ``config.json`` (``ModelConfig.to_dict()`` plus ``"format":
"agentopt-builtin"``), ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template), ``train_log.jsonl``
and ``eval.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import sys
import time
from pathlib import Path

from .tasks import (SPECIAL_TOKENS, episode_text, generate_tasks, render_chat, render_with_loss_spans,
                          save_tokenizer, tokenize_episode, train_tokenizer)
from ..models.config import ModelConfig

FORMAT = "agentopt-builtin"
# seconds the training loop leaves for its last step, the final validation loss and the save, so the whole process
# fits --minutes: the run of commit 7c26ede (shipped until 2026-12-01) kept none and ended 7 s over its 120 minutes
FINAL_RESERVE_S = 30.0

# curriculum: (fraction of the budget where the phase starts, kind -> weight). lookup>calc weighs about double what the
# other chains do: a 2-hour run at equal weights learned it to 6-17% (it copies the request's operand wrongly after the
# lookup turn: "multiplied by 58" -> "3225 * 85"), the other chains to 61-100%; convert (58-79%) got 0.8 from 0.6.
# lookup (and calc>convert) got more weight after two 2-hour runs learned single lookups to only 58% (calc>convert 56%).
# The last phase moved weight from calc to the longer chains after the run of commit 38e5234 learned single calc to
# 100% on 400 held-out tasks but lookup>calc>convert to 33-44% and lookup>convert to 56-100% per 100-task sample.
# Then convert took weight from calc>convert and lookup>convert (1.1, 1.0 -> 0.9 each): the run of commit 7c26ede
# learned both chains to 100% on 500 held-out tasks but single conversions to 50-83% (sent to the calculator).
# With these weights the run of commit dc65441 (the shipped weights, 49.6M tokens) learned single conversions to
# 92-100% and lookup>convert to 100%, calc>convert to 67% on each of four 100-task samples.
CURRICULUM = [
    (0.0, {"calc": 1.0, "convert": 1.0, "lookup": 1.0, "retry": 0.1}),
    (0.12, {"calc": 0.8, "convert": 0.8, "lookup": 1.0, "calc>convert": 0.6, "lookup>calc": 1.2,
            "lookup>convert": 0.6, "lookup>calc>convert": 0.5, "retry": 0.15, "bad_key": 0.15, "bad_unit": 0.1,
            "bad_expr": 0.1}),
    (0.35, {"calc": 0.5, "convert": 1.3, "lookup": 1.0, "calc>convert": 0.9, "lookup>calc": 1.4,
            "lookup>convert": 0.9, "lookup>calc>convert": 1.2, "long_lookup": 0.3, "long_lookup>calc": 0.6,
            "retry": 0.15, "bad_key": 0.15, "bad_unit": 0.1, "bad_expr": 0.1}),
]


# Stage 2 (issue 29): fine-tuning the stage-1 weights on everyday phrasings and generated tools (everyday.py), with
# the last curriculum phase replayed at about 40% of the episodes so the generator's held-out split does not regress.
_REPLAY = CURRICULUM[-1][1]
STAGE2_MIX = {**{k: round(0.55 * w, 3) for k, w in _REPLAY.items()},
              "say_calc": 1.3, "say_convert": 1.0, "say_lookup": 1.0, "say_calc>convert": 0.6, "say_lookup>calc": 0.8,
              "say_lookup>convert": 0.6, "new_tool": 2.5, "say_mixed": 0.6}
# "full": both stages in one run from scratch, the curriculum compressed into the first FULL_CURRICULUM_SHARE of the
# tokens, then the stage-2 mix (for a machine that trains far more tokens than stage 1's 49.6M, e.g. a GPU)
FULL_CURRICULUM_SHARE = 0.5
MIXES = ("curriculum", "stage2", "full")


def mix_for(mix: str, frac: float) -> dict[str, float]:
    """Episode kinds and weights of ``mix`` at ``frac`` (0-1) of the run."""
    if mix == "stage2":
        return STAGE2_MIX
    if mix == "full":
        return mix_at(frac / FULL_CURRICULUM_SHARE) if frac < FULL_CURRICULUM_SHARE else STAGE2_MIX
    return mix_at(frac)


# model sizes: (hidden, intermediate, layers, heads, kv heads); head_dim 32 in both real sizes
SIZES = {"tiny": (64, 128, 2, 4, 2),  # for smoke tests
         "small": (256, 704, 6, 8, 4),  # 4.7M parameters: agent-tiny as shipped, 18.8 MB in fp32
         "medium": (320, 864, 8, 10, 5)}  # 9.3M parameters: 18.7 MB in fp16 (--save-dtype float16)


def agent_model_config(vocab_size: int, size: str = "small", eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
    hidden, inter, layers, heads, kv_heads = SIZES[size]
    return ModelConfig(family="llama", vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=1024,
                       rope_theta=10000.0, tie_word_embeddings=True, eos_token_ids=eos_token_ids)


def init_for_training(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    n_layers = model.config.num_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * n_layers), generator=gen)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def hidden_states(model, ids, attn: str = "sdpa"):
    """Final-norm hidden states (B, S, E) of the causal no-cache forward, equal to ``model(ids)`` before ``lm_head``.

    Written out here (same parameters, same math) so training can use causal SDPA (``is_causal``; ``sdpa_gqa``: with
    SDPA's grouped-query attention instead of repeated K/V) or plain matmul+softmax attention, which are faster on CPU
    than the reference's boolean-mask SDPA."""
    import torch
    import torch.nn.functional as F

    from ..models.llama import apply_rope

    b, s = ids.shape
    cos, sin = model.rope_cos[:s], model.rope_sin[:s]
    x = model.embed_tokens(ids)
    causal = None
    for layer in model.layers:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(b, s, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, s, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if attn == "sdpa_gqa":  # K/V heads shared inside SDPA, no repeated copies (benchmarks/train_step.py: no faster)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            rep = a.num_heads // a.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            if attn == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                if causal is None:
                    causal = torch.full((s, s), float("-inf")).triu(1)
                scores = (q @ k.transpose(-1, -2)) * (a.head_dim ** -0.5) + causal
                o = scores.softmax(-1).to(v.dtype) @ v
        x = x + a.o_proj(o.transpose(1, 2).reshape(b, s, a.num_heads * a.head_dim))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)


def batch_loss(model, ids, targets, mask, attn: str = "sdpa"):
    """Mean cross-entropy over the masked (assistant) target positions."""
    import torch.nn.functional as F

    h = hidden_states(model, ids, attn)
    sel = h[mask]  # (N, E): only positions that predict an assistant token
    logits = model.lm_head(sel).float()
    return F.cross_entropy(logits, targets[mask])


def chunk_batches(tok, seed: int, max_len: int, batch_tokens: int, chunk: int, pack_len: int, start: int,
                  mix: dict[str, float] | None) -> list[list[tuple[list[int], list[bool]]]]:
    """Tasks ``start .. start+chunk`` of the train split, packed into conversations, tokenized and batched (rows of
    similar length, at most ``batch_tokens`` per batch), in an order shuffled by (seed, start): the same chunk
    whichever process makes it."""
    tasks = generate_tasks(chunk, "train", seed, mix=mix, start=start)
    rows = []
    for group in _pack(tok, tasks, pack_len):
        messages, no_loss = list(group[0].episode), set(group[0].no_loss)
        for t in group[1:]:  # later tasks continue the same conversation (one system prompt)
            no_loss |= {i - 1 + len(messages) for i in t.no_loss}
            messages += t.episode[1:]
        text, spans = render_with_loss_spans(messages, no_loss)
        ids, flags = tokenize_episode(tok, text, spans)
        if len(ids) <= max_len:
            rows.append((ids, flags))
    rows.sort(key=lambda r: len(r[0]))
    batches, cur = [], []
    for r in rows:
        if cur and (len(cur) + 1) * len(r[0]) > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(r)
    if cur:
        batches.append(cur)
    random.Random(f"{seed}/{start}").shuffle(batches)
    return batches


def _pack(tok, tasks, pack_len: int):
    """Group consecutive tasks into one multi-turn conversation of at most ~``pack_len`` tokens: the system prompt
    is paid once per row instead of once per task (it is a third of a short episode). Only tasks with the same
    system prompt (the same tools) share a row."""
    groups, cur, cur_len = [], [], 0
    for t in tasks:
        n = len(tok.encode(episode_text(t)[0]).ids)
        sys_len = len(tok.encode(render_chat(t.episode[:1])).ids)
        extra = n if not cur else n - sys_len
        if cur and (cur_len + extra > pack_len or t.episode[0] != cur[0].episode[0]):
            groups.append(cur)
            cur, cur_len, extra = [], 0, n
        cur.append(t)
        cur_len += extra
    if cur:
        groups.append(cur)
    return groups


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_json: str) -> None:
    global _WORKER_TOKENIZER
    from tokenizers import Tokenizer

    os.environ["RAYON_NUM_THREADS"] = "1"
    _WORKER_TOKENIZER = Tokenizer.from_str(tokenizer_json)


def _worker_chunk(*args):
    return chunk_batches(_WORKER_TOKENIZER, *args)


class EpisodeStream:
    """Generates, tokenizes and batches training episodes chunk by chunk, in this process or in ``workers`` data
    processes (for a GPU, which one Python process cannot feed: about 200k tokens/s of episodes per process).

    With workers, up to ``2 * workers`` chunks are made ahead with the mix of the moment they were asked for: a
    curriculum phase starts that many chunks (about 100k tokens each) late, nothing else changes."""

    def __init__(self, tok, seed: int, max_len: int, batch_tokens: int, chunk: int = 384, pack_len: int = 640,
                 workers: int = 0):
        self.tok, self.seed, self.max_len, self.batch_tokens, self.chunk = tok, seed, max_len, batch_tokens, chunk
        self.pack_len, self.workers = pack_len, workers
        self.next_index = 0
        self.pad = tok.token_to_id("<|endoftext|>")
        self.batches: list = []
        self.pending: collections.deque = collections.deque()
        self.pool = None
        if workers:
            import multiprocessing

            # spawn: forking a process that already runs torch's thread pools can deadlock the children
            self.pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (tok.to_str(),))

    def _next_chunk_args(self, mix):
        args = (self.seed, self.max_len, self.batch_tokens, self.chunk, self.pack_len, self.next_index, mix)
        self.next_index += self.chunk
        return args

    def _refill(self, mix: dict[str, float]) -> None:
        if self.pool is None:
            self.batches = chunk_batches(self.tok, *self._next_chunk_args(mix))
            return
        while len(self.pending) < 2 * self.workers:
            self.pending.append(self.pool.apply_async(_worker_chunk, self._next_chunk_args(mix)))
        self.batches = self.pending.popleft().get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def next_batch(self, mix: dict[str, float]):
        import torch

        while not self.batches:
            self._refill(mix)
        rows = self.batches.pop()
        length = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        loss_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, (r_ids, flags) in enumerate(rows):
            ids[i, :len(r_ids)] = torch.tensor(r_ids)
            loss_mask[i, :len(flags)] = torch.tensor(flags)
        # position t predicts token t+1: inputs ids[:, :-1], targets ids[:, 1:], loss where the target is assistant
        return ids[:, :-1], ids[:, 1:], loss_mask[:, 1:], int(loss_mask.sum()), sum(len(r[0]) for r in rows)


class CpuSteal:
    """Share of CPU time the hypervisor took from this VM since the last call (``steal`` in /proc/stat), or None
    where that is not readable. A time-budgeted run on a throttled host sees fewer tokens: the log says so, since a
    run's quality is judged against runs on other hosts."""

    def __init__(self, path: str = "/proc/stat"):
        self.path = path
        self.last = self._read()

    def _read(self) -> tuple[int, int] | None:
        try:
            with open(self.path) as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (fields[7], sum(fields[:8])) if len(fields) >= 8 else None  # (steal, user..steal)

    def since_last(self) -> float | None:
        now, before = self._read(), self.last
        self.last = now
        if now is None or before is None or now[1] <= before[1]:
            return None
        return (now[0] - before[0]) / (now[1] - before[1])


def mix_at(frac: float) -> dict[str, float]:
    mix = CURRICULUM[0][1]
    for start, m in CURRICULUM:
        if frac >= start:
            mix = m
    return mix


def save_checkpoint(model, out: Path, dtype: str = "float32") -> None:
    import torch
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", getattr(torch, dtype)).contiguous().clone() for k, v in model.state_dict().items()}
    tmp = out / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "dtype": dtype})
    os.replace(tmp, out / "model.safetensors")
    cfg = model.config.to_dict()
    cfg["format"] = FORMAT
    cfg["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def load_trained(folder: str | Path):
    """(LlamaDecoder in eval mode, tokenizers.Tokenizer) from a folder this script wrote."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from ..models.llama import LlamaDecoder

    folder = Path(folder)
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = LlamaDecoder(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), Tokenizer.from_file(str(folder / "tokenizer.json"))


def bf16_is_fast(device) -> bool:
    """Whether bf16 autocast speeds training up on ``device``: on CUDA, and on CPUs with AVX-512 (oneDNN's bf16
    kernels). On an AVX2-only CPU the bf16 matmuls take a slow path: an AMD EPYC (AVX2, 2 cores) trained at about
    123 tokens/s in bf16 (with --compile) against 2600 in fp32 (eager), 2026-12-01."""
    import torch

    return device.type != "cpu" or torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def val_loss(model, tok, seed: int, attn: str, n: int = 48, bf16: bool = True) -> float:
    import torch

    tasks = generate_tasks(n, "heldout", seed, start=10 ** 7)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for t in tasks:
            text, spans = episode_text(t)
            ids, flags = tokenize_episode(tok, text, spans)
            if len(ids) > model.config.max_position_embeddings:
                continue  # longer than the model's positions (training drops such rows too)
            x = torch.tensor([ids], device=device)
            m = torch.tensor([flags], device=device)[:, 1:]
            loss = batch_loss(model, x[:, :-1], x[:, 1:], m, attn)
            total += float(loss) * int(m.sum())
            count += int(m.sum())
    return total / max(count, 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=75.0,
                   help="wall-clock budget for the whole run up to the saved model (tokenizer, compile, training, "
                        "final validation and save); the evaluation after it (--eval-tasks) is not counted")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=60)
    p.add_argument("--batch-tokens", type=int, default=6144)
    p.add_argument("--pack-len", type=int, default=640, help="pack tasks into conversations of ~this many tokens")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--tokenizer-episodes", type=int, default=4000)
    p.add_argument("--tokens", type=float, default=0,
                   help="train on this many tokens (e.g. 8e6), the learning-rate schedule and curriculum running over "
                        "tokens, so the run does not depend on the machine's speed (the --minutes budget still stops "
                        "it); 0: steps or the wall clock")
    p.add_argument("--mix", choices=MIXES, default="curriculum",
                   help="episode kinds: the stage-1 curriculum (single tools, chains, long contexts, recovery), or "
                        "stage2 (everyday phrasings and generated tools with a replay of the last curriculum phase; "
                        "for fine-tuning with --init-from), or full (the curriculum over the first half of the "
                        "tokens, then stage2: both stages from scratch in one run)")
    p.add_argument("--max-steps", type=int, default=0,
                   help="train this many steps, the learning-rate schedule and curriculum running over steps instead "
                        "of the wall clock, so the run does not depend on the machine's speed (the --minutes budget "
                        "still stops it); 0: the wall-clock budget alone")
    p.add_argument("--device", default="cpu",
                   help="torch device to train on (cpu, cuda, ...); evaluation and checkpoints run on the CPU")
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="model size when starting from scratch (default small): small is agent-tiny as shipped "
                        "(4.7M parameters), medium 9.3M (ships in fp16 to stay under 20 MB), tiny for smoke tests")
    p.add_argument("--save-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the saved weights (they load into an fp32 model either way)")
    p.add_argument("--data-workers", type=int, default=0,
                   help="processes that generate and tokenize episodes (0: this process); a GPU needs a few")
    p.add_argument("--attn", choices=["sdpa", "sdpa_gqa", "matmul"], default="sdpa")
    p.add_argument("--no-bf16", action="store_true",
                   help="train in fp32 (the default on CPUs without AVX-512, where bf16 is slow)")
    p.add_argument("--compile", action="store_true",
                   help="run the training step through torch.compile(dynamic=True): about 1.15x the tokens/s on 2 CPU "
                        "cores (benchmarks/train_step.py) after about 3 minutes of compiling, counted in the budget")
    p.add_argument("--log-seconds", type=float, default=30.0)
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--eval-tasks", type=int, default=100)
    p.add_argument("--eval-minutes", type=float, default=8.0)
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="continue from a folder this script wrote (its tokenizer and weights) instead of starting over")
    p.add_argument("--curriculum-from", type=float, default=0.0,
                   help="start the curriculum this far in (0-1), e.g. when continuing a run")
    args = p.parse_args(argv)
    if args.init_from and args.size:
        p.error(f"--size {args.size} with --init-from: the model continued from {args.init_from} keeps its own size; "
                "drop one of them")
    if args.data_workers < 0:
        p.error(f"--data-workers must be 0 (episodes made in this process) or more, got {args.data_workers}")
    args.size = args.size or "small"
    if args.init_from:
        missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json")
                   if not (Path(args.init_from) / f).is_file()]
        if missing:
            p.error(f"--init-from {args.init_from}: no {', '.join(missing)} there; give a folder this script wrote "
                    "(or agentopt_compiler/models/agent_tiny)")

    t_start = time.time()  # before importing torch: the budget counts the whole process
    if args.threads == 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise SystemExit(f"train.py: error: --device {args.device}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"train.py: error: --device {args.device}, but this torch ({torch.__version__}) sees no CUDA "
                         "GPU; train with --device cpu")
    budget = args.minutes * 60.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "train_log.jsonl").open("a")

    def log(msg: str, **rec) -> None:
        print(msg, flush=True)
        if rec:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    # 1. tokenizer, trained on the full mix of episode kinds (train split only), or the one of the run we continue
    continued = None
    if args.init_from:
        continued, tok = load_trained(args.init_from)
    else:
        tok_tasks = generate_tasks(args.tokenizer_episodes, "train", args.seed + 10_000,
                                   mix=STAGE2_MIX if args.mix == "full" else None)
        tok = train_tokenizer([episode_text(t)[0] for t in tok_tasks], args.vocab_size)
    save_tokenizer(tok, out)
    eos = tuple(tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>"))
    vocab = tok.get_vocab_size()
    assert all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS)

    # 2. model
    from ..models.registry import build_model

    if continued is not None:
        model, config = continued, continued.config
    else:
        config = agent_model_config(vocab, args.size, eos)
        model = build_model(config, args.seed)
        init_for_training(model, args.seed)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M params, vocab {vocab}, config {json.dumps(config.to_dict())}",
        event="model", params=n_params)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    stream = EpisodeStream(tok, args.seed, config.max_position_embeddings, args.batch_tokens,
                           pack_len=args.pack_len, workers=args.data_workers)
    t_train = time.time()
    train_budget = max(budget - (t_train - t_start) - FINAL_RESERVE_S, 1.0)

    def lr_at(step: int, frac: float) -> float:
        warm = min(1.0, (step + 1) / args.warmup_steps)
        cos = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        return args.lr * warm * cos

    step, seen_tokens, seen_loss_tokens = 0, 0, 0
    window_loss, window_n, window_tokens, t_window = 0.0, 0, 0, time.time()
    steal = CpuSteal()
    losses = []
    last_ckpt = time.time()
    use_bf16 = not args.no_bf16 and bf16_is_fast(device)
    if not args.no_bf16 and not use_bf16:
        log(f"training in fp32: this CPU's vector capability is {torch.backends.cpu.get_cpu_capability()}; without "
            "AVX-512, bf16 autocast runs about 20x slower than fp32 (--no-bf16 asks for fp32 explicitly)")
    step_loss = batch_loss
    if args.compile:
        # dynamic=True: batches vary in rows and length; symbolic shapes serve them all but one-row batches and
        # batches over 4096 tokens, which compile once more each (TORCH_LOGS=recompiles shows it)
        step_loss = torch.compile(batch_loss, dynamic=True)
        log("compiling the training step with torch.compile (the first step takes a few minutes)")
    while True:
        time_frac = (time.time() - t_train) / train_budget
        frac = (seen_tokens / args.tokens if args.tokens else step / args.max_steps if args.max_steps
                else time_frac)
        if frac >= 1.0 or time_frac >= 1.0:
            break
        curriculum_frac = args.curriculum_from + (1 - args.curriculum_from) * frac
        mix = mix_for(args.mix, curriculum_frac)
        x, y, m, n_loss, n_tok = stream.next_batch(mix)
        x, y, m = x.to(device), y.to(device), m.to(device)
        lr = lr_at(step, frac)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = step_loss(model, x, y, m, args.attn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        step += 1
        lv = loss.item()
        losses.append(lv)
        seen_tokens += n_tok
        seen_loss_tokens += n_loss
        window_loss += lv
        window_n += 1
        window_tokens += n_tok
        now = time.time()
        if now - t_window >= args.log_seconds or step == 1:
            phase = ("stage2" if mix is STAGE2_MIX else
                     next(i + 1 for i, (_, m) in enumerate(CURRICULUM) if m is mix))
            tps = window_tokens / max(now - t_window, 1e-6)
            stolen = steal.since_last()
            log(f"step {step} | elapsed {now - t_start:.0f}s | phase {phase} | loss {window_loss / window_n:.4f} | "
                f"lr {lr:.2e} | gnorm {gnorm:.2f} | {tps:.0f} tok/s | tokens {seen_tokens / 1e6:.2f}M "
                f"(assistant {seen_loss_tokens / 1e6:.2f}M)" + ("" if stolen is None else f" | cpu steal {stolen:.0%}"),
                event="log", step=step, elapsed=round(now - t_start, 1), phase=phase,
                loss=window_loss / window_n, lr=lr, tok_per_s=tps, tokens=seen_tokens, cpu_steal=stolen)
            window_loss, window_n, window_tokens, t_window = 0.0, 0, 0, now
        if now - last_ckpt >= args.checkpoint_minutes * 60:
            model.eval()
            vl = val_loss(model, tok, args.seed, args.attn, bf16=use_bf16)
            model.train()
            save_checkpoint(model, out, args.save_dtype)
            log(f"checkpoint at step {step} ({now - t_start:.0f}s): held-out val loss {vl:.4f}",
                event="checkpoint", step=step, val_loss=vl)
            last_ckpt = time.time()

    stream.close()
    model.to("cpu").eval()
    save_checkpoint(model, out, args.save_dtype)
    train_seconds = time.time() - t_train
    vl = val_loss(model, tok, args.seed, args.attn, n=16 if args.size == "tiny" else 48, bf16=use_bf16)
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    summary = {"steps": step, "train_seconds": round(train_seconds, 1), "tokens": seen_tokens,
               "tokens_per_s": round(seen_tokens / max(train_seconds, 1e-6), 1), "val_loss": vl,
               "first_loss": losses[0] if losses else None,
               "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
               "params": n_params, "safetensors_mb": round(size_mb, 2)}
    log(f"done: {json.dumps(summary)}", event="done", **summary)

    # 3. agent-loop evaluation on held-out generator tasks: the folder compiled to an engine, run by the runtime Agent
    if args.eval_tasks:
        from .eval import main as eval_main

        reports = eval_main([str(out), "--set", "generator", "--tasks", str(args.eval_tasks), "--seed", str(args.seed),
                             "--threads", str(args.threads), "--minutes", str(args.eval_minutes),
                             "--json", str(out / "eval.json")])
        report = reports["generator"]
        log("eval done", event="eval", **{k: v for k, v in report.items() if k not in ("examples", "results")})
        summary["eval"] = {k: v for k, v in report.items() if k not in ("examples", "results")}
    log_file.close()
    summary["losses"] = losses
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
