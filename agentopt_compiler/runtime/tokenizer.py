"""The engine's tokenizer: a Hugging Face ``tokenizer.json`` read with the ``tokenizers`` library (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import AgentOptError, EngineError


class Tokenizer:
    def __init__(self, folder: Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = folder / "tokenizer.json"
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise EngineError(f"cannot read {path}: {exc}") from None
        self._json: str | None = None
        self._added: dict[str, int] | None = None
        config_path = folder / "tokenizer_config.json"
        try:
            self.config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise EngineError(f"cannot read {config_path}: {exc}") from None
        template_path = folder / "chat_template.jinja"
        self.chat_template = (template_path.read_text() if template_path.is_file()
                              else self.config.get("chat_template"))
        if isinstance(self.chat_template, list):  # transformers' named templates: the default one, as it renders
            self.chat_template = next((t.get("template") for t in self.chat_template
                                       if isinstance(t, dict) and t.get("name") == "default"), None)
        if self.chat_template:  # a template that does not parse fails here, not at every request
            from .chat import check_template

            check_template(self.chat_template, template_path if template_path.is_file() else config_path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        _check_unicode(text)
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text`` (no special tokens added)."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self):
        """``step(token_id) -> str | None``: the text a new token adds to the tokens stepped so far (None while a
        multi-byte character is incomplete). tokenizers' DecodeStream: constant work per token, where decoding the
        whole sequence again each step costs O(n)."""
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        return lambda token_id: stream.step(self._tok, token_id)

    def to_json(self) -> str:
        """The tokenizer.json text (what llguidance reads to know each token's bytes)."""
        if self._json is None:
            self._json = self._tok.to_str()
        return self._json

    @property
    def size(self) -> int:
        """Tokens it knows, added ones included (may differ from the model's vocabulary either way)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def added_token_id(self, token: str) -> int | None:
        """The id of ``token`` when it is one of the tokenizer's added tokens (chat and tool tags such as
        ``<tool_call>``, ``</think>``, ``[TOOL_CALLS]``: one token, never split from text)."""
        return self.added_tokens.get(token)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Added tokens' text -> id."""
        if self._added is None:
            self._added = {added.content: i for i, added in self._tok.get_added_tokens_decoder().items()}
        return self._added

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_ids(self) -> list[int]:
        """The tokenizer config's eos token, when it names one that exists."""
        eos = self.config.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        token = self.token_id(eos) if isinstance(eos, str) else None
        return [] if token is None else [token]


def _check_unicode(text: str) -> None:
    """Text with a lone surrogate (bytes that were not UTF-8, kept by Python as \udc80-\udcff, e.g. in a command
    line argument) is not text a tokenizer takes: one AgentOptError saying where, not a TypeError from tokenizers."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AgentOptError(f"the text is not valid Unicode: it holds the lone surrogate {text[exc.start]!r} "
                            "(e.g. from bytes that are not UTF-8); give UTF-8 text") from None
    except AttributeError:
        raise AgentOptError(f"text must be a str, got {type(text).__name__}") from None
