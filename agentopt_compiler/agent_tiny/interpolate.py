"""Interpolate two agent-tiny runs weight by weight: ``(1 - a) * BASE + a * TUNED``.

Fine-tuning agent-tiny on everyday phrasing and generated tools (``train --init-from ... --mix stage2``) gains on
requests written by people and loses some of the generator's own tasks (MODEL_CARD.md: every fine-tune so far traded
the generator's multiplicative chains away). Both runs start from the same weights, so the straight line between them
stays in one basin, and a point on it can keep most of what each end is good at (weight-space ensembling, "WiSE-FT",
Wortsman et al. 2022):

    BASE  (shipped):     generator split high, everyday requests low
    TUNED (fine-tune):   everyday requests higher, generator split lower
    (1 - a) BASE + a TUNED, a chosen on dev tasks only (never on the held-out sets it is then measured on)

``python -m agentopt_compiler.agent_tiny.interpolate BASE TUNED --weight 0.5 --out DIR`` writes a folder train.py
could have written (weights, config, tokenizer files of BASE) plus ``interpolation.json`` naming both ends and ``a``.
The runs must have the same config and the same tokenizer: the line between two different vocabularies means nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from ..errors import AgentOptError

_SHARED_FILES = ("tokenizer.json", "tokenizer_config.json")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_pair(base: Path, tuned: Path) -> None:
    for folder in (base, tuned):
        missing = [f for f in ("config.json", "model.safetensors", *_SHARED_FILES) if not (folder / f).is_file()]
        if missing:
            raise AgentOptError(f"{folder}: no {', '.join(missing)}; give a folder agent_tiny.train wrote "
                                "(or agentopt_compiler/models/agent_tiny)")
    keep = lambda cfg: {k: v for k, v in cfg.items() if k != "torch_dtype"}  # noqa: E731 (fp16 and fp32 saves mix)
    if keep(json.loads((base / "config.json").read_text())) != keep(json.loads((tuned / "config.json").read_text())):
        raise AgentOptError(f"{base} and {tuned} are models of different shapes (config.json differs); interpolation "
                            "needs a run continued from the other (train --init-from)")
    if _sha256(base / "tokenizer.json") != _sha256(tuned / "tokenizer.json"):
        raise AgentOptError(f"{base} and {tuned} have different tokenizers; interpolation needs a run continued from "
                            "the other (train --init-from keeps the tokenizer)")


def interpolate(base: str | Path, tuned: str | Path, weight: float, out: str | Path) -> Path:
    """Write ``(1 - weight) * base + weight * tuned`` (fp32) with base's config and tokenizer files to ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    base, tuned, out = Path(base), Path(tuned), Path(out)
    if not 0.0 <= weight <= 1.0:
        raise AgentOptError(f"--weight {weight}: give a number from 0 (BASE) to 1 (TUNED)")
    _check_pair(base, tuned)
    a, b = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise AgentOptError(f"{base} and {tuned} hold different tensors; interpolation needs two runs of one model")
    mixed = {k: torch.lerp(a[k].float(), b[k].float(), weight).contiguous() for k in a}
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(mixed, str(tmp), metadata={"format": "pt", "dtype": "float32"})
    os.replace(tmp, out / "model.safetensors")
    cfg = json.loads((base / "config.json").read_text())
    cfg["torch_dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in _SHARED_FILES:
        shutil.copyfile(base / name, out / name)
    (out / "interpolation.json").write_text(json.dumps({
        "base": str(base), "base_sha256": _sha256(base / "model.safetensors"),
        "tuned": str(tuned), "tuned_sha256": _sha256(tuned / "model.safetensors"), "weight": weight}, indent=2))
    return out


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the run fine-tuned from (a = 0)")
    p.add_argument("tuned", help="the fine-tuned run (a = 1)")
    p.add_argument("--weight", type=float, required=True, help="a: 0 keeps BASE, 1 gives TUNED")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        out = interpolate(args.base, args.tuned, args.weight, args.out)
    except AgentOptError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"wrote {out} ({1 - args.weight:g} x {args.base} + {args.weight:g} x {args.tuned})")
    return out


if __name__ == "__main__":
    main()
