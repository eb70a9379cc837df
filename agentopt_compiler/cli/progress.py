"""Progress lines on stderr, stamped with the seconds since the command started."""

from __future__ import annotations

import sys
import time


class ProgressLog:
    def __init__(self, quiet: bool = False):
        self.start, self.quiet = time.perf_counter(), quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)
