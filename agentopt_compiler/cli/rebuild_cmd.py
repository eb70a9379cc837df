"""agentopt rebuild: build an engine folder's TensorRT plan for this machine's GPU (see backends/tensorrt/rebuild.py).

TensorRT plans are tied to one GPU model and TensorRT version; the engine's ONNX is not. This command (run on the
GPU machine) turns a TensorRT engine from elsewhere, or an onnxruntime engine compiled with --attention-impl standard,
into a TensorRT engine for this GPU, replacing the folder atomically.
"""

from __future__ import annotations

from .arg_types import float_in
from .progress import ProgressLog


def add_parser(sub) -> None:
    p = sub.add_parser("rebuild", help="rebuild an engine's TensorRT plan on this GPU",
                       description="Rebuild model.plan from the engine folder's ONNX with TensorRT on this machine's "
                                   "GPU and rewrite the manifest (the folder is replaced only when the build "
                                   "succeeds). Needs TensorRT: pip install 'agentopt-compiler[tensorrt]'.")
    p.add_argument("engine", help="engine folder (tensorrt, or onnxruntime compiled with --attention-impl standard)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="compute precision (default: as recorded, else fp32)")
    p.add_argument("--typing", choices=["strong", "constraints"], default=None,
                   help="strong: types from the ONNX (TensorRT 11); constraints: fp16/bf16 flags with fp32 islands "
                        "(TensorRT 10.x only) (default: as recorded, else strong)")
    p.add_argument("--workspace-gib", type=float_in(0.0, 1024.0, low_open=True), default=None,
                   help="builder workspace limit in GiB (default 4)")
    p.add_argument("--timing-cache", default=None, metavar="PATH|off",
                   help="TensorRT timing cache file (default: ~/.cache/agentopt/tensorrt-timing.cache)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(handler=run)


def run(args) -> int:
    from ..backends.tensorrt.rebuild import rebuild_engine

    options = {"precision": args.precision, "typing": args.typing, "timing_cache": args.timing_cache,
               "workspace_bytes": int(args.workspace_gib * (1 << 30)) if args.workspace_gib else None}
    manifest = rebuild_engine(args.engine, options, progress=ProgressLog(args.quiet))
    target = manifest["engine"]["tensorrt"]["target"]
    print(f"rebuilt {args.engine} for {target['gpu']} (compute capability {target['compute_capability']}, "
          f"TensorRT {target['tensorrt']})")
    return 0
