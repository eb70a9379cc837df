"""Chat templates: render a conversation (OpenAI-style messages, optional tools) to the model's prompt text.

The template comes from the engine's tokenizer files (``chat_template.jinja`` or ``tokenizer_config.json``), as in
Hugging Face, and is rendered with a sandboxed jinja2 environment with the same helpers HF templates expect
(``raise_exception``, ``tojson``, ``bos_token``/``eos_token``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from ..errors import AgentOptError, EngineError


class ChatTemplateError(AgentOptError):
    """The template refused the conversation (e.g. roles out of order)."""


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def _special(config: dict, key: str) -> str:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value or ""


def render_chat(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> str:
    """Prompt text for ``messages``; ``tools`` are OpenAI-style tool schemas offered to the model."""
    if tokenizer is None or not tokenizer.chat_template:
        raise EngineError("this engine's tokenizer has no chat template; chat and agent use need one (add "
                          "chat_template to tokenizer_config.json of the checkpoint and recompile)")
    template = _compile(tokenizer.chat_template)
    return template.render(messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                           bos_token=_special(tokenizer.config, "bos_token"),
                           eos_token=_special(tokenizer.config, "eos_token"))
