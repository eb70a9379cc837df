"""Calibration tokens for planners: from a text file through the model's tokenizer, or seeded random token ids
(for models with random weights, which have no meaningful text)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import AgentOptError


def calibration_batches(loaded, calib: str | Path | None = None, sequences: int = 4,
                        length: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """``sequences`` rows of ``length`` tokens each, as (1, length) id tensors."""
    if calib is None:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(0, loaded.config.vocab_size, (1, length), generator=generator)
                for _ in range(sequences)]
    path = Path(calib)
    if not path.is_file():
        raise AgentOptError(f"calibration file '{path}' does not exist")
    if loaded.tokenizer_dir is None:
        raise AgentOptError("this model has no tokenizer, so a text calibration file cannot be used")
    from ..runtime.tokenizer import Tokenizer

    ids = Tokenizer(Path(loaded.tokenizer_dir)).encode(path.read_text())
    if len(ids) < length:
        raise AgentOptError(f"calibration file '{path}' has {len(ids)} tokens; at least {length} are needed")
    rows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:sequences]
    return [torch.tensor([row]) for row in rows]
