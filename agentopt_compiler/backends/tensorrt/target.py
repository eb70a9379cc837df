"""What a TensorRT plan was built for, and whether it can run here.

A serialized TensorRT engine (``model.plan``) is tied to the TensorRT version that built it and to the GPU's compute
capability: its kernels are chosen by timing on that GPU, and TensorRT refuses (or, across GPU models with the same
compute capability, only warns about) a plan from elsewhere. The compiler records the target at build time; the
session compares it with the current machine before deserializing, so the user gets one line that names both and
the command that fixes it instead of a deserialization failure deep inside TensorRT.

Pure Python: ``describe_target`` imports ``tensorrt`` and ``torch`` lazily and only when called.
"""

from __future__ import annotations

REBUILD_HINT = "agentopt rebuild {engine}"


def describe_target() -> dict:
    """TensorRT version, GPU name and compute capability of this machine (needs tensorrt and a CUDA torch)."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return {
        "tensorrt": str(trt.__version__),
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": f"{major}.{minor}",
    }


def _describe(target: dict) -> str:
    return (f"{target.get('gpu', '?')} (compute capability {target.get('compute_capability', '?')}), "
            f"TensorRT {target.get('tensorrt', '?')}")


def check_compatible(recorded: dict | None, current: dict, engine: str = "ENGINE") -> str | None:
    """None if a plan built for ``recorded`` runs on ``current``; otherwise the error message to show.

    Compared: TensorRT version (plans are not portable across TensorRT versions), compute capability (kernels are
    compiled for one SM architecture) and GPU name (tactics were timed on that GPU; TensorRT only warns, but the
    plan may be slow or fail to find its kernels' resources, so we ask for a rebuild instead of guessing).
    """
    if not recorded:
        return (f"engine '{engine}' does not record the GPU and TensorRT version its plan was built for; rebuild it "
                f"on this machine with: {REBUILD_HINT.format(engine=engine)}")
    differing = [key for key in ("tensorrt", "compute_capability", "gpu") if recorded.get(key) != current.get(key)]
    if not differing:
        return None
    what = {"tensorrt": "TensorRT version", "compute_capability": "compute capability", "gpu": "GPU"}
    return (f"engine '{engine}' was built for {_describe(recorded)} but this machine has {_describe(current)} "
            f"({', '.join(what[k] for k in differing)} differ); TensorRT plans do not move between GPUs or TensorRT "
            f"versions: rebuild it here with: {REBUILD_HINT.format(engine=engine)}")
