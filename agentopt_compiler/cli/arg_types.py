"""Argument types with declared ranges: a value outside them is a usage error naming the option, the range and
the value, before any work starts (argparse prints it as one ``error: argument --x: ...`` line, exit status 2).

    p.add_argument("--threads", type=int_in(1, 1024))
    p.add_argument("--temperature", type=float_in(0.0))            # nan, inf and -1 are refused
    p.add_argument("--top-p", type=float_in(0.0, 1.0, low_open=True))
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def int_in(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (either bound may be None)."""
    wanted = (f"an integer from {low} to {high}" if low is not None and high is not None else
              f"an integer >= {low}" if low is not None else f"an integer <= {high}" if high is not None else
              "an integer")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its own messages
    return parse


def float_in(low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high], or (low, high] with ``low_open`` (either bound may be None)."""
    bounds = [f"{'>' if low_open else '>='} {low:g}" if low is not None else "",
              f"<= {high:g}" if high is not None else ""]
    wanted = " and ".join(filter(None, bounds))
    wanted = f"a finite number {wanted}".strip()

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
        if (not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low))
                or (high is not None and value > high)):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


# Ranges shared by several subcommands.
SEED = int_in(0, 2**63 - 1)  # numpy generators take no negative seeds; rows use seed + row
THREADS = int_in(1, 1024)
PROMPT_LOOKUP = int_in(0, 1024)
TCP_PORT = int_in(0, 65535)  # 0: any free port


def non_empty_text(text: str) -> str:
    """Text of at least one character (an empty model name or stop string would mean nothing; a stop string may be
    whitespace, e.g. a newline)."""
    if not text:
        raise argparse.ArgumentTypeError(f"must be non-empty text, got {text!r}")
    return text


non_empty_text.__name__ = "text"


def non_blank_text(text: str) -> str:
    """Text with something besides whitespace (an API key or a model name of spaces would mean nothing)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must be non-blank text, got {text!r}")
    return text


non_blank_text.__name__ = "text"
