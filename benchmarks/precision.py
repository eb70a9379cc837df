#!/usr/bin/env python
"""Precision benchmark: fp32, uniform int4 (ours, symmetric and asymmetric), onnxruntime-genai int4, and our planned
mixed precision, one run.

    python benchmarks/precision.py                     # ref-60m, 128-token prompt, 64 new tokens
    python benchmarks/precision.py --block-sizes 32,64,128    # also uniform int4 at larger blocks, ours and theirs
    python benchmarks/precision.py --candidates "fp32,int8,int4;fp32,int8,int4,int4@64,int4@128"   # + plans that
                                                               # may give each unit its own block size
    python benchmarks/precision.py --model tiny-random --new-tokens 8 --repeats 1     # smoke run

Larger blocks store fewer scales (int4 at block 32 reads 5 bits per weight, at 128 4.25) and so decode faster, at
more error: they show what each quantizer gives at equal measured KL, not only at equal block size.

Per system: engine size, decode tokens/s (median of --repeats, interleaved, same threads; against onnxruntime-genai
also the median of the per-round ratios), and quality against fp32:
mean KL(fp32 || system) per token and top-1 agreement, teacher-forced on held-out random tokens for our engines
(``measure_fidelity``) and for onnxruntime-genai (the same held-out tokens appended one at a time, its logits read
after each), and greedy-token agreement with fp32 over the generated tokens for every system. ref-60m has random
weights, so KL here measures numerical damage, not task quality (benchmarks/agent_quality.py measures that on
agent-tiny).
Not a test: run it by hand. Markdown to stdout, ``--json`` for the numbers.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from decode import (build_ort_genai, close_systems, compile_ours, environment, log, make_prompt,  # noqa: E402
                    measure, ort_genai_system, ours_system, paired_ratio, system)


def plan_for(model: str, max_kl: float, work: Path, candidates: list[str], threads: int):
    """What ``agentopt plan precision`` does (4 x 128 seeded calibration tokens, this machine's cached cost model)."""
    from agentopt_compiler.analysis.calibration import calibration_batches
    from agentopt_compiler.analysis.precision import plan_precision
    from agentopt_compiler.models.registry import load_model

    loaded = load_model(model, capture="reference")
    plan, _ = plan_precision(loaded.model, calibration_batches(loaded, None, sequences=4, length=128), max_kl=max_kl,
                             candidates=candidates, threads=threads, log=log)
    plan.save(work / f"plan-kl{max_kl}-{'-'.join(candidates)}.json")
    m = plan.measurements
    log(f"planned in {m['planning_seconds']:.0f}s ({m['choice']}): checked KL {plan.predicted['checked_kl']:.3g}; "
        f"{json.dumps(plan.units)}")
    return plan


def compile_with_plan(model: str, out: Path, context: int, plan) -> dict:
    import agentopt_compiler as ao

    ao.compile(model, out=out, context_length=context, precision_plan=plan, overwrite=True)
    return {"engine_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()), "folder": str(out)}


def fidelity(folder: Path, model: str, context: int) -> dict:
    import agentopt_compiler as ao
    from agentopt_compiler.analysis.calibration import calibration_batches
    from agentopt_compiler.analysis.precision import measure_fidelity
    from agentopt_compiler.models.registry import load_model

    loaded = load_model(model)
    batches = calibration_batches(loaded, None, sequences=2, length=min(96, context - 1), seed=4321)
    return measure_fidelity(ao.load_engine(folder, threads=2), loaded.model, batches)


def ort_genai_fidelity(model_dir: Path, model: str, context: int, threads: int) -> dict:
    """onnxruntime-genai against the fp32 eager model on the held-out tokens ``fidelity`` uses, teacher-forced:
    each token is appended and the logits it produces are read (``Generator.get_logits``)."""
    import numpy as np
    import onnxruntime_genai as og
    import torch

    from agentopt_compiler.analysis.calibration import calibration_batches
    from agentopt_compiler.analysis.precision import _compare, _log_probs
    from agentopt_compiler.models.registry import load_model

    loaded = load_model(model)
    batches = calibration_batches(loaded, None, sequences=2, length=min(96, context - 1), seed=4321)
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    genai = og.Model(config)
    theirs = []
    for batch in batches:
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=context, do_sample=False)
        generator = og.Generator(genai, params)
        rows = []
        for token in batch[0].tolist():
            generator.append_tokens(np.array([token], dtype=np.int32))
            rows.append(torch.log_softmax(torch.from_numpy(np.array(generator.get_logits())).reshape(-1).float(), -1))
        theirs.append(torch.stack(rows)[None])
    kl, top1 = _compare(_log_probs(loaded.model, batches), theirs)
    return {"kl": round(kl, 6), "top1": round(top1, 4), "tokens": sum(b.shape[1] for b in batches)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ref-60m")
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", default="0.01,0.1", help="max-kl budgets of our planned variants")
    parser.add_argument("--candidates", default="fp32,int8,int4",
                        help="the plans' candidate precisions; ';' separates sets, each planned at every budget "
                             "(e.g. 'fp32,int8,int4;fp32,int8,int4,int4@64,int4@128': per-unit block sizes)")
    parser.add_argument("--plans", default=None, metavar="PLAN.json,...",
                        help="compile these plan files (agentopt plan precision --out) instead of planning here")
    parser.add_argument("--block-sizes", default="32",
                        help="block sizes of uniform int4, ours and onnxruntime-genai's (the first is the baseline)")
    parser.add_argument("--work-dir", default="bench_out/precision")
    parser.add_argument("--json", default=None)
    parser.add_argument("--shared-process", dest="isolate", action="store_false",
                        help="run every system in this one process (default: each in its own worker process)")
    args = parser.parse_args(argv)
    from agentopt_compiler.models.hf_loader import save_as_hf_folder
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.passes.precision_plan import PrecisionPlan

    work = Path(args.work_dir) / args.model
    work.mkdir(parents=True, exist_ok=True)
    context = 256 * ((args.prompt_length + args.new_tokens) // 256 + 1)
    loaded = load_model(args.model)
    layers = loaded.config.num_layers
    builds = {"fp32 (ours)": compile_ours(args.model, work / "fp32", context, [])}
    blocks = [int(b) for b in args.block_sizes.split(",")]
    variants = {"int4 uniform (ours)": PrecisionPlan.uniform("int4", layers, blocks[0]),  # symmetric, the default
                "int4 uniform asymmetric (ours)": PrecisionPlan.uniform("int4", layers, blocks[0], symmetric=False)}
    for block in blocks[1:]:
        variants[f"int4 uniform block {block} (ours)"] = PrecisionPlan.uniform("int4", layers, block)
    from agentopt_compiler.analysis.cost_model import cached_cost_model, formats_for

    candidate_sets = [[c.strip() for c in group.split(",")] for group in args.candidates.split(";")]
    # measured once per machine and cached: every plan here (and every agentopt plan precision) uses the same one
    formats = formats_for([c for group in candidate_sets for c in group], blocks[0])
    costs = cached_cost_model(args.threads, log=log, formats=formats)
    log(f"cost model ({costs.source}): ps per weight "
        f"{', '.join(f'{p} {c * 1e12:.0f}' for p, c in costs.seconds_per_weight.items())}")
    for path in (args.plans.split(",") if args.plans else []):
        plan = PrecisionPlan.load(path)
        variants[f"planned max-kl {plan.budget.get('max_kl')} from {Path(path).name} (ours)"] = plan
    for candidates in ([] if args.plans else candidate_sets):
        extra = "" if len(candidate_sets) == 1 else f", {'/'.join(candidates)}"
        for budget in map(float, args.budgets.split(",")):
            log(f"planning with --max-kl {budget}, candidates {','.join(candidates)}...")
            variants[f"planned max-kl {budget}{extra} (ours)"] = plan_for(args.model, budget, work, candidates,
                                                                           args.threads)
    for name, plan in variants.items():
        log(f"compiling {name}...")
        builds[name] = compile_with_plan(args.model, work / re.sub(r"[^\w.]+", "-", name.split(" (")[0]), context, plan)
    systems = {name: system(args.isolate, ours_system, Path(info["folder"]), args.threads)
               for name, info in builds.items()}
    hf = save_as_hf_folder(loaded.model, work / "hf", loaded.tokenizer_dir)
    for i, block in enumerate(blocks):
        name = "onnxruntime-genai int4" + ("" if i == 0 else f" block {block}")
        try:
            builds[name] = build_ort_genai(hf, work / f"ort-genai-int4-b{block}", work / "cache", precision="int4",
                                           extra_options={"block_size": block})
            systems[name] = system(args.isolate, ort_genai_system, Path(builds[name]["folder"]), args.threads,
                                   context, loaded.config.vocab_size - 1)
        except Exception as exc:  # a missing peer is reported, not fatal
            log(f"{name} unavailable: {exc}")
    prompt = make_prompt(args.prompt_length, loaded.config.vocab_size, {loaded.config.vocab_size - 1}, seed=0)
    results = measure(systems, prompt, args.new_tokens, args.repeats, lambda n, e: log(f"{n} failed: {e}"))
    close_systems(systems)
    reference = next(r for r in results if r.system == "fp32 (ours)")
    rows = []
    for result in results:
        agree = sum(a == b for a, b in zip(result.tokens, reference.tokens)) / len(reference.tokens)
        folder = Path(builds[result.system]["folder"])
        quality = fidelity(folder, args.model, context) if "(ours)" in result.system else \
            ort_genai_fidelity(folder, args.model, context, args.threads)
        rows.append({"system": result.system, "bytes": builds[result.system]["engine_bytes"],
                     "decode_tok_s": result.decode_tokens_per_s, "rates": result.runs_decode_tokens_per_s,
                     "kl": quality.get("kl"), "top1": quality.get("top1"), "greedy_agreement": agree})
    fp32_rate = reference.decode_tokens_per_s
    genai_runs = next((r["rates"] for r in rows if r["system"] == "onnxruntime-genai int4"), None)
    print(f"precision benchmark, {args.model}, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.repeats}, int4 block {blocks[0]} unless named, "
          f"{'each system in its own worker process' if args.isolate else 'every system in one process'}; "
          f"{json.dumps(environment(args.threads)['versions'])}\n")
    print("| system | size (MiB) | decode tok/s | vs fp32 | vs onnxruntime-genai int4, paired | KL vs fp32 | "
          "top-1 vs fp32 | greedy tokens = fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        kl = "n/a" if row["kl"] is None else f"{row['kl']:.2e}"
        top1 = "n/a" if row["top1"] is None else f"{row['top1']:.3f}"
        print(f"| {row['system']} | {row['bytes'] / 2**20:.1f} | {row['decode_tok_s']:.1f} "
              f"({min(row['rates']):.0f}-{max(row['rates']):.0f}) | {row['decode_tok_s'] / fp32_rate:.2f}x | "
              f"{paired_ratio(row['rates'], genai_runs)} | {kl} | "
              f"{top1} | {100 * row['greedy_agreement']:.0f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=statistics.mean))
    return 0


if __name__ == "__main__":
    sys.exit(main())
