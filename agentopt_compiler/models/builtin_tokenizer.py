"""The tokenizer shipped with built-in random-weight models: byte-level, no merges, ChatML-style special tokens.

Every UTF-8 string round-trips through it, so text prompts work on models that were never trained. Ids 0-255 are the
bytes (in GPT-2's byte-to-unicode order); the special tokens follow.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>")
EOS_TOKEN = "<|im_end|>"

# ChatML with Hermes/Qwen-style tools: schemas in the system turn, calls as <tool_call>{json}</tool_call>, results as
# "tool" turns. Rendered by jinja2 in the runtime (runtime/chat.py); tool-call arguments arrive as JSON objects.
CHAT_TEMPLATE = """\
{%- if tools or messages[0].role == 'system' -%}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}
{%- if tools %}{% if messages[0].role == 'system' %}

{% endif %}# Tools
Call a tool by answering with <tool_call>{"name": <tool name>, "arguments": <JSON object>}</tool_call>.
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
{%- endif %}<|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{%- if not loop.first %}{{ raise_exception('a system message must come first') }}{% endif -%}
{%- elif message.role == 'assistant' -%}
<|im_start|>assistant
{{ message.content or '' }}
{%- for call in message.tool_calls or [] -%}
<tool_call>{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}</tool_call>
{%- endfor %}<|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
"""


def byte_level_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    # order by the byte each character stands for, so id == byte value
    by_byte = sorted(alphabet, key=_byte_of)
    vocab = {ch: i for i, ch in enumerate(by_byte)}
    for j, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + j
    return vocab


def _byte_of(ch: str) -> int:
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to 256 + k in byte order
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def write_builtin_tokenizer(folder: Path) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json (with the chat template) into ``folder``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = byte_level_vocab()
    tok = Tokenizer(models.BPE(vocab={k: v for k, v in vocab.items() if k not in SPECIAL_TOKENS}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": CHAT_TEMPLATE, "eos_token": EOS_TOKEN, "bos_token": None,
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return [folder / "tokenizer.json", folder / "tokenizer_config.json"]
