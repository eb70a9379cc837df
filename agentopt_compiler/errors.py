"""Errors a user can act on.

Every error the toolkit raises on bad input is an ``AgentOptError``: its message is one line that names the problem
and the fix. The CLI prints it as ``error: <message>`` and exits with status 2; Python callers can catch the subclass.
This module imports nothing heavy, so the deploy side (no torch) can use it.
"""


class AgentOptError(Exception):
    """Base class: a problem with the user's input or environment, with a message that says what to do."""


class ModelNotFoundError(AgentOptError):
    """Unknown built-in model name, or a folder that is not a Hugging Face checkpoint."""


class UnsupportedModelError(AgentOptError):
    """An architecture, RoPE variant or feature the reference decoder does not implement."""


class UnsupportedOpError(AgentOptError):
    """An op in the captured graph that a backend cannot lower."""


class EngineError(AgentOptError):
    """A missing, corrupt, foreign or incompatible engine folder."""


class ContextOverflowError(AgentOptError):
    """A prompt (plus generation) that does not fit the engine's context."""


class ProviderUnavailableError(AgentOptError):
    """An execution provider or device that was asked for but is not available (never a silent CPU fallback)."""


class OutputPathError(AgentOptError):
    """An output folder that cannot be written, or that holds something other than an engine."""
