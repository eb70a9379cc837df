#!/usr/bin/env python
"""Serving benchmark: N concurrent agent sessions through the HTTP API, continuous batching against serving them
one at a time, in one run.

    python benchmarks/serving.py                              # ref-60m and agent-tiny, N = 1, 2, 4, 8
    python benchmarks/serving.py --model tiny-random --sessions 1,2 --turns 2 --system-tokens 64 \\
        --observation-tokens 8 --new-tokens 4 --repeats 1     # smoke run (a minute)

The workload, per session: a system prompt of ``--system-tokens`` tokens (the same for every session: a system prompt
plus tool schemas), a task, then ``--turns`` turns; each turn generates ``--new-tokens`` tokens greedily (the
``ignore_eos`` extension: end-of-sequence does not stop it) and appends them and a tool observation of
``--observation-tokens`` tokens to the history. Sessions run concurrently, each turn right after the previous one;
every request streams (SSE) and is timed per chunk by a plain HTTP client (http.client: the client's own CPU use is
part of what a 2-core machine shares).

Systems, each measured at every N:
    slots          agentopt serve --slots 8: sessions decode together, one batched call per step (the new server)
    serial         agentopt serve --slots 1: one session's request at a time (what serve did before)
    one by one     no server: the N sessions run one after another on the engine with one slot (Conversation +
                   a shared PrefixCache), the fastest way to serve them without batching
Also: the slotted server at 4 sessions without its prefix cache (--prefix-cache-mb 0), and a burst of 64 requests
at once on 8 slots with a queue of 64 (every client gets an answer or a 429, none a dropped connection).

Reported per system and N: aggregate generated tokens/s (all sessions' tokens over the wall time), time to first
token and inter-token latency (gaps between streamed chunks within a turn; p50 / p95 over all turns of all sessions),
prompt tokens prefilled and reused, and whether every session's text equals the same session served alone (the
slotted server at N = 1). Each server runs in its own process with ``--threads``; ranges are over ``--repeats`` runs.
Not a test: run it by hand; the markdown report goes to stdout (and ``--json PATH``).
"""

from __future__ import annotations

import http.client
import json
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import benchmark_parser, environment, log, run_facts  # noqa: E402

WORDS = ("agent tool call result status order shipment invoice weather city search query index record user "
         "account balance transfer report summary error retry timeout value field list item").split()


@dataclass
class Turn:
    ttft_s: float
    gaps_s: list[float]
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class SystemRun:
    system: str
    sessions: int
    seconds: float
    turns: list[list[Turn]]  # [session][turn]
    rows_per_step: float | None = None  # sessions per decode call, from the server's /metrics

    @property
    def generated(self) -> int:
        return sum(t.completion_tokens for s in self.turns for t in s)

    @property
    def texts(self) -> list[list[str]]:
        return [[t.text for t in s] for s in self.turns]


# -- model ------------------------------------------------------------------------------------------------------------
def model_source(model: str, work_dir: Path) -> str:
    """What to compile. A built-in model whose tokenizer is smaller than its vocabulary (ref-60m: a 261-token byte
    tokenizer, 32000 logits) is written as a Hugging Face folder whose tokenizer also names ids 261..V-1 (" w<id>"),
    so every generated token has text: streamed chunks are then one per token, and a reply sent back as history
    encodes to the ids that were generated."""
    from agentopt_compiler.models.hf_loader import save_as_hf_folder
    from agentopt_compiler.models.registry import BUILTIN_MODELS, load_model

    if model not in BUILTIN_MODELS:
        return model
    loaded = load_model(model)
    tokenizer_file = loaded.tokenizer_dir / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text())
    size = max([*spec["model"]["vocab"].values(), *(t["id"] for t in spec.get("added_tokens", []))]) + 1
    vocab = loaded.config.vocab_size
    if size >= vocab:
        return model
    folder = save_as_hf_folder(loaded.model, work_dir / f"serving-{model}-hf", loaded.tokenizer_dir)
    spec["added_tokens"] = spec.get("added_tokens", []) + [
        {"id": i, "content": f" w{i}", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": False} for i in range(size, vocab)]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return str(folder)


# -- workload ---------------------------------------------------------------------------------------------------------
def text_of(tokenizer, tokens: int, seed: int, prefix: str = "") -> str:
    """Text of exactly ``tokens`` tokens for this tokenizer (words, cut at the token count and decoded back)."""
    import random

    rng = random.Random(seed)
    words = prefix
    while len(tokenizer.encode(words, add_special_tokens=False)) < tokens:
        words += " " + " ".join(rng.choice(WORDS) for _ in range(16))
    return tokenizer.decode(tokenizer.encode(words, add_special_tokens=False)[:tokens])


@dataclass
class Workload:
    system: str
    tasks: list[str]  # per session
    observations: list[list[str]]  # [session][turn]
    new_tokens: int

    def messages(self, session: int, replies: list[str]) -> list[dict]:
        messages = [{"role": "system", "content": self.system}, {"role": "user", "content": self.tasks[session]}]
        for turn, reply in enumerate(replies):
            messages += [{"role": "assistant", "content": reply},
                         {"role": "tool", "content": self.observations[session][turn]}]
        return messages


def make_workload(tokenizer, args, sessions: int, run_id: int) -> Workload:
    """Every run gets its own texts, so no run continues another's conversations or prefix."""
    system = text_of(tokenizer, args.system_tokens, seed=run_id, prefix=f"run {run_id}. You are an agent.")
    tasks = [f"Task {run_id}-{s}: look up the records and report." for s in range(sessions)]
    observations = [[text_of(tokenizer, args.observation_tokens, seed=run_id * 1000 + s * 100 + t,
                             prefix=f"result {s}.{t}:") for t in range(args.turns)] for s in range(sessions)]
    return Workload(system, tasks, observations, args.new_tokens)


# -- clients ----------------------------------------------------------------------------------------------------------
def stream_turn(port: int, model: str, messages: list[dict], new_tokens: int) -> tuple[int, Turn | None]:
    """One streamed request; (HTTP status, timings and text) — None for a refused request."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        response.read()
        connection.close()
        return response.status, None
    arrivals, pieces, usage = [], [], {}
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            content = choice["delta"].get("content")
            if content:
                arrivals.append(time.perf_counter())
                pieces.append(content)
    connection.close()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return 200, Turn(arrivals[0] - start if arrivals else float("nan"), gaps, "".join(pieces),
                     usage.get("prompt_tokens", 0), usage.get("prompt_tokens_details", {}).get("cached_tokens", 0),
                     usage.get("completion_tokens", 0))


def run_sessions(port: int, model: str, workload: Workload, sessions: int, label: str) -> SystemRun:
    turns: list[list[Turn]] = [[] for _ in range(sessions)]
    errors: list[str] = []

    def session(index: int) -> None:
        replies: list[str] = []
        for _turn in range(len(workload.observations[index])):
            status, turn = stream_turn(port, model, workload.messages(index, replies), workload.new_tokens)
            if turn is None:
                errors.append(f"session {index}: HTTP {status}")
                return
            turns[index].append(turn)
            replies.append(turn.text)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{label}: " + "; ".join(errors))
    return SystemRun(label, sessions, seconds, turns)


def burst(port: int, model: str, clients: int) -> dict:
    """``clients`` requests at once: how many got 200, 429, another status, or no answer at all."""
    counts: dict = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        try:
            status, _ = stream_turn(port, model, [{"role": "user", "content": f"burst {i}"}], 16)
            key = str(status)
        except (OSError, http.client.HTTPException) as exc:
            key = f"dropped ({type(exc).__name__})"
        with lock:
            counts[key] = counts.get(key, 0) + 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


# -- systems ----------------------------------------------------------------------------------------------------------
def rows_per_step(port: int) -> float:
    """Mean sessions per decode call so far (agentopt_decode_rows_total / agentopt_decode_steps_total)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/metrics")
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1])
              for line in connection.getresponse().read().decode().splitlines() if line and line[0] != "#"}
    connection.close()
    return values["agentopt_decode_rows_total"] / max(1.0, values["agentopt_decode_steps_total"])


class Server:
    """``agentopt serve`` in its own process on a free port."""

    def __init__(self, engine: str, threads: int, *options: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        command = [sys.executable, "-m", "agentopt_compiler", "serve", engine, "--port", str(self.port),
                   "--threads", str(threads), *options]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None:
                    raise RuntimeError(f"agentopt serve exited: {self.process.stderr.read()[-2000:]}")
                time.sleep(0.1)
        raise RuntimeError("agentopt serve did not start within a minute")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


def one_by_one(engine_folder: str, threads: int, workload: Workload, sessions: int) -> SystemRun:
    """The sessions one after another on a one-slot engine, no HTTP: Conversation.prefill_to + generate per turn,
    the system prompt shared through a PrefixCache."""
    import agentopt_compiler as ao
    from agentopt_compiler.runtime.chat import render_chat
    from agentopt_compiler.runtime.engine import GenerationConfig
    from agentopt_compiler.runtime.generation import TextStream
    from agentopt_compiler.runtime.prefix_cache import PrefixCache

    engine = ao.load_engine(engine_folder, threads=threads, slots=1)
    tokenizer, shared = engine.tokenizer, PrefixCache()
    config = GenerationConfig(max_new_tokens=workload.new_tokens, ignore_eos=True)
    head = tokenizer.encode(render_chat(tokenizer, [{"role": "system", "content": workload.system}],
                                        add_generation_prompt=False), add_special_tokens=False)
    turns: list[list[Turn]] = []
    start = time.perf_counter()
    for index in range(sessions):
        conversation, replies, session_turns = engine.conversation(shared), [], []
        for _turn in range(len(workload.observations[index])):
            ids = tokenizer.encode(render_chat(tokenizer, workload.messages(index, replies)),
                                   add_special_tokens=False)
            reused_before, began = conversation.reused_tokens, time.perf_counter()
            logits = conversation.prefill_to(ids)
            if not shared.lookup(head)[0]:
                conversation.remember_prefix(len(head))
            text, arrivals, count = TextStream(tokenizer), [], 0
            for token in conversation.generate(logits, config):
                count += 1
                if text.push(token):
                    arrivals.append(time.perf_counter())
            if text.flush():
                arrivals.append(time.perf_counter())
            session_turns.append(Turn(arrivals[0] - began, [b - a for a, b in zip(arrivals, arrivals[1:])],
                                      text.visible, len(ids), conversation.reused_tokens - reused_before, count))
            replies.append(text.visible)
        conversation.release()
        turns.append(session_turns)
    return SystemRun("one by one", sessions, time.perf_counter() - start, turns)


# -- report -----------------------------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(v for v in values if v == v)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def summarize(runs: list[SystemRun]) -> dict:
    """Medians and ranges over repeated runs of one system at one N."""
    rates = [r.generated / r.seconds for r in runs]
    ttfts = [[t.ttft_s for s in r.turns for t in s] for r in runs]
    gaps = [[g for s in r.turns for t in s for g in t.gaps_s] for r in runs]
    return {"tokens_per_s": statistics.median(rates), "tokens_per_s_range": [min(rates), max(rates)],
            "seconds": statistics.median(r.seconds for r in runs),
            "seconds_range": [min(r.seconds for r in runs), max(r.seconds for r in runs)],
            "ttft_p50_ms": 1000 * statistics.median(percentile(t, 0.5) for t in ttfts),
            "ttft_p95_ms": 1000 * statistics.median(percentile(t, 0.95) for t in ttfts),
            "itl_p50_ms": 1000 * statistics.median(percentile(g, 0.5) for g in gaps),
            "itl_p95_ms": 1000 * statistics.median(percentile(g, 0.95) for g in gaps),
            "itl_p95_ms_range": [1000 * min(percentile(g, 0.95) for g in gaps),
                                 1000 * max(percentile(g, 0.95) for g in gaps)],
            "prefilled": sum(t.prompt_tokens - t.cached_tokens for s in runs[0].turns for t in s),
            "reused": sum(t.cached_tokens for s in runs[0].turns for t in s),
            "generated": runs[0].generated,
            "rows_per_step": statistics.median(r.rows_per_step for r in runs) if runs[0].rows_per_step else None}


def fmt_range(value: float, bounds: list[float], digits: int = 0) -> str:
    return f"{value:.{digits}f} ({bounds[0]:.{digits}f}–{bounds[1]:.{digits}f})"


def report(model: str, settings: dict, env: dict, results: dict, identical: dict, extras: dict) -> str:
    lines = [f"### {model}", "",
             f"{settings['system_tokens']}-token shared system prompt, {settings['turns']} turns of "
             f"+{settings['observation_tokens']} observation tokens and {settings['new_tokens']} generated, "
             f"greedy; servers with --threads {settings['threads']}, --prefill-chunk {settings['prefill_chunk']}; "
             f"medians of {settings['repeats']} runs, ranges in brackets.", "",
             "| system | sessions | generated tok/s | vs one session | total s | TTFT p50 / p95 ms | "
             "ITL p50 / p95 ms | prefilled / reused | sessions per decode call | same text as alone |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    single = results[("slots", 1)]["tokens_per_s"]
    for (system, n), s in sorted(results.items(), key=lambda kv: (kv[0][0] != "slots", kv[0][0], kv[0][1])):
        lines.append(f"| {system} | {n} | {fmt_range(s['tokens_per_s'], s['tokens_per_s_range'])} | "
                     f"{s['tokens_per_s'] / single:.2f}x | {fmt_range(s['seconds'], s['seconds_range'], 2)} | "
                     f"{s['ttft_p50_ms']:.0f} / {s['ttft_p95_ms']:.0f} | {s['itl_p50_ms']:.1f} / "
                     f"{s['itl_p95_ms']:.1f} | {s['prefilled']} / {s['reused']} | "
                     f"{'–' if s['rows_per_step'] is None else format(s['rows_per_step'], '.2f')} | "
                     f"{identical.get((system, n), '–')} |")
    lines.append("")
    for key, value in extras.items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, repeats=2, repeats_help="timed runs per system and N (ranges are over them)")
    parser.set_defaults(model="ref-60m,agent-tiny", threads=2)
    parser.add_argument("--sessions", default="1,2,4,8", help="concurrent sessions to measure (comma-separated)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--observation-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--burst", type=int, default=64, help="clients of the burst check (0: skip)")
    args = parser.parse_args(argv)
    import agentopt_compiler as ao

    counts = [int(n) for n in args.sessions.split(",")]
    if 1 not in counts:  # every ratio in the report is against one session (found missing only after the runs)
        parser.error(f"--sessions {args.sessions}: include 1, the single session the report compares against")
    settings = {k: getattr(args, k) for k in ("turns", "system_tokens", "observation_tokens", "new_tokens",
                                               "threads", "prefill_chunk", "repeats")}
    env = environment(args.threads)
    sections = ["## Serving benchmark", "", f"- date: {env['date']}",
                *run_facts(env, "benchmarks/serving.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))),
                ""]
    everything = {}
    for model in args.model.split(","):
        folder = Path(args.work_dir) / f"serving-{model}"
        context = args.system_tokens + args.turns * (args.observation_tokens + args.new_tokens + 64) + 256
        log(f"{model}: compiling (context {context})")
        engine = ao.compile(model_source(model, Path(args.work_dir)), out=folder, context_length=context,
                            overwrite=True)
        tokenizer, name = engine.tokenizer, engine.manifest["model"]["name"]
        del engine
        runs: dict = {}
        run_id = 0
        for repeat in range(args.repeats):
            for n in counts:
                for system, options in (("slots", ["--slots", "8"]), ("serial", ["--slots", "1"])):
                    run_id += 1
                    workload = make_workload(tokenizer, args, n, run_id)
                    log(f"{model}: {system}, {n} session(s), run {repeat + 1}")
                    with Server(str(folder), args.threads, *options, "--prefill-chunk", str(args.prefill_chunk)) \
                            as server:
                        measured = run_sessions(server.port, name, workload, n, system)
                        measured.rows_per_step = rows_per_step(server.port)
                        runs.setdefault((system, n), []).append(measured)
                run_id += 1
                log(f"{model}: one by one, {n} session(s), run {repeat + 1}")
                runs.setdefault(("one by one", n), []).append(
                    one_by_one(str(folder), args.threads, make_workload(tokenizer, args, n, run_id), n))
            if 4 in counts:
                run_id += 1
                log(f"{model}: slots without prefix cache, 4 sessions, run {repeat + 1}")
                with Server(str(folder), args.threads, "--slots", "8", "--prefix-cache-mb", "0", "--prefill-chunk",
                            str(args.prefill_chunk)) as server:
                    runs.setdefault(("slots, no prefix cache", 4), []).append(
                        run_sessions(server.port, name, make_workload(tokenizer, args, 4, run_id), 4, "no prefix"))
        # the same texts again for the identity check: every session of the largest N served alone
        largest = max(counts)
        check = make_workload(tokenizer, args, largest, 0)
        with Server(str(folder), args.threads, "--slots", "8", "--prefill-chunk", str(args.prefill_chunk)) as server:
            alone = [run_sessions(server.port, name, Workload(check.system, [check.tasks[i]], [check.observations[i]],
                                                              check.new_tokens), 1, "alone").texts[0]
                     for i in range(largest)]
        identical = {}
        for system, options in (("slots", ["--slots", "8"]), ("serial", ["--slots", "1"])):
            with Server(str(folder), args.threads, *options, "--prefill-chunk", str(args.prefill_chunk)) as server:
                together = run_sessions(server.port, name, check, largest, system).texts
            identical[(system, largest)] = "yes" if together == alone else \
                f"no ({sum(a != b for a, b in zip(together, alone))} of {largest} sessions differ)"
        by_one = one_by_one(str(folder), args.threads, check, largest).texts
        identical[("one by one", largest)] = "yes" if by_one == alone else \
            f"no ({sum(a != b for a, b in zip(by_one, alone))} of {largest} sessions differ)"
        extras = {}
        if args.burst:
            with Server(str(folder), args.threads, "--slots", "8", "--max-waiting", "64") as server:
                extras[f"burst of {args.burst} requests at once on 8 slots, queue 64"] = burst(server.port, name,
                                                                                              args.burst)
        results = {key: summarize(value) for key, value in runs.items()}
        single_step = results[("slots", 1)]["itl_p50_ms"]
        if ("slots", 8) in results:
            s8 = results[("slots", 8)]
            extras["8 sessions: aggregate tok/s vs one session"] = \
                f"{s8['tokens_per_s'] / results[('slots', 1)]['tokens_per_s']:.2f}x (target >= 4x)"
            extras["8 sessions: p95 inter-token latency vs the single-session step (ITL p50 at 1 session)"] = \
                f"{s8['itl_p95_ms'] / single_step:.2f}x (target <= 2.5x; runs " \
                f"{s8['itl_p95_ms_range'][0] / single_step:.2f}–{s8['itl_p95_ms_range'][1] / single_step:.2f}x)"
        if ("slots, no prefix cache", 4) in results and ("slots", 4) in results:
            shared, unshared = results[("slots", 4)], results[("slots, no prefix cache", 4)]
            extras["4 sessions: total time with the prefix cache vs without"] = \
                f"{shared['seconds'] / unshared['seconds']:.2f}x (target <= 0.6x); prefilled {shared['prefilled']} " \
                f"vs {unshared['prefilled']} tokens"
        sections.append(report(model, settings, env, results, identical, extras))
        everything[model] = {"results": {f"{k[0]} x{k[1]}": v for k, v in results.items()},
                             "identical": {f"{k[0]} x{k[1]}": v for k, v in identical.items()}, "extras": extras}
    text = "\n".join(sections)
    sys.stdout.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "environment": env, "models": everything,
                                               "report_markdown": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
