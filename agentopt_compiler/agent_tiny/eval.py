"""Evaluate a tool-using model with a real agent loop on held-out tasks (see agent_tasks.py).

The model is reached only through ``generate(prompt_text, stop_strings) -> completion_text``: the prompt is the
conversation rendered with the chat template plus the generation prompt, and the completion runs until (and may include)
the first stop string (``</tool_call>`` or ``<|im_end|>``). Each completion holding ``<tool_call>{json}</tool_call>`` is
parsed, the real tool runs, its result goes back as a ``tool`` message, and the loop repeats (at most ``max_calls``
calls); the first completion without a tool call is the final answer, checked against the task's expected value.

``eager_generator(model, tokenizer)`` is such a callable for the PyTorch reference ``LlamaDecoder`` (greedy, KV cache).
"""

from __future__ import annotations

import inspect
import json
import time
from collections import Counter, defaultdict
from typing import Callable

from .tasks import (EOS_TOKEN, STOP_STRINGS, TRANSIENT_ERROR, Task, generate_tasks, render_chat)
from .tools import (TOOL_CALL_CLOSE, TOOL_CALL_OPEN, canonical_unit, normalize_key, parse_tool_call, run_tool)

Generate = Callable[[str, tuple[str, ...]], str]

# default held-out mix: kind -> share of the tasks
EVAL_MIX = {"calc": 0.12, "convert": 0.12, "lookup": 0.12, "calc>convert": 0.09, "lookup>calc": 0.09,
            "lookup>convert": 0.09, "lookup>calc>convert": 0.09, "long_lookup": 0.08, "long_lookup>calc": 0.06,
            "retry": 0.08, "bad_expr": 0.06}


def eval_tasks(n: int = 100, seed: int = 0, mix: dict[str, float] | None = None) -> list[Task]:
    """``n`` held-out tasks (held-out seeds and phrasings) spread over the kinds of ``mix`` in fixed proportions."""
    mix = mix or EVAL_MIX
    total = sum(mix.values())
    counts = {k: max(1, round(n * w / total)) for k, w in mix.items()}
    while sum(counts.values()) > n:
        counts[max(counts, key=counts.get)] -= 1
    while sum(counts.values()) < n:
        counts[min(counts, key=counts.get)] += 1
    tasks = []
    for i, (kind, c) in enumerate(counts.items()):
        tasks += generate_tasks(c, "heldout", seed, mix={kind: 1.0}, start=100_000 * (i + 1))
    return tasks


def _same_value(param: str, got, want) -> bool:
    if param == "key":
        return isinstance(got, str) and normalize_key(got) == normalize_key(want)
    if param in ("from_unit", "to_unit"):
        try:
            return canonical_unit(got) == canonical_unit(want)
        except Exception:
            return False
    if param == "expression":
        return isinstance(got, str) and got.replace(" ", "") == want.replace(" ", "")
    if isinstance(want, (int, float)) and not isinstance(want, bool):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - want) < 1e-9
    return got == want


def run_agent(task: Task, generate: Generate, max_calls: int = 4) -> dict:
    """One episode of the agent loop; returns the trace, success, the failure kind (or None) and per-call details."""
    messages = [dict(m) for m in task.messages]
    fails_left = task.fail_first
    attempts, valid, calls = 0, 0, []  # calls: (name, args, result_is_error)
    final, failure = None, None
    for _ in range(max_calls + 1):
        completion = generate(render_chat(messages, add_generation_prompt=True), STOP_STRINGS).replace(EOS_TOKEN, "")
        if TOOL_CALL_OPEN in completion:
            attempts += 1
            if len(calls) >= max_calls:
                failure = "too_many_calls"
                break
            # the text before the call (a chain's plan) stays in the history, as the runtime Agent keeps it
            content = completion.split(TOOL_CALL_CLOSE)[0] + TOOL_CALL_CLOSE
            messages.append({"role": "assistant", "content": content})
            parsed = parse_tool_call(content)
            if parsed is None:
                failure = failure or "invalid_json"
                result = json.dumps({"error": "tool call is not valid JSON"})
            else:
                valid += 1
                name, args = parsed
                if fails_left:
                    fails_left -= 1
                    result = TRANSIENT_ERROR
                else:
                    result = run_tool(name, args, task.memory)
                calls.append((name, args, "error" in json.loads(result)))
            messages.append({"role": "tool", "content": result})
            continue
        final = completion.strip()
        messages.append({"role": "assistant", "content": final})
        break
    else:
        failure = failure or "too_many_calls"

    success = final is not None and task.check(final)
    # compare the model's calls with the gold calls, step by step; a call that failed and was followed by another
    # call (a retry) is skipped, the last call counts even when it failed
    effective = [(n, a) for i, (n, a, err) in enumerate(calls) if not err or i == len(calls) - 1]
    arg_checks = []  # (tool.param, ok)
    mismatch = None
    for step, (gname, gargs) in enumerate(task.calls):
        if step >= len(effective):
            mismatch = mismatch or ("no_tool_call" if not effective else "missing_call")
            break
        name, args = effective[step]
        if name != gname:
            mismatch = mismatch or ("unknown_tool" if name not in ("calculator", "convert_units", "memory_lookup")
                                    else f"wrong_tool:{gname}->{name}")
            break
        for param, want in gargs.items():
            ok = param in args and _same_value(param, args[param], want)
            arg_checks.append((f"{name}.{param}", ok))
            if not ok and mismatch is None:
                mismatch = f"wrong_arg:{name}.{param}"
    if not success and failure is None:
        if final is None:
            failure = "no_final_answer"
        elif mismatch is not None:
            failure = mismatch
        elif len(effective) > len(task.calls):
            failure = "extra_calls"
        else:
            failure = "wrong_final_answer"
    return {"kind": task.kind, "category": task.category, "success": success,
            "failure": None if success else failure, "tool_call_attempts": attempts, "tool_call_valid": valid,
            "arg_checks": arg_checks, "final": final, "messages": messages}


def evaluate(generate: Generate, tasks: list[Task] | None = None, n: int = 100, seed: int = 0,
             time_budget_s: float | None = None, max_calls: int = 4) -> dict:
    """Run the agent loop over held-out tasks; returns success rates (overall, single-tool, multi-step and the other
    categories), the tool-call JSON validity rate, argument-copy accuracy per tool parameter and the top failures.
    Stops early (reporting how many tasks ran) when ``time_budget_s`` runs out."""
    tasks = tasks if tasks is not None else eval_tasks(n, seed)
    t0 = time.time()
    results = []
    order = _interleave(tasks)
    for task in order:
        if time_budget_s is not None and time.time() - t0 > time_budget_s:
            break
        results.append(run_agent(task, generate, max_calls))
    by_cat, by_kind = defaultdict(list), defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r["success"])
        by_kind[r["kind"]].append(r["success"])
    attempts = sum(r["tool_call_attempts"] for r in results)
    args = defaultdict(list)
    for r in results:
        for k, ok in r["arg_checks"]:
            args[k].append(ok)
    failures = Counter(r["failure"] for r in results if r["failure"])
    rate = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "tasks": len(results), "tasks_planned": len(tasks), "seconds": round(time.time() - t0, 1),
        "success": rate([r["success"] for r in results]),
        "success_single": rate(by_cat["single"]), "success_multi": rate(by_cat["multi"]),
        "success_long_context": rate(by_cat["long_context"]), "success_recovery": rate(by_cat["recovery"]),
        "success_by_kind": {k: rate(v) for k, v in sorted(by_kind.items())},
        "counts_by_category": {k: len(v) for k, v in by_cat.items()},
        "tool_call_json_valid": rate([True] * sum(r["tool_call_valid"] for r in results)
                                     + [False] * (attempts - sum(r["tool_call_valid"] for r in results))),
        "arg_accuracy": {k: rate(v) for k, v in sorted(args.items())},
        "top_failures": failures.most_common(8),
        "examples": [{k: r[k] for k in ("kind", "failure", "messages")} for r in results if not r["success"]][:5],
    }


def _interleave(tasks: list[Task]) -> list[Task]:
    """Round-robin over kinds, so a time-capped run still covers every kind."""
    groups = defaultdict(list)
    for t in tasks:
        groups[t.kind].append(t)
    out, i = [], 0
    while len(out) < len(tasks):
        for g in groups.values():
            if i < len(g):
                out.append(g[i])
        i += 1
    return out


def format_report(report: dict) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    c = report["counts_by_category"]
    lines = [
        f"agent eval: {report['tasks']}/{report['tasks_planned']} held-out tasks in {report['seconds']} s",
        f"  success overall {pct(report['success'])} | single-tool {pct(report['success_single'])} "
        f"(n={c.get('single', 0)}) | multi-step {pct(report['success_multi'])} (n={c.get('multi', 0)}) | "
        f"long-context {pct(report['success_long_context'])} (n={c.get('long_context', 0)}) | "
        f"error-recovery {pct(report['success_recovery'])} (n={c.get('recovery', 0)})",
        f"  tool-call JSON valid {pct(report['tool_call_json_valid'])}",
        "  by kind: " + ", ".join(f"{k} {pct(v)}" for k, v in report["success_by_kind"].items()),
        "  argument accuracy: " + ", ".join(f"{k} {pct(v)}" for k, v in report["arg_accuracy"].items()),
        "  top failures: " + (", ".join(f"{k} x{n}" for k, n in report["top_failures"]) or "none"),
    ]
    return "\n".join(lines)


def eager_generator(model, tokenizer, max_new_tokens: int = 96, capacity: int | None = None) -> Generate:
    """Greedy decoding with the reference ``LlamaDecoder`` and a fresh KV cache per call (prefill, then one token per
    step, as tests/conftest.py's ``eager_greedy``). ``tokenizer`` is a ``tokenizers.Tokenizer``. Stops at
    ``<|im_end|>`` (kept in the completion) or once the decoded text contains a stop string (cut just after it)."""
    import torch

    capacity = capacity or model.config.max_position_embeddings
    eos_ids = {tokenizer.token_to_id(EOS_TOKEN), tokenizer.token_to_id("<|endoftext|>")} - {None}
    by_index = "logits_index" in inspect.signature(model.forward).parameters

    def generate(prompt_text: str, stop_strings: tuple[str, ...] = STOP_STRINGS) -> str:
        ids = tokenizer.encode(prompt_text).ids
        if len(ids) >= capacity:
            return ""  # does not fit: counts as no answer
        steps = min(max_new_tokens, capacity - len(ids))
        was_training = model.training
        model.eval()
        model.setup_cache(1, capacity)
        out: list[int] = []
        text = ""
        try:
            with torch.no_grad():
                length = len(ids)
                if by_index:  # only the last prompt token's logits
                    logits = model(torch.tensor([ids]), torch.arange(length), torch.tensor([length - 1]))
                else:  # an older LlamaDecoder without logits_index (full logits; the last row is used)
                    logits = model(torch.tensor([ids]), torch.arange(length))
                for _ in range(steps):
                    nxt = int(logits[0, -1].argmax())
                    out.append(nxt)
                    if nxt in eos_ids:
                        break
                    text = tokenizer.decode(out, skip_special_tokens=False)
                    hit = [text.index(s) + len(s) for s in stop_strings if s in text]
                    if hit:
                        return text[:min(hit)]
                    logits = model(torch.tensor([[nxt]]), torch.tensor([length]))
                    length += 1
        finally:
            for layer in model.layers:
                layer.self_attn.kv_cache = None
            model.train(was_training)
        return tokenizer.decode(out, skip_special_tokens=False)

    return generate


class EngineGenerator:
    """``generate(prompt_text, stop_strings)`` on a compiled engine (no torch), through one Conversation, so
    each step of an episode prefills only what the previous step did not already cache. Counts tokens and time for
    the tokens/s figure of the report (``decode_seconds``: the part after each prefill). ``prompt_lookup`` > 0
    decodes with prompt-lookup drafts (greedy: the same tokens); ``temperature`` > 0 samples (seeded per call)."""

    def __init__(self, engine, max_new_tokens: int = 96, prompt_lookup: int = 0, temperature: float = 0.0):
        from ..runtime.engine import GenerationConfig

        self.engine, self.conversation = engine, engine.conversation()
        self.config = GenerationConfig(max_new_tokens=max_new_tokens, prompt_lookup=prompt_lookup,
                                       temperature=temperature, seed=0)
        self.generated, self.seconds, self.decode_seconds = 0, 0.0, 0.0

    def __call__(self, prompt_text: str, stop_strings: tuple[str, ...] = STOP_STRINGS) -> str:
        from ..errors import ContextOverflowError
        from ..runtime.generation import TextStream

        ids = self.engine.tokenizer.encode(prompt_text, add_special_tokens=False)
        start = time.perf_counter()
        try:
            logits = self.conversation.prefill_to(ids)
        except ContextOverflowError:
            return ""  # does not fit: counts as no answer, as in the eager generator
        decode_start = time.perf_counter()
        stream = TextStream(self.engine.tokenizer, stop_strings)
        tokens = self.conversation.generate(logits, self.config)
        for token in tokens:
            self.generated += 1
            stream.push(token)
            if stream.stop is not None:
                tokens.close()
                break
        text = stream.visible + (stream.stop or "")  # the episode keeps the stop string (a call's closing tag)
        end = time.perf_counter()
        self.seconds += end - start
        self.decode_seconds += end - decode_start
        return text


def evaluate_engine(engine, n: int = 100, seed: int = 0, time_budget_s: float | None = None,
                    prompt_lookup: int = 0) -> dict:
    """``evaluate`` on a compiled engine, plus generation throughput (tokens/s, prefill included)."""
    generator = EngineGenerator(engine, prompt_lookup=prompt_lookup)
    report = evaluate(generator, n=n, seed=seed, time_budget_s=time_budget_s)
    report["generated_tokens"] = generator.generated
    report["tokens_per_s"] = round(generator.generated / generator.seconds, 1) if generator.seconds else 0.0
    report["prefilled_tokens"] = generator.conversation.prefilled_tokens
    report["reused_tokens"] = generator.conversation.reused_tokens
    report["drafted_tokens"] = generator.conversation.drafted_tokens
    report["accepted_draft_tokens"] = generator.conversation.accepted_draft_tokens
    return report


def main(argv: list[str] | None = None) -> dict:
    """``python -m agentopt_compiler.agent_tiny.eval DIR [--tasks 100]``: evaluate a folder written by
    train_agent_model.py with the eager reference model."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("folder")
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes", type=float, default=None, help="time cap")
    p.add_argument("--json", help="write the full report (with failed examples) here")
    args = p.parse_args(argv)
    import torch

    from .train import load_trained

    torch.set_num_threads(args.threads)
    model, tok = load_trained(args.folder)
    report = evaluate(eager_generator(model, tok), n=args.tasks, seed=args.seed,
                      time_budget_s=None if args.minutes is None else args.minutes * 60)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
