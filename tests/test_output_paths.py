"""What compiles and commands leave on disk when writing fails: a full disk while the engine is written, a debug
dump that cannot be written, a file replaced atomically, and the staging folders of killed compiles, which the
next compile of the same output removes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from agentopt_compiler.backends.onnxruntime import lower
from agentopt_compiler.compiler import remove_stale_staging
from agentopt_compiler.errors import OutputPathError
from agentopt_compiler.output_paths import check_writable_file, check_writable_folder, write_text_atomically
from tests.helpers import cli_error_line, tree

DEAD_PID = 2**22 + 12345  # above Linux's pid_max default (4194304): no such process


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _leftovers(parent: Path, name: str) -> dict[str, Path]:
    made = {"tmp": parent / f".{name}.tmp-{DEAD_PID}-abc123", "old": parent / f".{name}.old-{DEAD_PID}",
            "rebuild": parent / f".{name}.rebuild-{DEAD_PID}-x", "legacy": parent / f".{name}.tmp-k3j4h5g6"}
    for folder in made.values():
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"\0" * 1024)
    made["manifest"] = parent / f".{name}.manifest-{DEAD_PID}.tmp"
    made["manifest"].write_text("{}")
    return made


def test_a_full_disk_leaves_nothing_and_killed_compiles_are_cleaned(tmp_path, capsys, monkeypatch):
    stale = _leftovers(tmp_path, "engine")
    alive = tmp_path / f".engine.tmp-{os.getpid()}-mine"  # a compile still running (this process): kept
    other = tmp_path / f".other.tmp-{DEAD_PID}-abc"  # another output's leftovers: not ours to remove
    alive.mkdir()
    other.mkdir()

    def lower_onto_a_full_disk(program, folder, **options):  # half a graph written, then the disk is full
        (folder / "model.onnx").write_bytes(b"\0" * 4096)
        _full_disk()

    monkeypatch.setattr(lower, "lower_to_onnx", lower_onto_a_full_disk)
    line = cli_error_line(capsys, ["compile", "--model", "tiny-random", "--out", str(tmp_path / "engine"),
                                   "--context-length", "16", "--quiet"])
    assert "cannot write the engine" in line and "No space left on device" in line
    assert not any(path.exists() for path in stale.values())
    assert tree(tmp_path) == {alive.name, other.name}  # no engine, no staging folder of this compile


def test_remove_stale_staging_keeps_live_and_foreign_folders(tmp_path):
    stale = _leftovers(tmp_path, "eng")
    live = tmp_path / ".eng.tmp-1-x"  # pid 1 always exists
    live.mkdir()
    (tmp_path / "eng").mkdir()
    removed = remove_stale_staging(tmp_path / "eng")
    assert sorted(removed) == sorted(stale.values())
    assert tree(tmp_path) == {"eng", live.name}


def test_a_debug_dump_that_fails_mid_compile_is_one_error(tmp_path, capsys, monkeypatch):
    dump = tmp_path / "dump"
    real_write_text = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.parent == dump:
            _full_disk()
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    line = cli_error_line(capsys, ["compile", "--model", "tiny-random", "--out", str(tmp_path / "engine"),
                                   "--context-length", "16", "--quiet", "--debug-dump", str(dump)])
    assert "cannot write the debug dump" in line and "No space left" in line
    assert not (tmp_path / "engine").exists()


def test_writing_atomically(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_text_atomically(target, "first", "--json")
    assert target.read_text() == "first" and oct(target.stat().st_mode & 0o777) != "0o600"
    monkeypatch.setattr(os, "replace", _full_disk)
    with pytest.raises(OutputPathError, match="cannot write --json .* No space left"):
        write_text_atomically(target, "second", "--json")
    assert target.read_text() == "first" and tree(tmp_path) == {"report.json"}  # no temporary file left
    with pytest.raises(OutputPathError, match="cannot write --json"):
        write_text_atomically(tmp_path / "missing" / "r.json", "x", "--json")


def test_writability_checks_leave_nothing(tmp_path):
    check_writable_folder(tmp_path / "new" / "dump", "--debug-dump")
    check_writable_file(tmp_path / "plan.json", "--out")
    assert tree(tmp_path) == set()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        check_writable_folder(tmp_path / "file" / "dump", "--debug-dump")
    with pytest.raises(OutputPathError, match="is a folder"):
        check_writable_file(tmp_path, "--json")
