"""Model registry: built-in models by name, and Hugging Face folders by path, resolved to one ``LoadedModel``.

Built-in models have seeded random weights: they prove parity and measure speed, not usefulness.
"""

from __future__ import annotations

import difflib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AgentOptError, ModelNotFoundError, UnsupportedModelError
from .config import ModelConfig


@dataclass(frozen=True)
class BuiltinModel:
    config: ModelConfig | None  # None: read from the shipped folder's config.json
    description: str
    seed: int = 0
    shipped: str | None = None  # folder inside the package with trained weights and tokenizer


SHIPPED_MODELS = Path(__file__).parent


# Special-token ids of the built-in byte tokenizer (see builtin_tokenizer.py): 256 <|endoftext|> ... 258 <|im_end|>.
_BYTE_TOKENIZER_EOS = (256, 258)

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny-random": BuiltinModel(
        ModelConfig(family="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=256,
                    eos_token_ids=_BYTE_TOKENIZER_EOS),
        "2 layers, hidden 64, 4 heads / 2 KV heads of dim 32, vocab 320: for fast tests",
    ),
    "agent-tiny": BuiltinModel(
        None, "a ~4.6M-parameter agent model trained here on generated tool-use episodes (see its MODEL_CARD.md)",
        shipped="agent_tiny",
    ),
    "ref-60m": BuiltinModel(
        ModelConfig(family="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
                    num_heads=8, num_kv_heads=2, max_position_embeddings=4096, eos_token_ids=_BYTE_TOKENIZER_EOS),
        "8 layers, hidden 512, 8 heads / 2 KV heads, vocab 32000 (57M parameters): for benchmarks",
    ),
}


@dataclass
class LoadedModel:
    """An eager reference model, ready to capture, and the files its engine needs at run time."""

    name: str
    model: object  # LlamaDecoder (typed loosely so this module imports without torch)
    config: ModelConfig
    tokenizer_dir: Path | None  # folder holding tokenizer.json etc., or None when the checkpoint has none
    source: str  # "builtin" or the checkpoint folder
    _tmp: object = field(default=None, repr=False)  # keeps a temporary tokenizer folder alive
    capture: str = "reference"  # the module captured: "reference" (models/llama.py) or "transformers"
    capture_note: str = ""  # why that module, when the caller did not choose it (auto)
    checkpoint_dtype: str = "float32"  # the weights as stored ("bfloat16", ...); the compile reports what it made
    checkpoint_bytes: int = 0  # of the stored weights; 0 for built-in models


def init_random_weights(model, seed: int) -> None:
    """Seeded weights with unit-scale activations: N(0, 1/fan_in) linears, N(0, 1) embeddings, unit norms.

    Logits then spread over a few units, so greedy argmax is far from ties and parity tests are meaningful.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0, generator=gen)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=gen)


def build_model(config: ModelConfig, seed: int = 0):
    from .llama import LlamaDecoder

    model = LlamaDecoder(config)
    init_random_weights(model, seed)
    return model.eval()


CAPTURES = ("auto", "reference", "transformers")


def load_model(spec: str | Path, capture: str = "auto") -> LoadedModel:
    """Resolve a built-in name or a local Hugging Face folder to an eager model in fp32.

    ``capture`` picks the module: ``reference`` (our decoder, models/llama.py: Llama, Qwen2, Mistral),
    ``transformers`` (the checkpoint's own transformers module, models/transformers_decoder.py: any decoder whose
    attention the passes fuse), or ``auto``: the reference module where it implements the checkpoint, else
    transformers (the compile report says which ran and why).
    """
    from .builtin_tokenizer import write_builtin_tokenizer

    if capture not in CAPTURES:
        raise AgentOptError(f"unknown capture '{capture}'; choose one of: {', '.join(CAPTURES)}")
    name = str(spec)
    if not name.strip():
        raise ModelNotFoundError(f"no model given; name a built-in ({', '.join(BUILTIN_MODELS)}) or a Hugging Face "
                                 "checkpoint folder")
    if name in BUILTIN_MODELS and BUILTIN_MODELS[name].shipped:
        loaded = _load_shipped(name, SHIPPED_MODELS / BUILTIN_MODELS[name].shipped)
    elif name in BUILTIN_MODELS:
        entry = BUILTIN_MODELS[name]
        tmp = tempfile.TemporaryDirectory(prefix="agentopt-tok-")
        write_builtin_tokenizer(Path(tmp.name))
        loaded = LoadedModel(name, build_model(entry.config, entry.seed), entry.config, Path(tmp.name), "builtin",
                             tmp)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            near = difflib.get_close_matches(name.lower().replace("_", "-"), BUILTIN_MODELS, n=1, cutoff=0.75)
            raise ModelNotFoundError(
                f"unknown model '{name}': not a built-in ({', '.join(BUILTIN_MODELS)}) and no such folder"
                + (f"; did you mean '{near[0]}'?" if near else "")
            )
        if _is_trained_folder(path):  # a folder agent_tiny.train wrote: loaded as the shipped agent-tiny is
            loaded = _load_shipped(path.name, path)
        else:
            return _load_hf_folder_as(path, capture)
    if capture == "transformers":  # a built-in through transformers: saved as a checkpoint folder first
        return _builtin_through_transformers(loaded)
    return loaded


def _load_hf_folder_as(folder: Path, capture: str) -> LoadedModel:
    if capture == "transformers":
        return _load_with_transformers(folder, "")
    try:
        return _load_hf_folder(folder)
    except UnsupportedModelError as reason:
        if capture == "reference":
            raise UnsupportedModelError(f"{reason} (by the reference module, which --capture reference asks for); "
                                        "capture it from its transformers module instead: --capture transformers, "
                                        "or --capture auto") from None
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UnsupportedModelError(f"{reason}; other architectures are captured from transformers, which is not "
                                        "installed: pip install 'agentopt-compiler[transformers]'") from None
        try:
            return _load_with_transformers(folder, f"the reference module does not implement it: {reason}")
        except UnsupportedModelError as other:
            raise UnsupportedModelError(f"{reason}; nor can it be captured from transformers: {other}") from None


def _load_with_transformers(folder: Path, why: str) -> LoadedModel:
    """The checkpoint's transformers module; ``why`` says why (empty when asked for)."""
    from .hf_loader import with_generation_stop_tokens
    from .transformers_decoder import load_transformers_model

    model, config = load_transformers_model(folder)
    config = with_generation_stop_tokens(config, folder)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    dtype, size = stored_weights(folder)
    return LoadedModel(folder.name, model, config, folder if has_tokenizer else None, str(folder.resolve()),
                       capture="transformers", capture_note=why, checkpoint_dtype=dtype, checkpoint_bytes=size)


def _builtin_through_transformers(loaded: LoadedModel) -> LoadedModel:
    from .hf_loader import save_as_hf_folder

    tmp = tempfile.TemporaryDirectory(prefix="agentopt-hf-")
    folder = save_as_hf_folder(loaded.model, Path(tmp.name) / loaded.name, loaded.tokenizer_dir)
    result = _load_with_transformers(folder, "")
    result.name, result.source, result._tmp, result.checkpoint_bytes = loaded.name, loaded.source, tmp, 0
    return result


def _is_trained_folder(path: Path) -> bool:
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("format") == "agentopt-builtin"
    except (OSError, ValueError, AttributeError, RecursionError):  # the checkpoint loader reports what is wrong
        return False


def _load_shipped(name: str, folder: Path) -> LoadedModel:
    """A trained built-in model shipped in the package: config.json, model.safetensors and its tokenizer."""
    import json

    from safetensors.torch import load_file

    from .llama import LlamaDecoder

    if not (folder / "model.safetensors").is_file():
        raise ModelNotFoundError(f"built-in model '{name}' has no weights at {folder}; reinstall agentopt-compiler "
                                 "or train it with python -m agentopt_compiler.agent_tiny.train")
    config = ModelConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = LlamaDecoder(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return LoadedModel(name, model.eval(), config, folder, "builtin")


def _load_hf_folder(folder: Path) -> LoadedModel:
    from .checkpoint_check import check_checkpoint, check_tied_head
    from .hf_loader import load_hf_state_dict, read_hf_config
    from .llama import LlamaDecoder

    config = read_hf_config(folder)
    check_checkpoint(folder, config)  # from the file headers: whole files, the config's shapes; nothing loaded yet
    state = load_hf_state_dict(folder)
    check_tied_head(state, config, folder)
    model = LlamaDecoder(config)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelNotFoundError(
            f"weights in '{folder}' do not fit its config.json: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    model.load_state_dict(state, strict=False)
    has_tokenizer = (folder / "tokenizer.json").is_file()
    dtype, size = stored_weights(folder)
    return LoadedModel(folder.name, model.eval(), config, folder if has_tokenizer else None, str(folder.resolve()),
                       checkpoint_dtype=dtype, checkpoint_bytes=size)


_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def stored_weights(folder: Path) -> tuple[str, int]:
    """The dtype(s) and bytes of a checkpoint's weights, from the safetensors headers (nothing loaded)."""
    from .checkpoint_check import DTYPE_BYTES, read_header
    from .hf_loader import is_leftover_tensor, safetensors_files

    dtypes, size = set(), 0
    for path in safetensors_files(folder):
        for name, (dtype, shape) in read_header(path).items():
            if not is_leftover_tensor(name):
                dtypes.add(_DTYPE_NAMES.get(dtype, dtype.lower()))
                size += DTYPE_BYTES[dtype] * math.prod(shape)
    return "+".join(sorted(dtypes)) or "float32", size
