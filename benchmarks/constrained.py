#!/usr/bin/env python
"""Grammar-constrained tool calls on agent work: validity, task success, engine calls per tool call, mask cost.

    python benchmarks/constrained.py                  # agent-tiny's three eval sets, four systems; mask cost
    python benchmarks/constrained.py --sets handwritten --skip-mask-cost   # quicker

Systems (the same agent-tiny engine folder, ``--threads`` threads, greedy, the runtime ``Agent`` that
``agentopt run --task`` and the server use, with the task's tools bound to its memory):

    free            no grammar (``constrained=False``)
    free+lookup     no grammar, prompt-lookup drafts of ``--drafts`` tokens
    constrained     tool calls under the tools' grammar: masked choices, forced tokens fed in one call
    constrained+lookup   both: the drafts are cut where the grammar rejects them

Measured per system over each of agent-tiny's eval sets (``agentopt eval --set``: the generator's held-out tasks,
the requests written by hand, the tasks with tools no training episode had), run by ``agentopt eval``'s runner:
- tool-call validity: every call a step writes parses, names one of the tools and has arguments its JSON schema
  accepts (jsonschema); a malformed call counts as one invalid call, and those cut by the step's token limit
  (``max_new_tokens``, as ``agentopt eval``) or the end of the context before they closed are also counted apart;
  under the grammar a call the limit would cut is closed in the tokens left instead (generation.py: a string
  argument cut short, valid for the schema, and the step ends there): those are counted as "closed at the limit";
- task success: the expected tool use and the expected value in the final answer (``agentopt eval``'s check);
- engine calls per tool call: decode calls of the steps that wrote calls (prefills excluded: each system prefills
  the same prompts) over the calls written; and tokens generated per tool call.
Then the mask cost, for agent-tiny (512-token vocabulary) and for ref-60m (57M parameters, random weights) with a
32,000-token byte-level BPE tokenizer trained here on English and code text (a vocabulary of the size real models
have: the mask walks the token trie, so its cost grows with the vocabulary): the time to compute and apply one mask
(over a constrained JSON answer, and in the free text before a tool call) against the median decode call of the same
engine at the same context; and the check each token gets within ``CLOSE_WINDOW`` tokens of a limit (whether what
it leaves open can still be closed: ``Matcher.closing``), over the JSON answer.

Not a test: run it by hand on an otherwise idle machine. Progress to stderr, markdown to stdout, ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = ("free", "free+lookup", "constrained", "constrained+lookup")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_task(engine, task, system: str, drafts: int) -> dict:
    """One task through ``agentopt eval``'s runner (the runtime Agent, the task's tools and memory); its success
    (the expected tool use and answer), and per tool call: validity, engine calls and tokens."""
    import jsonschema

    from agentopt_compiler.agent_tiny.eval import run_task as eval_task, task_tools
    from agentopt_compiler.runtime.tools import Tool

    outcome = eval_task(engine, task, prompt_lookup=drafts if system.endswith("lookup") else 0,
                        constrained=system.startswith("constrained"))
    tools = [t if isinstance(t, Tool) else Tool.from_function(t) for t in task_tools(task)]
    schemas = {tool.name: tool.parameters for tool in tools}
    calls = valid = truncated = engine_calls = call_tokens = 0  # (truncated: cut by a limit before they closed)
    for step in outcome["steps"]:
        malformed = sum(o.startswith("error: malformed") for o in step.observations)
        if not step.calls and not malformed:
            continue  # the final answer
        calls += len(step.calls) + malformed
        truncated += malformed if not step.text.rstrip().endswith(("</tool_call>", "<|/tool_call|>")) else 0
        for call in step.calls:
            try:
                jsonschema.validate(call.arguments, schemas[call.name])
                valid += 1
            except (KeyError, jsonschema.ValidationError):
                pass
        engine_calls += step.engine_calls
        call_tokens += len(engine.tokenizer.encode(step.text, add_special_tokens=False))
    return {"calls": calls, "valid": valid, "truncated": truncated, "success": outcome["success"],
            "engine_calls": engine_calls,
            "call_tokens": call_tokens, "forced": outcome["usage"].get("forced_tokens", 0),
            "closed_at_limit": outcome["usage"].get("closed_at_limit", 0)}


def agent_rows(engine, tasks, drafts: int) -> dict:
    totals = {s: {"tasks": 0, "success": 0, "calls": 0, "valid": 0, "truncated": 0, "engine_calls": 0,
                  "call_tokens": 0, "forced": 0, "closed_at_limit": 0} for s in SYSTEMS}
    for index, task in enumerate(tasks):
        for system in SYSTEMS:  # the systems take turns task by task
            outcome = run_task(engine, task, system, drafts)
            row = totals[system]
            row["tasks"] += 1
            for key in ("calls", "valid", "truncated", "engine_calls", "call_tokens", "forced", "closed_at_limit"):
                row[key] += outcome[key]
            row["success"] += outcome["success"]
        if (index + 1) % 10 == 0:
            log(f"{index + 1}/{len(tasks)} tasks: " + ", ".join(
                f"{s} {totals[s]['success']}/{totals[s]['tasks']}" for s in SYSTEMS))
    return totals


# -- mask cost ----------------------------------------------------------------------------------------------------------
def trained_bpe(vocab_size: int, folder: Path) -> Path:
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on this Python's sources and docs (English and
    code): a real vocabulary's size and shape, for the mask-cost measurement only."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:1500]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator((Path(f).read_text(errors="replace") for f in files), trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def mask_cost(engine, label: str, repeats: int = 3) -> dict:
    """Median decode call at ~300 cached tokens, and the time per mask in two phases of a tool grammar."""
    import numpy as np

    from agentopt_compiler.runtime.constraints import Matcher, call_syntax, json_schema_grammar, tool_call_grammar
    from agentopt_compiler.runtime.generation import CLOSE_WINDOW

    tokenizer, vocab = engine.tokenizer, engine.manifest["model"]["config"]["vocab_size"]
    prompt = engine.encode("Background: " + "the station logs readings every hour and " * 30)[:300]
    conversation = engine.conversation()
    logits = conversation.prefill_to(prompt)
    calls = []
    for _ in range(repeats):
        conversation.prefill_to(prompt)
        for token in range(3, 3 + 24):
            start = time.perf_counter()
            conversation.feed([token], len(prompt))  # a decode call at the same position each time
            calls.append(time.perf_counter() - start)
    conversation.release()
    decode_s = statistics.median(calls)
    row = np.asarray(logits[0, -1], dtype=np.float32)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                               "units": {"enum": ["metric", "imperial"]}},
              "required": ["city", "days", "units"]}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": schema}}]
    phases = {"JSON answer": json_schema_grammar(schema),
              "free text before a call": tool_call_grammar(tools, call_syntax(tokenizer.chat_template), tokenizer)}
    text = {"JSON answer": '{"city": "Reykjavik and the northern coast", "days": 12, "units": "metric"}',
            "free text before a call": "Let me look that up for you. The forecast depends on the station data."}
    result = {"model": label, "vocab": vocab, "decode_call_ms": decode_s * 1e3}
    for phase, grammar in phases.items():
        ids = tokenizer.encode(text[phase], add_special_tokens=False)
        times, closing_times = [], []
        for _ in range(repeats):
            matcher, hint = Matcher(grammar, tokenizer, vocab, engine.eos_token_ids), []
            for token in ids:
                start = time.perf_counter()
                matcher.masked(row)  # the mask, computed and applied to one row of logits
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                # the check each token gets near a limit (TokenPicker._fit_before_limit: the last closing as hint)
                hint = matcher.closing(CLOSE_WINDOW, after=token, hint=hint) or hint
                closing_times.append(time.perf_counter() - start)
                matcher.consume(token)
        result[phase] = {"mask_ms": statistics.median(times) * 1e3, "mask_ms_p90": sorted(times)[
            int(0.9 * len(times))] * 1e3, "tokens": len(ids), "closing_ms": statistics.median(closing_times) * 1e3}
        result[phase]["share_of_decode_call"] = statistics.median(times) / decode_s
        result[phase]["closing_share_of_decode_call"] = statistics.median(closing_times) / decode_s
    return result


def ref60m_with_bpe(work: Path) -> str:
    from agentopt_compiler.models.hf_loader import save_as_hf_folder
    from agentopt_compiler.models.registry import load_model

    loaded = load_model("ref-60m")
    folder = save_as_hf_folder(loaded.model, work / "ref-60m-bpe32k", loaded.tokenizer_dir)
    trained_bpe(loaded.config.vocab_size, work / "bpe")
    (folder / "tokenizer.json").write_text((work / "bpe" / "tokenizer.json").read_text())
    config = json.loads((loaded.tokenizer_dir / "tokenizer_config.json").read_text()) \
        if (loaded.tokenizer_dir / "tokenizer_config.json").is_file() else {}
    config["eos_token"] = "<|im_end|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="generator,handwritten,unseen_tools",
                        help="agent-tiny task sets (agentopt eval --set): generator, handwritten, unseen_tools")
    parser.add_argument("--tasks", type=int, default=100, help="generator tasks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--drafts", type=int, default=4, help="prompt-lookup drafts per call (lookup systems)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-mask-cost", action="store_true")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import agentopt_compiler as ao
    from agentopt_compiler.agent_tiny.eval import task_set

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="constrained-"))
    log(f"compiling agent-tiny into {work}")
    ao.compile("agent-tiny", out=work / "agent-tiny", overwrite=True)
    engine = ao.load_engine(work / "agent-tiny", threads=args.threads)
    report = {"host": platform.processor() or platform.machine(), "threads": args.threads, "seed": args.seed,
              "drafts": args.drafts, "sets": {}, "mask": []}
    for name in args.sets.split(","):
        tasks = task_set(name, args.tasks, args.seed)
        log(f"{len(tasks)} {name} tasks, systems: {', '.join(SYSTEMS)}")
        report["sets"][name] = agent_rows(engine, tasks, args.drafts)
    if not args.skip_mask_cost:
        report["mask"].append(mask_cost(engine, "agent-tiny"))
        log("ref-60m with a 32k BPE tokenizer: compiling")
        ref = ao.compile(ref60m_with_bpe(work), out=work / "ref-60m", overwrite=True, context_length=512)
        report["mask"].append(mask_cost(ao.load_engine(ref.folder, threads=args.threads), "ref-60m (32k BPE)"))

    for name, totals in report["sets"].items():
        print(f"## Constrained tool calls: agent-tiny, {name} tasks ({next(iter(totals.values()))['tasks']}), "
              f"{args.threads} threads, greedy\n")
        print("| system | task success | tool calls | valid (parse + schema) | cut by a limit | closed at the limit | "
              "valid of those closed | engine calls per call | tokens per call | forced tokens |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for system, row in totals.items():
            calls = max(row["calls"], 1)
            closed = max(row["calls"] - row["truncated"], 1)
            print(f"| {system} | {row['success']}/{row['tasks']} ({100 * row['success'] / row['tasks']:.1f}%) | "
                  f"{row['calls']} | {row['valid']} ({100 * row['valid'] / calls:.1f}%) | {row['truncated']} | "
                  f"{row['closed_at_limit']} | "
                  f"{100 * row['valid'] / closed:.1f}% | {row['engine_calls'] / calls:.2f} | "
                  f"{row['call_tokens'] / calls:.1f} | {row['forced']} |")
        base = totals["free"]["engine_calls"] / max(totals["free"]["calls"], 1)
        for system in SYSTEMS[1:]:
            per_call = totals[system]["engine_calls"] / max(totals[system]["calls"], 1)
            print(f"\n{system}: {base / per_call:.2f}x fewer engine calls per tool call than free greedy", end="")
        print("\n")
    if report["mask"]:
        print("| model | vocab | decode call (ms, median) | mask, JSON answer (ms) | share | "
              "mask, free text (ms) | share | closing check near a limit, JSON answer (ms) | share |")
        print("|---|---|---|---|---|---|---|---|---|")
        for row in report["mask"]:
            json_phase, text_phase = row["JSON answer"], row["free text before a call"]
            print(f"| {row['model']} | {row['vocab']} | {row['decode_call_ms']:.2f} | {json_phase['mask_ms']:.3f} | "
                  f"{100 * json_phase['share_of_decode_call']:.1f}% | {text_phase['mask_ms']:.3f} | "
                  f"{100 * text_phase['share_of_decode_call']:.1f}% | {json_phase['closing_ms']:.3f} | "
                  f"{100 * json_phase['closing_share_of_decode_call']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
