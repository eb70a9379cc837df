"""``compile()``: model -> captured program -> passes -> backend lowering -> engine folder -> loaded Engine.

    load model (built-in name or HF folder)
      -> capture (torch.export, dynamic token count, fixed-capacity caches)
      -> pass pipeline (passes/pipeline.py)
      -> backend lowering into a temporary folder next to ``out``
      -> tokenizer files + manifest.json (versions, config, passes, sha256 of every file)
      -> atomic rename to ``out``: an interrupted compile never leaves a half-written engine, and the staging
         folders of compiles that were killed are removed by the next compile of the same output
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from .errors import (AgentOptError, ModelNotFoundError, OutputPathError, ProviderUnavailableError,
                     UnsupportedOpError, require_compile_packages)
from .output_paths import check_writable_folder, current_umask
from .runtime.manifest import MANIFEST, sealed

# Positions an engine may hold. RoPE tables and caches grow with it; the memory check below is the real bound.
MAX_CONTEXT_LENGTH = 1 << 20
# the fewest: torch.export cannot capture the dynamic token count of a 2-position engine (its range would be [2, 2])
MIN_CONTEXT_LENGTH = 3
MAX_BATCH_SIZE = 1 << 10


@dataclass
class CompileReport:
    model: str
    backend: str
    device: str
    out: Path
    passes: list = field(default_factory=list)  # PassRecord
    files: dict = field(default_factory=dict)  # name -> bytes
    lowering_rules: dict = field(default_factory=dict)  # backend rewrite rule -> times it fired
    fidelity: dict = field(default_factory=dict)  # measured against fp32 when a precision plan has a budget
    stage_seconds: dict = field(default_factory=dict)
    total_seconds: float = 0.0
    not_loaded: str = ""  # why the engine could not be opened on this machine (a device it lacks), if so
    capture: str = ""  # which module was captured: "reference" (models/llama.py) or "transformers"
    weights: str = ""  # the checkpoint's weights as stored and the engine's, in dtype and bytes
    warnings: list = field(default_factory=list)  # what the engine lacks that a user would expect (said at the end)

    def lines(self) -> list[str]:
        out = [f"compiled {self.model} for {self.backend}/{self.device} in {self.total_seconds:.1f}s -> {self.out}"]
        if self.capture:
            out.append(f"capture: {self.capture}")
        if self.weights:
            out.append(f"weights: {self.weights}")
        out.append("passes:")
        for record in self.passes:
            if record.skipped:
                out.append(f"  {record.name:24s} skipped")
                continue
            stats = ", ".join(f"{k}={v}" for k, v in record.stats.items()) or "no change"
            out.append(f"  {record.name:24s} {stats}  ({record.ops_before} -> {record.ops_after} ops)")
            out.extend(f"    WARNING: not applied: {request}" for request in record.unmet)
        if self.lowering_rules:
            out.append("lowering: " + ", ".join(f"{k}={v}" for k, v in self.lowering_rules.items()))
        if self.fidelity:
            out.append(f"precision fidelity: KL {self.fidelity['kl']:.2e}, top-1 {self.fidelity['top1']:.3f} on "
                       f"{self.fidelity['tokens']} held-out tokens"
                       + (f"; decode {self.fidelity['decode_tokens_per_s']:.1f} tokens/s (runs "
                          f"{', '.join(map(str, self.fidelity['decode_runs']))})"
                          if "decode_tokens_per_s" in self.fidelity else ""))
        out.append("files:")
        for name, size in self.files.items():
            out.append(f"  {name:24s} {_human_bytes(size)}")
        out.append("stages: " + ", ".join(f"{k} {v:.1f}s" for k, v in self.stage_seconds.items()))
        out.extend(f"WARNING: {warning}" for warning in self.warnings)
        if self.not_loaded:
            out.append(f"not loaded here: {self.not_loaded}")
        return out


def _human_bytes(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Fail before any expensive work if ``out`` cannot become an engine folder."""
    if out.exists():
        if not out.is_dir():
            raise OutputPathError(f"output '{out}' exists and is a file; choose another --out")
        if any(out.iterdir()):
            if not (out / MANIFEST).is_file():
                raise OutputPathError(f"output '{out}' is a non-empty folder that is not an engine; choose an empty "
                                      "or new folder")
            if not overwrite:
                raise OutputPathError(f"output '{out}' already holds an engine; pass --overwrite to replace it")
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputPathError(f"cannot write the engine to '{out}': '{existing}' is a file, not a folder")
    try:  # a real probe: permission bits alone say nothing for root, read-only mounts or full disks
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(prefix=f".{out.name}.probe-{os.getpid()}-", dir=out.parent).cleanup()
    except OSError as exc:
        raise OutputPathError(f"cannot write the engine to '{out}': {exc.strerror or exc}") from None


def dependency_versions() -> dict[str, str]:
    versions = {}
    for name in ("agentopt-compiler", "torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "numpy", "tokenizers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def compile(model: str | Path = "agent-tiny", out: str | Path = "engine", backend: str = "onnxruntime",
            device: str = "cpu", context_length: int | None = None, skip_passes: Iterable[str] = (),
            debug_dump: str | Path | None = None, overwrite: bool = False, attention_impl: str | None = None,
            batch_size: int = 1, sparse_attention=None, precision_plan=None, kv_cache_dtype: str | None = None,
            kv_calib: str | Path | None = None,
            progress: Callable[[str], None] | None = None, capture: str = "auto"):
    """Compile ``model`` into an engine folder at ``out`` and return the loaded ``Engine``.

    ``model`` is a built-in name (``agent-tiny``, ``tiny-random``, ``ref-60m``) or a local Hugging Face folder. ``context_length``
    (default: the model's max positions, at most 4096) is the KV-cache capacity, prompt plus generated tokens.
    ``attention_impl`` picks how fused attention is lowered (default: the backend's first choice): ``gqa`` (ORT's
    GroupQueryAttention, in-place caches) or ``standard`` (standard ONNX ops only, for execution providers without
    Microsoft contrib ops, and what TensorRT consumes).
    ``batch_size`` is the number of rows the engine runs together (``Engine.generate_batch``); rows have their own
    lengths and positions. ``sparse_attention`` is a ``SparseAttentionPlan``, a spec such as
    ``"window=1024,sinks=4,layers=2-7"`` or a JSON plan file; layers it does not name stay dense.
    ``precision_plan`` is a ``PrecisionPlan`` or its JSON file (``agentopt plan precision`` makes one).
    ``kv_cache_dtype`` ``fp16`` stores the KV caches in half precision and runs attention in it (half the cache
    memory; what ONNX Runtime's CUDA GroupQueryAttention needs); ``int8`` stores int8 codes with static scales
    (K per head after RoPE, V per channel) calibrated on ``kv_calib`` (a text file; default: seeded random tokens,
    with about twice the headroom), attention in fp32 (a quarter of fp32's cache memory); default fp32.
    ``capture`` picks the module that is captured: ``reference`` (our decoder: Llama, Qwen2, Mistral),
    ``transformers`` (the checkpoint's unmodified transformers module: Qwen3, Gemma 3, Phi-3, SmolLM3, ...), or
    ``auto`` (default): the reference module where it implements the checkpoint, else transformers. Attention the
    passes cannot fuse is refused (``--skip-pass fuse_kv_cache`` builds the slow unfused engine on purpose).
    """
    require_compile_packages("compile")  # the deploy install has none of them: one error naming the install
    from . import backends
    from .capture.export import capture as capture_program
    from .models.hf_loader import TOKENIZER_FILES
    from .models.registry import load_model
    from .passes.insert_sparse_attention import SparseAttentionPlan
    from .passes.pipeline import default_pipeline
    from .passes.precision_plan import PrecisionPlan
    from .passes.region_graph import build_region_graph, summarize
    from .runtime.engine import load_engine, unloaded_engine
    from .runtime.manifest import write_manifest

    for name, value in (("out", out), ("debug_dump", debug_dump)):
        if value is not None and (not isinstance(value, (str, Path)) or not str(value)):
            raise AgentOptError(f"{name} must be a folder path, got {value!r}")
    if progress is not None and not callable(progress):
        raise AgentOptError(f"progress must be a function taking one line of text, got {progress!r}")
    log = progress or (lambda _msg: None)
    out = Path(out)
    check_sizes(context_length, batch_size)
    if kv_calib is not None and kv_cache_dtype != "int8":
        raise AgentOptError("--kv-calib calibrates int8 KV caches; add --kv-cache-dtype int8, or drop --kv-calib")
    entry = backends.get_backend(backend, device)
    attention_impl = attention_impl or entry.default_attention_impl(device)
    backends.check_attention_impl(entry, attention_impl)
    check_output_folder(out, overwrite)
    if debug_dump:
        if Path(debug_dump).resolve().is_relative_to(out.resolve()):
            raise OutputPathError(f"--debug-dump {debug_dump} is inside --out {out}, which the engine replaces as a "
                                  "whole: the dump would be deleted; choose a folder outside it")
        check_writable_folder(Path(debug_dump), "--debug-dump")
    sparse_plan = SparseAttentionPlan.load(sparse_attention)
    precision = PrecisionPlan.load(precision_plan)
    pipeline = default_pipeline(sparse_plan, precision, half_precision=device in entry.half_precision_devices,
                                kv_cache_dtype=kv_cache_dtype)
    if isinstance(skip_passes, str):  # one pass name, not its letters
        skip_passes = (skip_passes,)
    unknown = set(skip_passes) - set(pipeline.names)
    if unknown:
        raise AgentOptError(f"unknown pass to skip: {', '.join(sorted(unknown))}; passes are: "
                            f"{', '.join(pipeline.names)}")
    for option, value, needs in (("--precision-plan", precision_plan, "assign_layer_precision"),
                                 ("--sparse-attention", sparse_attention, "insert_sparse_attention"),
                                 ("--kv-cache-dtype", kv_cache_dtype not in (None, "fp32"), "set_kv_cache_dtype")):
        if value and needs in skip_passes:  # the engine would not hold what its manifest and inspect say
            raise AgentOptError(f"{option} is applied by the pass {needs}, which --skip-pass {needs} skips; drop "
                                "one of the two")
    started = time.perf_counter()
    report = CompileReport(str(model), backend, device, out)

    def stage(name: str):
        return _Stage(name, report, log)

    with stage("load"):
        loaded = load_model(model, capture)
        tokenizer_size = _check_tokenizer(loaded)
    config = loaded.config
    if tokenizer_size > config.vocab_size:
        report.warnings.append(f"the tokenizer has {tokenizer_size} tokens and the model's vocabulary "
                               f"{config.vocab_size}: text that encodes to ids from {config.vocab_size} on cannot "
                               "be fed (the runtime refuses it); use the checkpoint's own tokenizer")
        log(f"WARNING: {report.warnings[-1]}")
    report.capture = loaded.capture + (f" ({loaded.capture_note})" if loaded.capture_note else "")
    for plan, kind in ((precision, "precision"), (sparse_plan, "sparse attention")):
        if plan and plan.model and plan.model != loaded.name:
            raise AgentOptError(f"the {kind} plan was measured on '{plan.model}', and this compile is of "
                                f"'{loaded.name}': plan this model (agentopt plan {kind.split()[0]} --model "
                                f"{model}), or compile the planned one (--model {plan.model})")
    context = min(config.max_position_embeddings, 4096) if context_length is None else context_length
    if context > config.max_position_embeddings:  # allowed (RoPE extends), but the model never saw those positions
        report.warnings.append(f"--context-length {context} goes past the {config.max_position_embeddings} "
                               "positions the model was trained for (max_position_embeddings): its output beyond "
                               "them is untested")
        log(f"WARNING: {report.warnings[-1]}")
    if kv_cache_dtype == "int8":
        with stage("calibrate int8 KV scales"):
            from .analysis.calibration import calibration_batches
            from .analysis.kv_quantization import kv_cache_scales

            from .analysis.kv_quantization import RANDOM_TOKEN_PEAK_LEVEL, TEXT_PEAK_LEVEL

            batches = calibration_batches(loaded, kv_calib, sequences=4, length=min(128, context), seed=77)
            level = TEXT_PEAK_LEVEL if kv_calib else RANDOM_TOKEN_PEAK_LEVEL
            next(p for p in pipeline.passes if p.name == "set_kv_cache_dtype").scales = kv_cache_scales(
                loaded.model, batches, config.num_kv_heads, level)
            log(f"int8 KV scales from {kv_calib or 'seeded random tokens'} ({sum(b.numel() for b in batches)} "
                f"tokens), their peaks at level {level} of 127")
    check_memory(config, context, batch_size)
    if precision:
        precision.check_units(config.num_layers)
    if sparse_plan:
        sparse_plan.resolve(config.num_layers)  # layers the model lacks: refused now, not after the capture
    parameters = sum(p.numel() for p in loaded.model.parameters())
    log(f"model {loaded.name}: {config.family} ({loaded.capture} module), {config.num_layers} layers, "
        f"{parameters / 1e6:.1f}M parameters, context {context}")
    with stage("capture"):
        program = capture_program(loaded.model, context, batch_size)
    with stage("passes"):
        program, records = pipeline.run(program, skip=set(skip_passes),
                                        debug_dump=Path(debug_dump) if debug_dump else None, log=log)
    report.passes = records
    check_attention_fused(program, records)
    report.weights = describe_weights(loaded, program)
    regions = summarize(build_region_graph(program.module))

    staging = make_staging_folder(out, "tmp")
    try:
        with stage("lower"):
            lower = entry.load("lowering")
            engine_section = lower(program, staging, attention_impl=attention_impl, device=device)
        tokenizer_files = []
        if loaded.tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (loaded.tokenizer_dir / name).is_file():
                    shutil.copy2(loaded.tokenizer_dir / name, staging / name)
                    tokenizer_files.append(name)
        if "tokenizer.json" not in tokenizer_files:
            report.warnings.append(f"{loaded.source} has no tokenizer.json: the engine takes token ids only "
                                   "(agentopt run and serve need text); put the checkpoint's tokenizer.json there "
                                   "and recompile")
            log(f"WARNING: {report.warnings[-1]}")
        with stage("manifest"):
            manifest = write_manifest(staging, {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "toolkit": {"name": "agentopt-compiler", "python": sys.version.split()[0]},
                "dependencies": dependency_versions(),
                "model": {"name": loaded.name, "source": loaded.source, "config": config.to_dict(),
                          "capture": loaded.capture, "weights": report.weights},
                "engine": {"backend": backend, "device": device, "context_length": context,
                           "batch_size": program.batch_size, "dtype": "float32", **engine_section},
                "passes": [r.to_dict() for r in records],
                "sparse_attention": sparse_plan.to_dict() if sparse_plan else None,
                "precision_plan": precision.to_dict() if precision else None,
                "regions": regions,
                "tokenizer": {"files": tokenizer_files},
            })
        if precision and precision.budget:  # measured before the engine takes its place: a failure leaves nothing
            report.fidelity = _measure_planned_engine(staging, device, loaded, precision, manifest, log)
        _replace_folder(staging, out)
    except OSError as exc:  # a full disk, a quota, a folder removed under us: nothing half-written stays
        shutil.rmtree(staging, ignore_errors=True)
        raise OutputPathError(f"cannot write the engine to '{out}': {exc.strerror or exc}; free some space or "
                              "choose another --out") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    report.files = {name: info["bytes"] for name, info in manifest["files"].items()}
    report.lowering_rules = dict(engine_section.get("lowering_rules", {}))
    report.files[MANIFEST] = (out / MANIFEST).stat().st_size
    report.total_seconds = time.perf_counter() - started
    try:
        engine = load_engine(out, device=device)
    except ProviderUnavailableError as exc:  # compiled for a device this machine lacks (e.g. CUDA on a CPU box)
        report.not_loaded = (f"{exc} The engine folder is complete: run it on a machine with that device, or here "
                             f"with load_engine(folder, device='cpu') / --device cpu.")
        log(f"engine written; not loaded here: {exc}")
        engine = unloaded_engine(out, ProviderUnavailableError(report.not_loaded))
        engine.compile_report = report
        return engine
    except AgentOptError:  # an engine that does not load is not left as if it were one
        shutil.rmtree(out, ignore_errors=True)
        raise
    try:
        _run_once(engine)
    except AgentOptError:  # nor one that does not run
        shutil.rmtree(out, ignore_errors=True)
        raise
    engine.compile_report = report
    return engine


def _run_once(engine) -> None:
    """Prefill two tokens and decode one: a lowering the backend accepts at load but cannot run (a contrib op given
    inputs of a rank its kernel refuses) fails here, at compile, not at the user's first request."""
    try:
        engine.generate_ids([0, 1], max_new_tokens=2, ignore_eos=True)
    except AgentOptError:
        raise
    except Exception as exc:  # the backend's own error (onnxruntime raises RuntimeError subclasses)
        first_line = " ".join(str(exc).split())[:300]
        raise UnsupportedOpError(f"the compiled engine fails when run ({type(exc).__name__}: {first_line}); this "
                                 "is a lowering bug for this model: please report it; --attention-impl standard "
                                 "(standard ONNX ops only) may avoid it") from None


def _check_tokenizer(loaded) -> int:
    """The checkpoint's tokenizer files (copied into the engine) are read now, as the runtime reads them: a broken
    one is an error naming the checkpoint's file before anything is captured, not an engine that cannot run.
    Returns the tokenizer's size (0: none, the engine takes token ids; a warning says so)."""
    from .runtime.tokenizer import Tokenizer

    if loaded.tokenizer_dir is None or not (loaded.tokenizer_dir / "tokenizer.json").is_file():
        return 0
    try:
        return Tokenizer(loaded.tokenizer_dir).size
    except AgentOptError as exc:
        raise ModelNotFoundError(f"{exc}; the engine would carry this tokenizer: fix the file or re-save it with "
                                 "tokenizer.save_pretrained") from None


def _measure_planned_engine(folder: Path, device: str, loaded, plan, manifest: dict, log) -> dict | None:
    """KL, top-1 and decode speed of the engine a precision plan built (in its staging ``folder``), next to the
    plan's prediction, recorded in its manifest; None when this machine cannot run it (another device)."""
    from .runtime.engine import load_engine

    try:
        engine = load_engine(folder, device=device)
    except ProviderUnavailableError:
        log("the precision plan's fidelity was not measured: that needs the engine running on its device")
        return None
    measured = _check_precision_fidelity(engine, loaded, plan, log)
    measured.update(measure_decode_speed(engine))
    predicted = plan.predicted.get("decode_matmul_seconds")
    log(f"decode speed of the built engine: {measured['decode_tokens_per_s']:.1f} tokens/s (median of "
        f"{len(measured['decode_runs'])} runs, {min(measured['decode_runs']):.1f}-{max(measured['decode_runs']):.1f});"
        " the plan predicted " + (f"{predicted * 1e3:.2f} ms of matmuls per step" if predicted else "no decode time"))
    manifest["precision_plan"]["measured"] = measured  # (manifest.json is not among the hashed files: sealed again)
    (folder / MANIFEST).write_text(json.dumps(sealed(manifest), indent=2) + "\n")
    return measured


def check_attention_fused(program, records) -> None:
    """Refuse a graph with attention that fuse_kv_cache left unfused (unless the user skipped the pass): such an
    engine would copy every layer's cache in and out at each step, silently many times slower."""
    fuse = next((r for r in records if r.name == "fuse_kv_cache"), None)
    if fuse is None or fuse.skipped:
        return
    left = sum(1 for n in program.exported.graph.nodes
               if n.op == "call_function" and str(n.target) == "aten.scaled_dot_product_attention.default")
    if left:
        reasons = "; ".join(fuse.notes[:2]) or "no candidate matched"
        raise AgentOptError(f"{left} attention layer(s) could not be fused into cached attention ({reasons}); "
                            "refusing to write an engine that copies its KV caches every step. Pass --skip-pass "
                            "fuse_kv_cache to build that slow engine on purpose")


def describe_weights(loaded, program) -> str:
    """'checkpoint bfloat16, 942.3 MiB -> engine float32, 1.8 GiB (...)': what the engine stores, said plainly when
    it is not what the checkpoint held (a bf16 checkpoint doubles in size on ONNX Runtime CPU)."""
    import torch

    shared = {(t.untyped_storage().data_ptr(), t.shape): t for t in program.exported.state_dict.values()
              if isinstance(t, torch.Tensor)}  # tied weights (embedding = lm_head) are stored once
    tensors = list(shared.values())
    size = sum(t.numel() * t.element_size() for t in tensors)
    dtypes = "+".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
                      + (["int8/int4 blocks"] if any(t.dtype == torch.uint8 for t in tensors) else []))
    engine = f"engine {dtypes}, {_human_bytes(size)}"
    if not loaded.checkpoint_bytes:
        return engine
    text = f"checkpoint {loaded.checkpoint_dtype}, {_human_bytes(loaded.checkpoint_bytes)} -> {engine}"
    if loaded.checkpoint_dtype in ("bfloat16", "float16") and "float32" in dtypes:
        text += (f" (upcast from {loaded.checkpoint_dtype}: ONNX Runtime CPU computes in fp32; a --precision-plan "
                 "makes int8/int4 layers)")
    return text


def measure_decode_speed(engine, prompt: int = 16, steps: int = 32, repeats: int = 3) -> dict:
    """Decode tokens per second of a built engine: a ``prompt``-token prefill, then ``steps`` one-token steps,
    timed; the median of ``repeats`` runs (every run's rate is kept: one run on a shared machine says little)."""
    import numpy as np

    from .analysis.precision import sequence_rows

    session = engine.session
    steps = max(1, min(steps, engine.context_length - prompt - 1))
    vocab = engine.manifest["model"]["config"]["vocab_size"]
    tokens = (np.arange(prompt + steps, dtype=np.int64) * 7 + 1) % vocab  # any ids the vocabulary has
    fed = sequence_rows(session)
    rows = np.repeat(tokens[None], len(fed), axis=0)
    rates = []
    for _ in range(repeats):
        session.reset()
        session.run(rows[:, :prompt], np.arange(prompt), None, fed)
        start = time.perf_counter()
        for position in range(prompt, prompt + steps):
            session.run(rows[:, position:position + 1], np.array([position]), None, fed)
        rates.append(round(steps / (time.perf_counter() - start), 2))
    session.reset()
    return {"decode_tokens_per_s": sorted(rates)[len(rates) // 2], "decode_runs": rates,
            "decode_steps": steps}


def _check_precision_fidelity(engine, loaded, plan, log) -> dict:
    """Measure the compiled engine against fp32 on held-out tokens and put it next to the plan's prediction."""
    from .analysis.calibration import calibration_batches
    from .analysis.precision import measure_fidelity

    loaded.model.drop_cache()  # the eager reference runs without the capture's caches
    held_out = calibration_batches(loaded, None, sequences=2, length=min(64, engine.context_length - 1), seed=1234)
    measured = measure_fidelity(engine, loaded.model, held_out)
    # against the dense fp32 model: sparse attention or a reduced KV cache compiled beside the plan count too
    manifest = engine.manifest
    others = [what for what, present in (
        ("sparse attention", bool(manifest.get("sparse_attention"))),
        ("a reduced KV cache", any(c.get("dtype", "float32") != "float32" for c in manifest["engine"]["caches"])))
        if present]
    scope = f" (the whole engine: the plan with {' and '.join(others)})" if others else ""
    log(f"precision fidelity on held-out tokens{scope}: KL {measured['kl']:.2e} (plan predicted "
        f"{plan.predicted.get('kl', 'n/a')}), top-1 {measured['top1']:.3f}")
    if "max_kl" in plan.budget and measured["kl"] > plan.budget["max_kl"]:
        log(f"WARNING: the engine's measured KL {measured['kl']:.3g}{scope} exceeds the plan's budget "
            f"{plan.budget['max_kl']}; choose a tighter plan" + ("" if not others else ", or measure the plan alone "
                                                                 "(compile without the other options)"))
    return measured


def check_sizes(context_length: int | None, batch_size: int) -> None:
    """Context and batch sizes as the Python API may pass them (the CLI's argument types say the same)."""
    for option, value, low, high in (("--context-length", context_length, MIN_CONTEXT_LENGTH,
                                      MAX_CONTEXT_LENGTH),
                                     ("--batch-size", batch_size, 1, MAX_BATCH_SIZE)):
        if value is None and option == "--context-length":  # the model's default
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            name = option.lstrip("-").replace("-", "_")  # as compile() spells it
            raise AgentOptError(f"{option} ({name} in Python) must be an integer from {low} to {high}, got {value!r}")


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: no memory check
        return None


def check_memory(config, context: int, batch_size: int) -> None:
    """Refuse a context whose KV caches cannot fit in this machine's memory, before allocating them: a compile
    holds them twice (the eager model's fp32 caches during capture, the engine's once it is loaded)."""
    per_token = 2 * config.num_layers * batch_size * config.num_kv_heads * config.dim_per_head * 4
    memory = physical_memory_bytes()
    if memory and 2 * per_token * context > memory:
        raise AgentOptError(f"--context-length {context} (batch {batch_size}) needs {per_token * context / 2**30:.1f} "
                            f"GiB of KV cache, held twice while compiling, and this machine has "
                            f"{memory / 2**30:.1f} GiB; choose a --context-length of at most "
                            f"{memory // (2 * per_token)}")


def make_staging_folder(out: Path, kind: str) -> Path:
    """A new hidden folder beside ``out`` to build into, ``.{out}.{kind}-{pid}-{random}``: the pid tells a later
    run a killed run's leftovers (its process is gone) from a running one's. Leftovers are removed first."""
    remove_stale_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; an engine folder is as readable as any other
    return staging


# What compiles and rebuilds of ``out`` create beside it, each name carrying the pid of the process that made it:
# staging folders (tmp, rebuild), the engine being replaced (old), the writability probe; and a manifest being
# rewritten beside the engine, which earlier versions did after the engine took its place.
STAGING_KINDS = ("tmp", "rebuild", "old", "probe", "manifest")


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove what killed compiles or rebuilds of ``out`` left beside it (their process is gone); return it."""
    import glob

    removed = []
    for kind in STAGING_KINDS:
        prefix = f".{out.name}.{kind}-"
        for path in out.parent.glob(glob.escape(prefix) + "*"):
            pid = path.name[len(prefix):].split("-")[0].split(".")[0]
            if pid.isdigit() and _process_alive(int(pid)):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (PermissionError), or no way to ask: keep its files
        return True
    return True


def _replace_folder(staging: Path, out: Path) -> None:
    """Move the finished engine into place; an existing engine is swapped out only after the new one is complete."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


class _Stage:
    """Times a compile stage, logs its start and end (stages can take tens of seconds on big models)."""

    def __init__(self, name: str, report: CompileReport, log):
        self.name, self.report, self.log = name, report, log

    def __enter__(self):
        self.log(f"{self.name}...")
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.start
        self.report.stage_seconds[self.name] = seconds
        if exc[0] is None:
            self.log(f"{self.name} done ({seconds:.1f}s)")
        return False
