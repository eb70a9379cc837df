"""Output files and folders named on the command line (--json, --out PLAN.json, --report, --debug-dump): checked
before the work that produces them, and written so that a failure leaves nothing half-written.

    check_writable_file(Path("r.json"), "--json")       # before a long evaluation: fails now, not after it
    write_text_atomically(Path("r.json"), text, "--json")   # a temporary file beside it, renamed into place

Checks are real probes (a temporary file is created and removed): permission bits say nothing for root, read-only
mounts or full disks.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import OutputPathError


def _problem(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_writable_folder(folder: Path, option: str) -> None:
    """``folder`` can take new files: it is a writable folder, or the closest folder above it that exists is
    (where it will be created). Nothing is left behind by the check."""
    folder = Path(folder)
    existing = next((p for p in [folder, *folder.absolute().parents] if p.exists()), Path("."))
    if not existing.is_dir():
        raise OutputPathError(f"cannot write {option} '{folder}': '{existing}' is a file, not a folder; choose "
                              f"another {option}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write {option} '{folder}': {_problem(exc)}; choose another {option}") from None


def check_writable_file(path: Path, option: str) -> None:
    """``path`` can be created or replaced: its folder exists and takes a new file, and it is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} '{path}' is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {option} '{path}': folder '{parent}' does not exist; create it or "
                              f"choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise OutputPathError(f"cannot write {option} '{path}': {_problem(exc)}; choose another {option}") from None


def write_text_atomically(path: Path, text: str, option: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place: readers see the old file or the
    whole new one, and a full disk leaves no partial file behind."""
    path = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputPathError(f"cannot write {option} '{path}': {_problem(exc)}; choose another {option}") from None
    try:
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise OutputPathError(f"cannot write {option} '{path}': {_problem(exc)}; choose another {option}") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's file-creation mask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
