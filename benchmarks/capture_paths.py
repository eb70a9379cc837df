"""Compile time, peak memory and engine of each capture path on real-sized configs (random weights, bf16 as published).

    python benchmarks/capture_paths.py --preset qwen2.5-0.5b --captures auto transformers
    python benchmarks/capture_paths.py --preset qwen3-0.6b

Each compile runs in its own process (peak RSS is that process's, from getrusage); the checkpoint folder is made
once with transformers (needs the [transformers] extra). Prints one line per compile: seconds per stage, total,
peak RSS, the engine's ONNX node count and the compile report's capture and weights lines.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = {  # the published configs' shapes
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=False, sliding_window=32768, max_window_layers=21, bos_token_id=151643,
        eos_token_id=151643)),
    "qwen3-0.6b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)),
}

_CHILD = """
import json, sys, time
import agentopt_compiler as ao
start = time.perf_counter()
engine = ao.compile(sys.argv[1], out=sys.argv[2], overwrite=True, capture=sys.argv[3])
report = engine.compile_report
print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "capture": report.capture,
                  "weights": report.weights,
                  "stages": {k: round(v, 1) for k, v in report.stage_seconds.items()}}))
"""


def make_checkpoint(preset: str, folder: Path) -> None:
    import torch
    import transformers

    config_class, fields = PRESETS[preset]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**fields),
                                                          dtype=torch.bfloat16)
    model.save_pretrained(folder)


def compile_in_child(folder: Path, out: Path, capture: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out), capture], capture_output=True,
                            text=True, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB; the largest child so far
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["peak_rss_gib"] = round(max(peak, before) / 2**20, 2)
    import onnx

    row["onnx_nodes"] = len(onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    parser.add_argument("--captures", nargs="+", default=["auto"], choices=["auto", "reference", "transformers"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capture-paths-") as tmp:
        folder = Path(tmp) / args.preset
        started = time.perf_counter()
        make_checkpoint(args.preset, folder)
        print(f"{args.preset}: checkpoint made in {time.perf_counter() - started:.0f}s", flush=True)
        for capture in args.captures:  # peak RSS is per process: run one capture per invocation to compare them
            print(capture, json.dumps(compile_in_child(folder, Path(tmp) / f"engine-{capture}", capture)),
                  flush=True)


if __name__ == "__main__":
    main()
