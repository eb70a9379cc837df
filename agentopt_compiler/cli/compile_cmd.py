"""agentopt compile: model (built-in name or HF folder) -> engine folder."""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading

from .arg_types import int_in
from .progress import ProgressLog

DEFAULT_MODEL = "agent-tiny"


def add_parser(sub) -> None:
    from ..compiler import MAX_BATCH_SIZE, MAX_CONTEXT_LENGTH, MIN_CONTEXT_LENGTH

    p = sub.add_parser("compile", help="compile a model into an engine folder",
                       description="Capture a model with torch.export, run the pass pipeline, lower it to a backend "
                                   "and write a self-describing engine folder.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"built-in model name (agent-tiny, tiny-random, ref-60m) or a local Hugging Face folder "
                        f"(default: {DEFAULT_MODEL})")
    p.add_argument("--capture", default="auto", choices=["auto", "reference", "transformers"],
                   help="module to capture: reference = our decoder (Llama, Qwen2, Mistral); transformers = the "
                        "checkpoint's unmodified transformers module (Qwen3, Gemma 3, Phi-3, SmolLM3, ...); auto "
                        "(default) = reference where it implements the checkpoint, else transformers")
    p.add_argument("--out", required=True, help="engine folder to write (must be new, empty, or an engine with "
                                                "--overwrite)")
    p.add_argument("--backend", default="onnxruntime", help="backend (default: onnxruntime)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device the engine runs on")
    p.add_argument("--context-length", type=int_in(MIN_CONTEXT_LENGTH, MAX_CONTEXT_LENGTH), default=None,
                   help="KV-cache capacity in tokens, prompt plus generation (default: the model's max positions, "
                        "at most 4096); the compile refuses one whose caches would not fit in memory")
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH_SIZE), default=1,
                   help="rows the engine runs together (several agents or best-of-n); each row has its own length")
    p.add_argument("--attention-impl", default=None, choices=["gqa", "standard"],
                   help="lowering of fused attention: gqa = ORT GroupQueryAttention with in-place caches (default for "
                        "onnxruntime); standard = standard ONNX ops only (other execution providers; TensorRT)")
    p.add_argument("--sparse-attention", metavar="SPEC|PLAN.json", default=None,
                   help="per-layer sparse attention, e.g. window=1024,sinks=4,layers=2-7 (groups separated by ';'; "
                        "sinks, stride and kv_heads optional; no layers = all), or a JSON plan file; other layers "
                        "stay dense")
    p.add_argument("--precision-plan", metavar="PLAN.json", default=None,
                   help="per-layer precision plan (int8/int4 weight-only units), made by agentopt plan precision "
                        "or by hand; fp16/bf16 units run as typed regions on GPU targets")
    p.add_argument("--kv-cache-dtype", choices=["fp32", "fp16", "int8"], default=None,
                   help="KV cache precision (default fp32); fp16 halves cache memory and runs attention in fp16 (what "
                        "ONNX Runtime's CUDA GroupQueryAttention needs); int8 quarters it: int8 codes with static "
                        "scales (K per head, V per channel) calibrated at compile, attention in fp32")
    p.add_argument("--kv-calib", default=None, metavar="FILE",
                   help="text to calibrate int8 KV scales on (default: seeded random tokens, with about 2x headroom)")
    p.add_argument("--skip-pass", action="append", default=[], metavar="NAME",
                   help="skip a pass of the pipeline (repeatable)")
    p.add_argument("--debug-dump", metavar="DIR", help="write the graph after each pass into DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an existing engine at --out")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..compiler import compile

    with _noticing_interrupts() as interrupted:
        engine = compile(model=args.model, out=args.out, backend=args.backend, device=args.device,
                         context_length=args.context_length, skip_passes=args.skip_pass, debug_dump=args.debug_dump,
                         overwrite=args.overwrite, attention_impl=args.attention_impl, batch_size=args.batch_size,
                         sparse_attention=args.sparse_attention, precision_plan=args.precision_plan,
                         kv_cache_dtype=args.kv_cache_dtype, kv_calib=args.kv_calib,
                         progress=ProgressLog(args.quiet), capture=args.capture)
    if interrupted():  # Ctrl-C landed in a library's cleanup callback, which swallowed it: the compile went on
        shutil.rmtree(engine.folder, ignore_errors=True)
        raise KeyboardInterrupt
    print("\n".join(engine.compile_report.lines()))
    return 0


@contextlib.contextmanager
def _noticing_interrupts():
    """Yields a function that says whether Ctrl-C was pressed meanwhile. Python raises KeyboardInterrupt wherever
    the program is, and inside a weakref callback (torch's and onnx's caches run them) it is printed as "Exception
    ignored" and lost: the compile would then finish and exit 0 as if it had not been interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    seen = []

    def handler(signum, frame):
        seen.append(signum)
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without this handler

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)
