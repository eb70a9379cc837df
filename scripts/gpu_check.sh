#!/usr/bin/env bash
# GPU check for users' NVIDIA machines: the TensorRT and ONNX Runtime CUDA paths, which CI (CPU only) cannot run.
#
#   pip install -e '.[tensorrt,gpu,test]'      # TensorRT >= 10.14, onnxruntime-gpu, a CUDA build of torch
#   scripts/gpu_check.sh [WORKDIR]             # default WORKDIR: a temporary folder
#
# 1. the gpu-marked tests (TensorRT build/run, ORT CUDA in-place caches)
# 2. for tiny-random and ref-60m: compile a TensorRT engine and an ORT CUDA engine, generate greedily, compare the
#    tokens with eager PyTorch on the GPU, and print decode tokens/s of each
# Exits non-zero on the first mismatch or failure. Nothing of this has been run by the project's CI (docs/tensorrt.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-$(mktemp -d -t agentopt-gpu-check-XXXXXX)}"
echo "== environment"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || { echo "nvidia-smi failed: no NVIDIA GPU/driver"; exit 1; }
python - <<'PY'
import onnxruntime, torch
try:
    import tensorrt
    trt = tensorrt.__version__
except ImportError:
    trt = "NOT INSTALLED"
print(f"torch {torch.__version__} (cuda {torch.version.cuda}, available={torch.cuda.is_available()}), "
      f"tensorrt {trt}, onnxruntime {onnxruntime.__version__} providers {onnxruntime.get_available_providers()}")
PY
echo "== gpu tests"
python -m pytest -q -rs -m gpu tests/backends/tensorrt tests/backends/onnxruntime/test_cuda_session.py
echo "== end to end (workdir $WORKDIR)"
WORKDIR="$WORKDIR" python - <<'PY'
import os
import sys
import time
from pathlib import Path

import torch

import agentopt_compiler as ao
from agentopt_compiler.models.registry import load_model

work, steps, context = Path(os.environ["WORKDIR"]), 32, 256
prompt = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]


def eager_cuda(name):
    model = load_model(name).model.eval()
    model.setup_cache(1, context)
    model.to("cuda")
    vocab = model.config.vocab_size
    ids = [t % vocab for t in prompt]
    tokens, length = [], len(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids], device="cuda"), torch.arange(length, device="cuda"),
                       torch.tensor([length - 1], device="cuda"))
        for _ in range(steps):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[tokens[-1]]], device="cuda"), torch.tensor([length], device="cuda"))
            length += 1
    return ids, tokens


failed = False
for name in ("tiny-random", "ref-60m"):
    ids, expected = eager_cuda(name)
    for backend, impl in (("tensorrt", "standard"), ("onnxruntime", "gqa")):
        out = work / f"{name}-{backend}"
        started = time.perf_counter()
        engine = ao.compile(name, out=out, backend=backend, device="cuda", attention_impl=impl,
                            context_length=context, overwrite=True)
        built = time.perf_counter() - started
        engine.complete(ids, max_new_tokens=4, ignore_eos=True)  # warm-up
        result = engine.complete(ids, max_new_tokens=steps, ignore_eos=True)
        same = result.token_ids == expected
        agree = next((i for i, (a, b) in enumerate(zip(result.token_ids, expected)) if a != b), len(expected))
        print(f"{name:12s} {backend:12s} build {built:6.1f}s  decode {result.decode_tokens_per_s:8.1f} tok/s  "
              f"greedy tokens {'match' if same else f'DIFFER from step {agree}'} eager PyTorch (cuda)")
        failed |= not same
sys.exit(1 if failed else 0)
PY
echo "== all GPU checks passed"
