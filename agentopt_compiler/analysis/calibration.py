"""Calibration tokens for planners: from a text file through the model's tokenizer, from chat conversations
(with the positions that predict assistant tokens), or seeded random token ids (for models with random weights,
which have no meaningful text)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import AgentOptError
from ..validation import read_text

CALIBRATION_BYTES_PER_TOKEN = 64  # of text read per token needed: generous (BPE tokens average about 4 bytes)


def calibration_batches(loaded, calib: str | Path | None = None, sequences: int = 4,
                        length: int = 128, seed: int = 0) -> list[torch.Tensor]:
    """``sequences`` rows of ``length`` tokens each, as (1, length) id tensors."""
    if calib is None:
        generator = torch.Generator().manual_seed(seed)
        return [torch.randint(0, loaded.config.vocab_size, (1, length), generator=generator)
                for _ in range(sequences)]
    path = Path(calib)
    if loaded.tokenizer_dir is None:
        raise AgentOptError("this model has no tokenizer, so a text calibration file cannot be used")
    from ..runtime.tokenizer import Tokenizer

    # only the start of a large file: a token takes at most a few bytes of text, so this holds the tokens needed
    text = read_text(path, "calibration file", "give a UTF-8 text file",
                     max_bytes=max(1 << 20, sequences * length * CALIBRATION_BYTES_PER_TOKEN))
    ids = Tokenizer(Path(loaded.tokenizer_dir)).encode(text)
    if len(ids) < length:
        raise AgentOptError(f"calibration file '{path}' has {len(ids)} tokens; at least {length} are needed")
    rows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:sequences]
    return [torch.tensor([row]) for row in rows]


def chat_calibration(loaded, path: str | Path, sequences: int = 4, length: int = 512,
                     min_length: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Conversations from a JSON-lines file (each line ``{"messages": [...], "tools": [...]}`` or a list of
    messages), rendered with the model's chat template: the first ``sequences`` of at least ``min_length`` tokens,
    each cut to ``length`` tokens, and per row a (1, S) mask of the positions whose next token belongs to an
    assistant message (what a planner should protect: the model's own tool calls and answers)."""
    from ..runtime.chat import render_chat
    from ..runtime.tokenizer import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise AgentOptError(f"chat calibration file '{path}' does not exist")
    if loaded.tokenizer_dir is None:
        raise AgentOptError("this model has no tokenizer, so chat calibration cannot be used")
    tokenizer = Tokenizer(Path(loaded.tokenizer_dir))
    batches, masks = [], []
    text = read_text(path, "chat calibration file", "give UTF-8 JSON lines, one conversation per line")
    for number, line in enumerate(text.splitlines(), 1):
        if len(batches) == sequences:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AgentOptError(f"{path}, line {number}: not JSON ({exc.msg}); write one conversation per line, "
                                'e.g. {"messages": [{"role": "user", "content": "..."}, ...]}') from None
        messages, tools = (record, None) if isinstance(record, list) else (
            (record.get("messages"), record.get("tools")) if isinstance(record, dict) else (None, None))
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise AgentOptError(f"{path}, line {number}: expected a list of messages with roles, or an object with "
                                f"one under \"messages\"")
        ids, assistant = _assistant_tokens(render_chat, tokenizer, messages, tools, f"{path}, line {number}")
        if len(ids) < min_length:
            continue
        ids, assistant = ids[:length], assistant[:length + 1]
        batches.append(torch.tensor([ids]))
        masks.append(torch.tensor([assistant[1:len(ids) + 1] + [False] * (len(ids) + 1 - len(assistant))]))
    return batches, masks


def _assistant_tokens(render_chat, tokenizer, messages, tools, where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it lies in an assistant message: the text
    between the prompt for that message (the conversation before it, with the generation prompt) and the
    conversation rendered up to and including it (for ChatML: the content, ``<|im_end|>`` and a newline)."""
    text = render_chat(tokenizer, messages, tools, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:index], tools, add_generation_prompt=True)
        through = render_chat(tokenizer, messages[:index + 1], tools, add_generation_prompt=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise AgentOptError(f"{where}: the chat template does not render this conversation message by message "
                                "(an earlier part changes when later messages are added), so assistant tokens "
                                "cannot be located; use --calib with plain text instead")
        spans.append((len(before), len(through)))
    ids, offsets = tokenizer.encode_with_offsets(text)
    return ids, [any(start <= begin < end for start, end in spans) for begin, _ in offsets]
