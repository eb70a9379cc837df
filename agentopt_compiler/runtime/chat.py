"""Chat templates: render a conversation (OpenAI-style messages, optional tools) to the model's prompt text.

The template comes from the engine's tokenizer files (``chat_template.jinja`` or ``tokenizer_config.json``), as in
Hugging Face, and is rendered as transformers' ``apply_chat_template`` renders it: a sandboxed jinja2 environment
with the helpers real templates call (``raise_exception``, ``strftime_now`` (Llama 3.1's date line), ``tojson`` with
``indent``/``separators``/``sort_keys``, ``bos_token``/``eos_token``), and any extra variables a template reads
(``enable_thinking`` for Qwen3, ``documents``...) passed through. Tests compare the text with transformers' own
rendering for each family's style of template.
"""

from __future__ import annotations

import json
from datetime import datetime
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
    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # not jinja's own tojson, which escapes HTML characters; transformers' signature
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def check_template(template, source) -> None:
    """Raise EngineError naming ``source`` when ``template`` is not a jinja template that compiles."""
    from jinja2 import TemplateSyntaxError

    if not isinstance(template, str):
        raise EngineError(f"the chat template in {source} is a {type(template).__name__}, not a template string")
    try:
        _compile(template)
    except TemplateSyntaxError as exc:
        raise EngineError(f"the chat template in {source} does not parse (template line {exc.lineno}: "
                          f"{exc.message}); fix it in the checkpoint and recompile") from None


def _special(config: dict, key: str) -> str:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value or ""


def render_chat(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                add_generation_prompt: bool = True, **variables: Any) -> str:
    """Prompt text for ``messages``; ``tools`` are OpenAI-style tool schemas offered to the model; ``variables``
    are extra template variables (e.g. ``enable_thinking=False`` for Qwen3)."""
    if tokenizer is None:
        raise EngineError("this engine has no tokenizer (its checkpoint had no tokenizer.json); chat and agent use "
                          "need one: put the checkpoint's tokenizer.json and tokenizer_config.json in its folder and "
                          "recompile")
    if not tokenizer.chat_template:
        raise EngineError("this engine's tokenizer has no chat template; chat and agent use need one (add "
                          "chat_template to tokenizer_config.json of the checkpoint and recompile)")
    from jinja2 import TemplateError

    template = _compile(tokenizer.chat_template)
    try:
        return template.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt,
                               bos_token=_special(tokenizer.config, "bos_token"),
                               eos_token=_special(tokenizer.config, "eos_token"), **variables)
    except ChatTemplateError:
        raise
    except (TemplateError, TypeError, ValueError, AttributeError, KeyError) as exc:  # a value of a type it did not expect
        raise ChatTemplateError(f"the chat template could not render this conversation ({type(exc).__name__}: "
                                f"{exc}); check the messages' shape and any template variables") from None
