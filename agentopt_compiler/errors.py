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


# which install brings a package that a command may find missing (pyproject.toml's optional dependencies)
EXTRA_OF_PACKAGE = {
    **dict.fromkeys(("torch", "onnx", "onnxscript", "onnx_ir", "networkx", "safetensors"), "compile"),
    **dict.fromkeys(("fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client"), "serve"),
    "ray": "ray", "transformers": "transformers", "tensorrt": "tensorrt", "matplotlib": "plot",
}


def missing_package_error(exc: ImportError, what: str) -> AgentOptError | None:
    """The error for ``what`` (e.g. "agentopt compile") when ``exc`` is a package of an optional install that is
    not installed: names the package and the install that brings it. None for any other import failure."""
    package = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_PACKAGE.get(package)
    if extra is None:
        return None
    hint = " (torch==2.13.0 first, for the CPU build)" if extra == "compile" else ""
    return AgentOptError(f"{what} needs {package}, which is not installed: pip install "
                         f"'agentopt-compiler[{extra}]'{hint}, or from a clone: pip install -e '.[{extra}]'")


def require_compile_packages(what: str) -> None:
    """Refuse ``what`` at once, naming the install, where the compile side's packages are missing (the deploy
    install has none of them)."""
    for package in (name for name, extra in EXTRA_OF_PACKAGE.items() if extra == "compile"):
        try:
            __import__(package)
        except ImportError as exc:
            exc.name = exc.name or package
            raise missing_package_error(exc, what) from None
