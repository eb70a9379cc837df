"""``rebuild_engine``: (re)build ``model.plan`` from an engine folder's ONNX on this machine's GPU.

Why: a TensorRT plan only runs on the GPU model and TensorRT version it was built with (target.py), while the ONNX in
the folder is portable. So an engine is compiled once anywhere, and ``agentopt rebuild ENGINE`` turns it into a plan
for the GPU at hand. It takes a TensorRT engine (new GPU or TensorRT version, or new build options) or an
onnxruntime engine compiled with ``--attention-impl standard`` (made on a machine without TensorRT), and leaves a
TensorRT engine (backend ``tensorrt``, device ``cuda``) in the same folder.

Atomic like ``compile()`` and with its helpers: TensorRT availability is checked before anything is written, the
new engine is assembled in a temporary sibling folder (files copied, plan built, manifest written) and renamed over
the old one only when complete; on any error the old engine is untouched.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ...errors import AgentOptError
from . import builder
from .lower import check_onnx_for_tensorrt, check_standard_engine, tensorrt_section
from .plan import TensorRTBuildPlan

_MANIFEST_KEYS = ("format", "format_version", "files", "manifest_sha256")  # written by write_manifest itself


def rebuild_engine(folder: str | Path, options: dict | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Rebuild the TensorRT plan of ``folder`` in place; return the new manifest."""
    from ...compiler import _replace_folder, dependency_versions, make_staging_folder
    from ...runtime.manifest import MANIFEST, read_manifest, write_manifest

    log = progress or (lambda _msg: None)
    folder = Path(folder)
    manifest = read_manifest(folder)
    engine = manifest["engine"]
    check_standard_engine(engine, str(folder))
    builder.import_tensorrt()  # fail before writing anything when TensorRT or the GPU is missing
    builder.require_cuda()
    plan = TensorRTBuildPlan.from_manifest(engine, options)
    staging = make_staging_folder(folder, "rebuild")
    try:
        for name in manifest["files"]:
            if name != builder.PLAN_FILE:
                shutil.copy2(folder / name, staging / name)
        check_onnx_for_tensorrt(staging / engine["graph"])
        log(f"building {builder.PLAN_FILE} ({plan.precision}, {plan.typing} typing)...")
        build = builder.build_plan_file(staging / engine["graph"], plan, staging / builder.PLAN_FILE)
        section = tensorrt_section(engine, plan, build)
        section.update(backend="tensorrt", device="cuda")
        body = {k: v for k, v in manifest.items() if k not in _MANIFEST_KEYS}
        body.update(engine=section, dependencies=dependency_versions(),
                    rebuilt=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        new_manifest = write_manifest(staging, body)
        _replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not (folder / MANIFEST).is_file():  # pragma: no cover - _replace_folder either completes or raises
        raise AgentOptError(f"internal: rebuild of '{folder}' left no manifest")
    return new_manifest
