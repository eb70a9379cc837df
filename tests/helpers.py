"""Assertions shared by the tests of bad input: the CLI run in-process must end in exactly one ``error:`` line,
exit status 2, no traceback, and nothing left on disk.

Imported as ``tests.helpers`` (pyproject's pytest ``pythonpath`` puts the repository root on sys.path, so this
works under plain ``pytest`` as well as ``python -m pytest``).
"""

from __future__ import annotations

from pathlib import Path


def cli_error_line(capsys, argv, status: int = 2) -> str:
    """Run the CLI in-process; assert it failed with ``status``, exactly one ``error:`` line and no traceback;
    return that line."""
    from agentopt_compiler.cli.main import main

    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == status, (argv, code, err)
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), (argv, err)
    return errors[0]


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (hidden ones included), relative: to assert a failed command left nothing."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}
