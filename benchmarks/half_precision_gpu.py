"""Do the fp16/bf16 sensitivities that `agentopt plan precision` measures on CPU hold on a GPU?

The planner never runs a GPU: it scores an fp16/bf16 unit by emulating the half region that assign_layer_precision
emits (``analysis.precision.unit_at_precision``: inputs, weights and bias rounded to half, fp32 accumulation, output
rounded to half). On ONNX Runtime CUDA or TensorRT that region runs as a cuBLAS half GEMM. This script measures, for
every unit alone and for all units at once, KL(fp32 || half) of the next-token distributions three ways:

    cpu emulated   what the plan uses (the fp32 reference on CPU too)
    gpu emulated   the same emulation on CUDA tensors (separates device effects from emulation effects)
    gpu native     the unit's linears converted to half and run by CUDA (the GPU's fp32 model is the reference)

and reports native / emulated. Needs PyTorch with CUDA; nothing else of the GPU stack (no onnxruntime-gpu, no
TensorRT: the ONNX regions themselves are not run here).

    python benchmarks/half_precision_gpu.py --model agent-tiny --tokens calib.json --json out.json

``--tokens``: a JSON list of token-id rows (calibration text already tokenized); default: seeded random ids, as the
planner uses for models with random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agentopt_compiler.analysis.calibration import calibration_batches  # noqa: E402
from agentopt_compiler.analysis.precision import (HALF_DTYPES, restoring, unit_at_precision,  # noqa: E402
                                                  unit_linears)
from agentopt_compiler.models.registry import load_model  # noqa: E402


@contextlib.contextmanager
def native_half(linears: list[torch.nn.Linear], dtype: torch.dtype):
    """The region as the GPU runs it: x cast to half, a half GEMM with half weights, the output cast back."""
    with restoring(linears) as hooks:
        for layer in linears:
            layer.to(dtype)
            hooks.append(layer.register_forward_pre_hook(lambda m, args: (args[0].to(dtype), *args[1:])))
            hooks.append(layer.register_forward_hook(lambda m, args, out: out.float()))
        yield


@contextlib.contextmanager
def all_units(units: dict[str, list[torch.nn.Linear]], make):
    with contextlib.ExitStack() as stack:
        for linears in units.values():
            stack.enter_context(make(linears))
        yield


def log_probs(model, batches):
    with torch.no_grad():
        return [torch.log_softmax(model(b).double(), -1) for b in batches]


def kl_top1(reference, other) -> tuple[float, float]:
    kl = sum(float((r.exp() * (r - o)).sum()) for r, o in zip(reference, other))
    agree = sum(float((r.argmax(-1) == o.argmax(-1)).sum()) for r, o in zip(reference, other))
    count = sum(r.shape[0] * r.shape[1] for r in reference)
    return kl / count, agree / count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="agent-tiny")
    p.add_argument("--tokens", default=None, help="JSON list of token-id rows (default: seeded random ids)")
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script (CPU half GEMMs as 'native')")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: this check needs PyTorch with CUDA and a GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    loaded = load_model(args.model)
    if args.tokens:
        rows = json.loads(Path(args.tokens).read_text())
        batches = [torch.tensor([row]) for row in rows]
    else:
        batches = calibration_batches(loaded, None, args.sequences, args.length)
    cpu_model = loaded.model.eval()
    gpu_model = copy.deepcopy(cpu_model).to(args.device).eval()
    gpu_batches = [b.to(args.device) for b in batches]
    cpu_units, gpu_units = unit_linears(cpu_model), unit_linears(gpu_model)
    cpu_ref, gpu_ref = log_probs(cpu_model, batches), log_probs(gpu_model, gpu_batches)
    fp32_gap = kl_top1([r.cpu() for r in gpu_ref], cpu_ref)

    rows = []
    for precision, dtype in HALF_DTYPES.items():
        emulate = lambda linears: unit_at_precision(linears, precision, 32)  # noqa: E731
        for unit in [*cpu_units, "all units"]:
            if unit == "all units":
                contexts = (all_units(cpu_units, emulate), all_units(gpu_units, emulate),
                            all_units(gpu_units, lambda ls: native_half(ls, dtype)))
            else:
                contexts = (emulate(cpu_units[unit]), emulate(gpu_units[unit]), native_half(gpu_units[unit], dtype))
            measured = []
            for context, model, ref, data in zip(contexts, (cpu_model, gpu_model, gpu_model),
                                                 (cpu_ref, gpu_ref, gpu_ref), (batches, gpu_batches, gpu_batches)):
                with context:
                    measured.append(kl_top1(ref, log_probs(model, data)))
            (cpu_kl, cpu_top1), (gemu_kl, _), (native_kl, native_top1) = measured
            rows.append({"precision": precision, "unit": unit, "kl_cpu_emulated": cpu_kl, "kl_gpu_emulated": gemu_kl,
                         "kl_gpu_native": native_kl, "native_over_cpu_emulated": native_kl / cpu_kl if cpu_kl else None,
                         "top1_cpu_emulated": cpu_top1, "top1_gpu_native": native_top1})
        per_unit = [r for r in rows if r["precision"] == precision and r["unit"] != "all units"]
        rows.append({"precision": precision, "unit": "sum of units (the plan's additive prediction)",
                     "kl_cpu_emulated": sum(r["kl_cpu_emulated"] for r in per_unit),
                     "kl_gpu_native": sum(r["kl_gpu_native"] for r in per_unit)})

    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (dry run)"
    print(f"# fp16/bf16 sensitivity: CPU emulation vs native CUDA ({args.model}, {device}, torch {torch.__version__})")
    print(f"\n{len(batches)} sequences x {batches[0].shape[1]} tokens; fp32 GPU vs fp32 CPU: KL {fp32_gap[0]:.2e}, "
          f"top-1 {fp32_gap[1]:.4f}\n")
    print("| precision | unit | KL cpu emulated | KL gpu emulated | KL gpu native | native / cpu emulated | "
          "top-1 native |")
    print("|---|---|---|---|---|---|---|")
    def cell(value, spec):
        return "" if value is None else format(value, spec)

    for r in rows:
        print(f"| {r['precision']} | {r['unit']} | {cell(r['kl_cpu_emulated'], '.3e')} | "
              f"{cell(r.get('kl_gpu_emulated'), '.3e')} | {cell(r['kl_gpu_native'], '.3e')} | "
              f"{cell(r.get('native_over_cpu_emulated'), '.2f')} | {cell(r.get('top1_gpu_native'), '.4f')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "device": device, "torch": torch.__version__,
                                               "fp32_gpu_vs_cpu": fp32_gap, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
