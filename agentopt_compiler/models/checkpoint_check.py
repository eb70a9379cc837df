"""Checks of a checkpoint's safetensors files against its config, from the file headers alone, before any weight
is read.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (per tensor: dtype, shape and the
byte range of its data), then the data. Reading only that header tells whether a file is empty, truncated or not
safetensors at all, and gives every tensor's name and shape, which must equal what the config describes (the
reference decoder built on the meta device: shapes, no memory). So a checkpoint whose weights do not fit its
config.json is refused in milliseconds with the tensor, both shapes and the fix, instead of a torch traceback after
gigabytes were read.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from ..errors import ModelNotFoundError
from .config import ModelConfig

# bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
_FIX = "re-download or re-save the checkpoint (save_pretrained(safe_serialization=True))"


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (dtype, shape) from a safetensors file's header, after checking that the file holds every
    byte the header describes. Raises ModelNotFoundError for empty, truncated or foreign files."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelNotFoundError(f"'{path}' is {'empty' if size == 0 else 'truncated'} ({size} bytes); {_FIX}")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > min(MAX_HEADER_BYTES, size - 8):
            raise ModelNotFoundError(f"'{path}' is not a safetensors file, or is truncated (its header would be "
                                     f"{header_bytes} bytes; the file has {size}); {_FIX}")
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelNotFoundError(f"'{path}' is not a safetensors file (its header is not JSON); {_FIX}") from None
    if not isinstance(header, dict):
        raise ModelNotFoundError(f"'{path}' is not a safetensors file (its header is not a JSON object); {_FIX}")
    tensors, data_end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (info.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(
            info, dict) else (None, None, None)
        if (dtype not in DTYPE_BYTES or not isinstance(shape, list)
                or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)
                or offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]):
            raise ModelNotFoundError(f"'{path}' has a malformed header entry for tensor '{name}'; {_FIX}")
        tensors[name] = (dtype, tuple(shape))
        data_end = max(data_end, offsets[1])
    held = size - 8 - header_bytes
    if data_end > held:
        raise ModelNotFoundError(f"'{path}' is truncated: its header describes {data_end} bytes of tensor data, "
                                 f"the file holds {held}; {_FIX}")
    return tensors


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the reference decoder for ``config`` (built on the meta device: no memory);
    a tied ``lm_head.weight`` is left out (the embedding is its weight)."""
    import torch

    from .llama import LlamaDecoder

    with torch.device("meta"):
        model = LlamaDecoder(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def check_checkpoint(folder: Path, config: ModelConfig) -> None:
    """Every safetensors file of ``folder`` is whole, and together they hold exactly the float tensors ``config``
    needs, in its shapes (a tied checkpoint may also carry ``lm_head.weight``)."""
    from .hf_loader import hf_weight_name, is_leftover_tensor, safetensors_files

    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    where: dict[str, Path] = {}
    for path in safetensors_files(folder):
        for name, entry in read_header(path).items():
            if is_leftover_tensor(name):
                continue
            if hf_weight_name(name) in found:  # two shards with one tensor: which one holds the weight?
                raise ModelNotFoundError(f"'{folder}': tensor '{name}' is in both {where[hf_weight_name(name)].name} "
                                         f"and {path.name}; {_FIX}")
            found[hf_weight_name(name)], where[hf_weight_name(name)] = entry, path
    if config.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # equal to the embedding, or refused when loaded (check_tied_head)
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ModelNotFoundError(
            f"weights in '{folder}' do not fit its config.json: missing {missing[:4]}, unexpected {unexpected[:4]}; "
            f"use the config.json the weights were saved with"
        )
    wrong = [(name, found[name][1], shape) for name, shape in expected.items() if found[name][1] != shape]
    if wrong:
        name, got, want = wrong[0]
        raise ModelNotFoundError(
            f"weights in '{folder}' do not fit its config.json: {name} has shape {list(got)}, the config needs "
            f"{list(want)}{f' ({len(wrong)} tensors differ)' if len(wrong) > 1 else ''}; use the config.json the "
            "weights were saved with"
        )
    check_float_weights(found, folder)


def check_float_weights(found: dict[str, tuple[str, tuple[int, ...]]], folder: Path) -> None:
    """Weights (name -> (dtype, shape), as ``read_header`` gives them) are floats: integer tensors are a quantized
    checkpoint's, which a float model would load as garbage."""
    not_float = sorted({dtype for dtype, _ in found.values() if dtype not in FLOAT_DTYPES})
    if not_float:
        raise ModelNotFoundError(f"weights in '{folder}' are stored as {', '.join(not_float)}; only float weights "
                                 f"({', '.join(FLOAT_DTYPES)}) load (quantized checkpoints are not supported: "
                                 "quantize with agentopt plan precision instead)")


def check_finite(named_tensors, folder: Path) -> None:
    """Every weight is a finite number: a NaN or infinity would give NaN logits, so empty or garbage text, with no
    error at all."""
    import torch

    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelNotFoundError(f"weights in '{folder}': tensor '{name}' holds {bad} NaN or infinite value(s) "
                                     "(a diverged or damaged checkpoint); use a checkpoint saved before it diverged")


def check_tied_head(state: dict, config: ModelConfig, folder: Path) -> None:
    """A config that ties the output head to the embedding, with a different ``lm_head.weight`` in the file: which
    one is meant? (transformers 4 ties and drops the tensor, transformers 5 keeps it untied.) Refused."""
    import torch

    head, embed = state.get("lm_head.weight"), state.get("embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and embed is not None and not torch.equal(head, embed):
        raise ModelNotFoundError(f"'{folder}': config.json ties the output head to the embedding "
                                 "(tie_word_embeddings: true), and the weights hold a different lm_head.weight; set "
                                 "tie_word_embeddings to false to use it, or remove it from the weights")
