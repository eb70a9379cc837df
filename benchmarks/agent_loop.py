#!/usr/bin/env python
"""Agent-loop benchmark: multi-turn KV reuse on our engine against stateless re-prefill and two peers, in one run.

    python benchmarks/agent_loop.py                        # ref-60m: 1000-token system prompt, 8 turns of +64 / 32
    python benchmarks/agent_loop.py --model tiny-random --system-tokens 48 --observation-tokens 8 --new-tokens 4 \\
        --turns 2 --repeats 1                              # smoke run (seconds)

The workload: a system prompt (random token ids standing for a system prompt plus tool schemas), then ``--turns``
turns; each turn appends an observation (random ids) to the history and generates ``--new-tokens`` tokens greedily
(end-of-sequence never stops it), which stay in the history. So a turn's new input is the previous turn's generated
tokens plus its observation.

Single agent, each system with ``--threads`` intra-op threads:
    ours, KV reuse                 one Conversation: prefill_to(history) computes KV only for tokens not cached yet
    ours, stateless                engine.stream_ids(whole history) each turn (re-prefills everything)
    transformers, cache carried    AutoModelForCausalLM.generate(history, cache=DynamicCache carried across turns)
    onnxruntime-genai, exact       one Generator; each turn rewind_to(token_count() - 1), then append_tokens(
                                   [last generated token] + observation), so the last token's KV is computed
    onnxruntime-genai, obvious     one Generator; append_tokens(observation) right after generating: the last
                                   generated token's KV is never computed (known to drift; shown, not a target)
Concurrent agents (ours only): ``--agents`` conversations with the same system prompt and different observations,
run round-robin turn by turn on one engine, with a shared PrefixCache (agent 1 calls remember_prefix(system prompt)
after its first prefill) and without.

Every system's generated tokens are compared turn by turn with a full recompute: our stateless engine run on the
whole history, greedy (fp32 everywhere). One warm-up per system, then ``--repeats`` interleaved rounds; the median
total seconds count. Peers are imported lazily: a missing or failing peer is reported as unavailable, with the reason.

Not a test: run it by hand. Progress goes to stderr, the markdown report to stdout (and ``--json PATH``).
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import (benchmark_parser, build_ort_genai, compile_ours, environment, footer, log,  # noqa: E402
                    make_prompt, publish, run_facts)

OURS_REUSE = "ours, KV reuse"
OURS_STATELESS = "ours, stateless (re-prefill each turn)"
TRANSFORMERS = "transformers, cache carried"
ORT_GENAI = "onnxruntime-genai, exact multi-turn"
ORT_GENAI_NAIVE = "onnxruntime-genai, obvious multi-turn (inexact)"
SYSTEMS = {"ours-reuse": OURS_REUSE, "ours-stateless": OURS_STATELESS, "transformers": TRANSFORMERS,
           "ort-genai": ORT_GENAI, "ort-genai-naive": ORT_GENAI_NAIVE}
AGENTS_SHARED = "ours, {n} agents, shared prefix cache"
AGENTS_UNSHARED = "ours, {n} agents, no prefix cache"


# -- workload and results ---------------------------------------------------------------------------------------------
@dataclass
class Workload:
    system_prompt: list[int]
    observations: list[list[int]]  # one per turn
    new_tokens: int


@dataclass
class AgentRun:
    """One agent's pass through every turn."""

    turns: list[list[int]]  # generated tokens, per turn
    prefilled: list[int] | None  # tokens fed to the model before each turn's first new token (None: not known)
    reused: list[int] | None = None  # tokens whose cached KV each turn reused (ours only)


@dataclass
class Run:
    seconds: float  # all agents, all turns
    agents: list[AgentRun]
    turn_seconds: list[float] = field(default_factory=list)  # per turn (round of all agents)


@dataclass
class Measurement:
    system: str
    agents: int  # agents run together (the concurrent part has its own table even with one)
    group: str  # "single" or "concurrent"
    seconds: float  # median total
    runs_seconds: list[float]
    turn_seconds: list[float]  # per turn, median over the runs
    agent_runs: list[AgentRun] = field(repr=False)  # from the first timed run
    same_as_recompute: bool | None = None
    first_difference: list | None = None  # [agent, turn, token] of the first token that differs (0-based)
    tokens_stable: bool = True  # every timed run generated the same tokens


@dataclass
class Bench:
    settings: dict
    environment: dict
    measurements: list[Measurement] = field(default_factory=list)
    reference: list[list[list[int]]] = field(default_factory=list)  # [agent][turn] -> full-recompute tokens
    unavailable: dict[str, str] = field(default_factory=dict)
    builds: dict[str, dict] = field(default_factory=dict)
    targets: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def make_workloads(args, vocab_size: int, avoid: set[int]) -> list[Workload]:
    """Agent 0 is the single-agent workload; agents 1.. share its system prompt and get their own observations."""
    system = make_prompt(args.system_tokens, vocab_size, avoid, seed=1000 + args.system_tokens)
    count = max(1, args.agents)
    return [Workload(system, [make_prompt(args.observation_tokens, vocab_size, avoid, seed=100_000 * (a + 1) + t)
                              for t in range(args.turns)], args.new_tokens) for a in range(count)]


# -- systems ----------------------------------------------------------------------------------------------------------
# Each returns run_once() -> Run for its workload(s); the clock covers everything per request (cache or generator
# creation, every prefill and decode step), nothing is detokenized.

def ours_reuse_system(engine, workloads: list[Workload], prefix_cache: bool | None):
    """One Conversation per agent, round-robin turn by turn. ``prefix_cache``: None for a single agent without one;
    True/False for the concurrent agents with a fresh shared PrefixCache per run, or none."""
    from agentopt_compiler.runtime.engine import GenerationConfig
    from agentopt_compiler.runtime.prefix_cache import PrefixCache

    config = GenerationConfig(max_new_tokens=workloads[0].new_tokens, ignore_eos=True)

    def run_once() -> Run:
        start = time.perf_counter()
        cache = PrefixCache() if prefix_cache else None
        conversations = [engine.conversation(cache) for _ in workloads]
        histories = [list(w.system_prompt) for w in workloads]
        results = [AgentRun([], [], []) for _ in workloads]
        turn_times = []
        for turn in range(len(workloads[0].observations)):
            for a, (w, conv, history, result) in enumerate(zip(workloads, conversations, histories, results)):
                history += w.observations[turn]
                prefilled, reused = conv.prefilled_tokens, conv.reused_tokens
                logits = conv.prefill_to(history)
                if cache is not None and a == 0 and turn == 0:
                    conv.remember_prefix(len(w.system_prompt))  # the others find the system prompt's KV here
                result.prefilled.append(conv.prefilled_tokens - prefilled)
                result.reused.append(conv.reused_tokens - reused)
                generated = list(conv.generate(logits, config))
                history += generated
                result.turns.append(generated)
            turn_times.append(time.perf_counter())
        seconds = time.perf_counter() - start
        for conv in conversations:
            conv.release()  # untimed: nothing of this run's cache is carried into the next
        return Run(seconds, results, _turn_seconds(start, turn_times))

    return run_once


def ours_stateless_system(engine, workload: Workload):
    from agentopt_compiler.runtime.engine import GenerationConfig

    config = GenerationConfig(max_new_tokens=workload.new_tokens, ignore_eos=True)

    def run_once() -> Run:
        start = time.perf_counter()
        history, result, turn_times = list(workload.system_prompt), AgentRun([], []), []
        for observation in workload.observations:
            history += observation
            result.prefilled.append(len(history))
            generated = list(engine.stream_ids(history, config))  # token ids only (complete() also detokenizes)
            history += generated
            result.turns.append(generated)
            turn_times.append(time.perf_counter())
        return Run(time.perf_counter() - start, [result], _turn_seconds(start, turn_times))

    return run_once


def full_recompute(engine, workload: Workload) -> list[list[int]]:
    """The reference: each turn's tokens from our stateless engine run on the whole history, greedy."""
    return ours_stateless_system(engine, workload)().agents[0].turns


def transformers_system(hf_dir: Path, threads: int, workload: Workload):
    """generate() with a DynamicCache carried across turns (``cache=``, formerly ``past_key_values=``): given the
    whole history, generate feeds only the tokens the cache lacks (the previous turn's last token + observation)."""
    import inspect

    import torch
    import transformers
    from transformers import DynamicCache

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa",
                                                              dtype=torch.float32).eval()
    params = inspect.signature(model.prepare_inputs_for_generation).parameters
    cache_kwarg = "cache" if "cache" in params else "past_key_values"
    fed: list[int] = []  # input length of every forward call: the first one of a generate() call is its prefill

    def count(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        fed.append(int(ids.shape[1]) if ids is not None else -1)

    model.register_forward_pre_hook(count, with_kwargs=True)

    def new_cache():
        try:
            return DynamicCache(config=model.config)
        except TypeError:
            return DynamicCache()

    def run_once() -> Run:
        start = time.perf_counter()
        cache, result, turn_times = new_cache(), AgentRun([], []), []
        history = torch.tensor([workload.system_prompt], dtype=torch.long)
        with torch.inference_mode():
            for observation in workload.observations:
                history = torch.cat([history, torch.tensor([observation], dtype=torch.long)], dim=1)
                calls = len(fed)
                out = model.generate(history, attention_mask=torch.ones_like(history), do_sample=False,
                                     max_new_tokens=workload.new_tokens, eos_token_id=None, pad_token_id=0,
                                     **{cache_kwarg: cache})  # eos None: never stop early
                result.prefilled.append(fed[calls] if len(fed) > calls else -1)
                result.turns.append(out[0, history.shape[1]:].tolist())
                history = out
                turn_times.append(time.perf_counter())
        return Run(time.perf_counter() - start, [result], _turn_seconds(start, turn_times))

    return run_once


def ort_genai_model(model_dir: Path, threads: int, stop_sentinel: int):
    """Load the built model; eos_token_id = pad_token_id = ``stop_sentinel`` (see decode.py: it cannot be told never
    to stop), intra_op_num_threads by overlay (its default used about one core here)."""
    import onnxruntime_genai as og

    config_path = model_dir / "genai_config.json"
    genai_config = json.loads(config_path.read_text())
    genai_config["model"]["eos_token_id"] = [stop_sentinel]
    genai_config["model"]["pad_token_id"] = stop_sentinel
    config_path.write_text(json.dumps(genai_config, indent=4))
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def ort_genai_system(model, context: int, workload: Workload, exact: bool):
    """One Generator for the whole loop. ``exact``: before appending, rewind past the last generated token (chosen
    by generate_next_token() but never run through the model) and append it again with the observation, so its KV
    is computed. Otherwise the obvious path: append the observation right after generating (drifts)."""
    import numpy as np
    import onnxruntime_genai as og

    def run_once() -> Run:
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context, do_sample=False)
        generator = og.Generator(model, params)
        result, turn_times, last = AgentRun([], []), [], None
        for turn, observation in enumerate(workload.observations):
            if turn == 0:
                feed = workload.system_prompt + observation
            elif exact:
                generator.rewind_to(generator.token_count() - 1)
                feed = [last] + observation
            else:
                feed = list(observation)
            generator.append_tokens(np.array(feed, dtype=np.int32))
            result.prefilled.append(len(feed))
            generated = []
            for _ in range(workload.new_tokens):
                generator.generate_next_token()  # runs the previous token (if any), then picks the next greedily
                if generator.is_done():
                    break  # stopped early (the sentinel): fewer tokens, and the token check fails
                generated.append(int(generator.get_next_tokens()[0]))
            result.turns.append(generated)
            if len(generated) < workload.new_tokens:
                turn_times.append(time.perf_counter())
                break
            last = generated[-1]
            turn_times.append(time.perf_counter())
        return Run(time.perf_counter() - start, [result], _turn_seconds(start, turn_times))

    return run_once


def _turn_seconds(start: float, stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip([start] + stamps[:-1], stamps)]


# -- measuring --------------------------------------------------------------------------------------------------------
def measure(systems: dict[str, Callable[[], Run]], group: str, agents: int, repeats: int,
            failed: Callable[[str, Exception], None]) -> list[Measurement]:
    """A warm-up each, then ``repeats`` rounds in which every system runs once, in a rotated order (load from other
    jobs on a shared machine comes and goes; interleaving spreads it over all systems). A system that raises is
    dropped (``failed`` is told) and the others go on."""
    live = dict(systems)
    for name, run_once in list(live.items()):
        try:
            log(f"  warm-up: {name}")
            run_once()
        except Exception as exc:
            failed(name, exc)
            del live[name]
    runs: dict[str, list[Run]] = {name: [] for name in live}
    for r in range(repeats):
        names = list(live)
        names = names[r % len(names):] + names[:r % len(names)] if names else names
        for name in names:
            try:
                run = live[name]()
            except Exception as exc:
                failed(name, exc)
                del live[name], runs[name]
                continue
            runs[name].append(run)
            log(f"  round {r + 1}/{repeats}: {name}: {run.seconds:.2f} s")
    out = []
    for name, results in runs.items():
        tokens = [[a.turns for a in run.agents] for run in results]
        stable = all(t == tokens[0] for t in tokens)
        if not stable:
            log(f"  {name}: repeated runs generated different tokens (the first run's are checked)")
        turns = len(results[0].turn_seconds)
        turn_medians = [statistics.median(run.turn_seconds[t] for run in results if len(run.turn_seconds) > t)
                        for t in range(turns)]
        out.append(Measurement(name, agents, group, statistics.median(run.seconds for run in results),
                               [run.seconds for run in results], turn_medians, results[0].agents,
                               tokens_stable=stable))
    return out


def check_tokens(m: Measurement, reference: list[list[list[int]]]) -> None:
    """Compare every agent's every turn with the full recompute; record the first differing token."""
    m.same_as_recompute, m.first_difference = True, None
    for a, agent in enumerate(m.agent_runs):
        for t, ref in enumerate(reference[a]):
            got = agent.turns[t] if t < len(agent.turns) else []
            if got != ref:
                i = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
                m.same_as_recompute, m.first_difference = False, [a, t, i]
                return


# -- the run ----------------------------------------------------------------------------------------------------------
def run(args) -> Bench:
    from agentopt_compiler.models.hf_loader import save_as_hf_folder
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.runtime.engine import load_engine

    selected = [SYSTEMS[s] for s in args.systems]
    work = Path(args.work_dir) / Path(str(args.model)).name / "agent-loop"
    work.mkdir(parents=True, exist_ok=True)
    longest = args.system_tokens + args.turns * (args.observation_tokens + args.new_tokens)
    # the smallest power of two above the conversation (1768 -> 2048); onnxruntime-genai stops once its sequence
    # reaches max_length, so the capacity must exceed the conversation by at least one token
    context = args.context_length or 1 << longest.bit_length()
    if context <= longest:
        raise SystemExit(f"--context-length {context} must exceed the whole conversation ({longest} tokens)")
    shared_name, unshared_name = AGENTS_SHARED.format(n=args.agents), AGENTS_UNSHARED.format(n=args.agents)
    bench = Bench(settings={"model": str(args.model), "system_tokens": args.system_tokens,
                            "observation_tokens": args.observation_tokens, "new_tokens": args.new_tokens,
                            "turns": args.turns, "agents": args.agents, "repeats": args.repeats,
                            "threads": args.threads, "context_length": context, "conversation_tokens": longest,
                            "work_dir": str(work),
                            "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(),
                                                                         *sys.argv[1:]])},
                  environment=environment(args.threads))

    log(f"loading {args.model} and writing it as a Hugging Face folder (for the peers)")
    loaded = load_model(args.model)
    config = loaded.config
    hf_dir = save_as_hf_folder(loaded.model, work / "hf", loaded.tokenizer_dir)
    del loaded
    gc.collect()
    eos = set(config.eos_token_ids)
    workloads = make_workloads(args, config.vocab_size, eos)

    def unavailable(name: str, exc: Exception) -> None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        bench.unavailable[name] = f"{type(exc).__name__}: {first}"
        log(f"{name}: UNAVAILABLE: {bench.unavailable[name]}")
        if args.verbose:
            traceback.print_exception(exc)

    # 1. our engine (always: it also computes the reference)
    folder = work / f"engine-ctx{context}"
    log(f"ours: compiling {args.model} (context {context}) -> {folder}")
    bench.builds["ours"] = compile_ours(str(args.model), folder, context, [])
    engine = load_engine(folder, threads=args.threads)
    bench.builds["ours"]["passes"] = [p["name"] for p in engine.manifest.get("passes", []) if not p.get("skipped")]

    # 2. the reference: full recompute of every turn, for every agent (untimed)
    log(f"full recompute (reference): {len(workloads)} agent(s) x {args.turns} turns")
    bench.reference = [full_recompute(engine, w) for w in workloads]

    # 3. systems
    single: dict[str, Callable[[], Run]] = {}

    def add(name: str, make: Callable[[], Callable[[], Run]]) -> None:
        if name not in selected:
            return
        log(f"{name}: loading")
        try:
            single[name] = make()
        except Exception as exc:
            unavailable(name, exc)

    add(OURS_REUSE, lambda: ours_reuse_system(engine, workloads[:1], None))
    add(OURS_STATELESS, lambda: ours_stateless_system(engine, workloads[0]))
    add(TRANSFORMERS, lambda: transformers_system(hf_dir, args.threads, workloads[0]))
    emitted = set().union(*(t for agent in bench.reference for t in agent))
    sentinel = max(set(range(config.vocab_size)) - emitted - eos)
    genai_model = None
    if ORT_GENAI in selected or ORT_GENAI_NAIVE in selected:
        try:
            log(f"{ORT_GENAI}: building the fp32 model with its model builder")
            bench.builds["onnxruntime-genai"] = build_ort_genai(hf_dir, work / "ort-genai-fp32",
                                                                work / "ort-genai-cache")
            genai_model = ort_genai_model(work / "ort-genai-fp32", args.threads, sentinel)
            bench.notes.append(f"onnxruntime-genai always stops on some token (an empty eos_token_id falls back to "
                               f"pad_token_id), so its genai_config.json sets both to id {sentinel}, which the full "
                               f"recompute never emits in this run; its KV buffer is max_length = {context}, the "
                               f"same capacity as our engine.")
        except Exception as exc:
            for name in (ORT_GENAI, ORT_GENAI_NAIVE):
                if name in selected:
                    unavailable(name, exc)
    if genai_model is not None:
        add(ORT_GENAI, lambda: ort_genai_system(genai_model, context, workloads[0], exact=True))
        add(ORT_GENAI_NAIVE, lambda: ort_genai_system(genai_model, context, workloads[0], exact=False))

    # 4. measure: the single agent, then the concurrent agents
    order = [s for s in SYSTEMS.values() if s in single]
    log(f"single agent: {args.turns} turns, a warm-up each, then {args.repeats} interleaved rounds")
    bench.measurements += measure({name: single[name] for name in order}, "single", 1, args.repeats, unavailable)
    if args.agents >= 1:
        concurrent = {shared_name: ours_reuse_system(engine, workloads, True),
                      unshared_name: ours_reuse_system(engine, workloads, False)}
        log(f"{args.agents} agents: a warm-up each, then {args.repeats} interleaved rounds")
        bench.measurements += measure(concurrent, "concurrent", args.agents, args.repeats, unavailable)
    single.clear()
    gc.collect()

    # 5. token check and targets
    for m in bench.measurements:
        check_tokens(m, bench.reference)
    bench.targets = targets(bench, workloads)
    return bench


def targets(bench: Bench, workloads: list[Workload]) -> list[dict]:
    s = bench.settings
    by_name = {m.system: m for m in bench.measurements}
    out = []

    def target(what: str, met: bool | None, measured: str) -> None:
        out.append({"target": what, "met": met, "measured": measured})

    reuse = by_name.get(OURS_REUSE)
    if reuse is not None:
        prefilled = reuse.agent_runs[0].prefilled
        expected = [s["system_tokens"] + s["observation_tokens"]] + [s["observation_tokens"] + 1] * (s["turns"] - 1)
        target("each turn prefills only its new tokens (ours, KV reuse): turn 1 the system prompt + observation, "
               "later turns the observation + the previous turn's last generated token (the only generated token "
               "whose KV is not computed while generating)",
               prefilled == expected, f"prefilled per turn {_compact(prefilled)} (expected {_compact(expected)}); "
               f"reused per turn {_compact(reuse.agent_runs[0].reused or [])}")
        target("reused-session tokens equal a full recompute (greedy, fp32), every turn", reuse.same_as_recompute,
               "same tokens in every turn" if reuse.same_as_recompute else
               f"differs from agent {reuse.first_difference[0] + 1}, turn {reuse.first_difference[1] + 1}, "
               f"token {reuse.first_difference[2]}")
        for peer, factor in ((ORT_GENAI, 1.25), (OURS_STATELESS, 2.0)):
            other = by_name.get(peer)
            ratio = other.seconds / reuse.seconds if other and reuse.seconds else None
            target(f"total time ≥ {factor:.2f}× faster than {peer}", None if ratio is None else ratio >= factor,
                   "not measured" if ratio is None else
                   f"{ratio:.2f}× ({other.seconds:.3f} s / {reuse.seconds:.3f} s)")
    shared = by_name.get(AGENTS_SHARED.format(n=s["agents"]))
    if shared is not None:
        times = _system_prompt_prefills(shared, s["system_tokens"])
        target(f"with {s['agents']} agents sharing the system prompt, the shared prefix is prefilled once",
               times == 1, f"system prompt prefilled {times} time(s); turn-1 prefilled per agent "
               f"{[a.prefilled[0] for a in shared.agent_runs]}, reused {[a.reused[0] for a in shared.agent_runs]}")
    return out


def _system_prompt_prefills(m: Measurement, system_tokens: int) -> int:
    """How many agents computed the system prompt's KV themselves (turn 1 reused less than all of it)."""
    return sum(1 for a in m.agent_runs if a.reused is not None and a.reused[0] < system_tokens)


# -- report -----------------------------------------------------------------------------------------------------------
def _compact(values: list[int]) -> str:
    """[1064, 65, 65, 65] -> '1064, 65 ×3'."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        parts.append(f"{values[i]}" + (f" ×{j - i + 1}" if j > i else ""))
        i = j + 1
    return ", ".join(parts) if parts else "–"


def _spread(median: float, runs: list[float]) -> str:
    if len(runs) < 2:
        return f"{median:.3f}"
    return f"{median:.3f} ({min(runs):.3f}–{max(runs):.3f})"


def _ratio(value: float, base: float | None) -> str:
    """How many times faster than ``base`` (base seconds / these seconds)."""
    if base is None or not value or not base:
        return "–"
    return f"{base / value:.2f}×"


def _same(m: Measurement, new_tokens: int) -> str:
    if m.same_as_recompute is None:
        return "–"
    if m.same_as_recompute:
        text = "yes, every turn"
    else:
        a, t, i = m.first_difference
        text = f"NO (from turn {t + 1}, token {i}" + (f", agent {a + 1})" if m.agents > 1 else ")")
    short = [len(turn) for agent in m.agent_runs for turn in agent.turns if len(turn) != new_tokens]
    if short:
        text += f"; a turn decoded {min(short)} of {new_tokens} tokens"
    if not m.tokens_stable:
        text += "; runs differed"
    return text


def write_report(bench: Bench) -> str:
    s, env = bench.settings, bench.environment
    lines = [f"## Agent loop benchmark: {s['model']}", ""]
    lines += [f"- date: {env['date']}",
              *run_facts(env, s["command"]),
              f"- workload: a {s['system_tokens']}-token system prompt, then {s['turns']} turns, each appending a "
              f"{s['observation_tokens']}-token observation and generating {s['new_tokens']} tokens (random token "
              f"ids, greedy, end-of-sequence ignored; {s['conversation_tokens']} tokens in all)",
              f"- settings: {s['threads']} threads for every system, fp32 everywhere, engine context "
              f"{s['context_length']}, median of {s['repeats']} interleaved rounds after one warm-up each", ""]

    by_name = {m.system: m for m in bench.measurements}
    genai, stateless = by_name.get(ORT_GENAI), by_name.get(OURS_STATELESS)
    lines += ["Total: seconds for all turns, median over the runs, (lowest–highest run) in brackets. \"vs\": how "
              "many times faster than that system (its median / this median). Prefilled: tokens fed to the model "
              "before each turn's first new token (turn 1, then later turns). Same tokens: every turn's generated "
              "tokens equal a full recompute (our stateless engine on the whole history, greedy).", ""]
    header = ["system", "total (s)", f"vs {ORT_GENAI}", f"vs {OURS_STATELESS}", "prefilled per turn",
              "prefilled in all", "same tokens as full recompute"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in bench.measurements:
        if m.group != "single":
            continue
        prefilled = m.agent_runs[0].prefilled
        lines.append(f"| {m.system} | {_spread(m.seconds, m.runs_seconds)} | "
                     f"{_ratio(m.seconds, genai.seconds if genai else None)} | "
                     f"{_ratio(m.seconds, stateless.seconds if stateless else None)} | "
                     f"{_compact(prefilled) if prefilled else '–'} | {sum(prefilled) if prefilled else '–'} | "
                     f"{_same(m, s['new_tokens'])} |")
    lines.append("")

    concurrent = [m for m in bench.measurements if m.group == "concurrent"]
    if concurrent:
        off = by_name.get(AGENTS_UNSHARED.format(n=s["agents"]))
        lines += [f"{s['agents']} agents on one engine, round-robin turn by turn, each its own Conversation: the same "
                  "system prompt, different observations. With the shared prefix cache, agent 1 stores the system "
                  "prompt's KV after its first prefill and the others start from it.", ""]
        header = ["setup", "total (s)", "vs no prefix cache", "prefilled in all", "system prompt prefilled",
                  "turn 1 prefilled per agent", "same tokens as full recompute"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in concurrent:
            total = sum(sum(a.prefilled) for a in m.agent_runs)
            lines.append(f"| {m.system} | {_spread(m.seconds, m.runs_seconds)} | "
                         f"{_ratio(m.seconds, off.seconds if off else None)} | {total} | "
                         f"{_system_prompt_prefills(m, s['system_tokens'])}× | "
                         f"{', '.join(str(a.prefilled[0]) for a in m.agent_runs)} | {_same(m, s['new_tokens'])} |")
        lines.append("")

    if bench.targets:
        lines += ["| target | met | measured |", "|---|---|---|"]
        for t in bench.targets:
            met = {True: "yes", False: "**NO**", None: "not measured"}[t["met"]]
            lines.append(f"| {t['target']} | {met} | {t['measured']} |")
        lines.append("")

    reuse = by_name.get(OURS_REUSE)
    if reuse is not None:
        lines.append(f"Per-turn seconds (median), {OURS_REUSE}: "
                     + ", ".join(f"{x:.3f}" for x in reuse.turn_seconds) + ".")
    b = bench.builds.get("ours")
    if b:
        lines.append(f"Our engine: compiled in {b['compile_seconds']:.1f} s, context {b['context_length']}, passes "
                     f"run: {', '.join(b.get('passes') or []) or 'none'}.")
    lines += footer(bench)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--system-tokens", type=int, default=1000, help="system prompt + tool schemas (1000)")
    parser.add_argument("--observation-tokens", type=int, default=64, help="appended each turn (64)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated each turn (32)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--agents", type=int, default=4,
                        help="concurrent agents sharing the system prompt, prefix cache on/off (0: skip)")
    parser.add_argument("--context-length", type=int, default=None,
                        help="engine KV capacity (default: the smallest power of two above the whole conversation)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS),
                        help="single-agent systems to run (default: all)")
    args = parser.parse_args(argv)
    if (args.new_tokens < 1 or args.repeats < 1 or args.threads < 1 or args.turns < 1 or args.system_tokens < 1
            or args.observation_tokens < 1 or args.agents < 0):
        parser.error("need --new-tokens, --repeats, --threads, --turns, --system-tokens, --observation-tokens >= 1 "
                     "and --agents >= 0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    bench = run(args)
    publish(bench, write_report(bench), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
