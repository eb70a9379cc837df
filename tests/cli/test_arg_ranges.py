"""Fuzzing the command line: numeric options outside their declared ranges, unwritable output paths, the
top-level handler (internal errors, --debug, closed pipes) and interactive input that is not text. Bad input ends
in exit status 2, one ``error:`` line and no traceback; nothing is written."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from agentopt_compiler.cli.main import main
from tests.helpers import cli_error_line, tree

NAN, INF = "nan", "inf"
# (command line before the option, option, values that must be refused)
OUT_OF_RANGE = [
    (["compile", "--out", "E"], "--context-length", ["0", "1", "2", "-5", "abc", "2.5", str(2**21), "1e3"]),
    (["compile", "--out", "E"], "--batch-size", ["0", "-1", "100000", "x"]),
    (["plan", "precision", "--out", "P.json"], "--max-kl", ["-1", NAN, INF, "x"]),
    (["plan", "precision", "--out", "P.json"], "--target-bits", ["0", "-2", "33", NAN]),
    (["plan", "precision", "--out", "P.json"], "--min-top1", ["-0.1", "1.5", NAN]),
    (["plan", "precision", "--out", "P.json", "--max-kl", "1"], "--block-size", ["48", "0", "x"]),
    (["plan", "precision", "--out", "P.json", "--max-kl", "1"], "--sequences", ["0", "-1"]),
    (["plan", "precision", "--out", "P.json", "--max-kl", "1"], "--length", ["0", "1"]),
    (["plan", "sparse", "--out", "P.json", "--max-kl", "1"], "--window", ["0", "-1", "w"]),
    (["plan", "sparse", "--out", "P.json", "--window", "8"], "--max-kl", ["-1", NAN]),
    (["plan", "sparse", "--out", "P.json", "--window", "8", "--max-kl", "1"], "--sinks", ["-1"]),
    (["plan", "sparse", "--out", "P.json", "--window", "8", "--max-kl", "1"], "--stride", ["-1"]),
    (["plan", "sparse", "--out", "P.json", "--window", "8", "--max-kl", "1"], "--context-length", ["0", "1"]),
    (["run", "E", "--prompt", "x"], "--max-new-tokens", ["0", "-1"]),
    (["run", "E", "--prompt", "x"], "--temperature", [NAN, "-1", INF, "hot"]),
    (["run", "E", "--prompt", "x"], "--top-k", ["-1"]),
    (["run", "E", "--prompt", "x"], "--top-p", ["0", "1.5", NAN]),
    (["run", "E", "--prompt", "x"], "--seed", ["-1", "x"]),
    (["run", "E", "--prompt", "x"], "--prompt-lookup", ["-1", "5000"]),
    (["run", "E", "--prompt", "x"], "--threads", ["0", "-4", "5000"]),
    (["run", "E", "--task", "x"], "--max-steps", ["0", "-1"]),
    (["eval", "E"], "--tasks", ["0", "-3"]),
    (["eval", "E"], "--minutes", ["0", "-1", NAN]),
    (["eval", "E"], "--threads", ["0"]),
    (["eval", "E"], "--seed", ["-1"]),
    (["serve", "E"], "--port", ["99999", "-1", "http"]),
    (["rebuild", "E"], "--workspace-gib", ["0", "-1", NAN]),
    (["run", "E", "--prompt", "x"], "--stop", [""]),  # empty text (a stop string of "\n" is fine)
    (["serve", "E"], "--model-name", ["", "  "]),
    (["serve", "E"], "--api-key", ["", " "]),  # "$UNSET_VAR" would otherwise turn authentication off
    (["run", "E", "--task", "x"], "--tool-timeout", ["0", "-1", "1e10", NAN]),
]


def test_numeric_options_out_of_range_are_usage_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    count = 0
    for prefix, option, values in OUT_OF_RANGE:
        for value in values:
            line = cli_error_line(capsys, prefix + [option, value])
            assert f"argument {option}:" in line and "--help" in line, line
            count += 1
    assert count >= 79 and tree(tmp_path) == set()


def test_options_that_would_mean_nothing_are_refused(tiny_engine_dir, capsys):
    line = cli_error_line(capsys, ["run", str(tiny_engine_dir), "--prompt", "x", "--regex", ""])
    assert "--regex '' would allow only an empty output" in line
    line = cli_error_line(capsys, ["eval", str(tiny_engine_dir), "--set", "handwritten", "--tasks", "5"])
    assert "--tasks counts generator tasks" in line and "add --set generator" in line


def test_usage_errors_are_one_line(capsys):
    for argv in (["bogus"], [], ["compile"], ["run"], ["compile", "--out", "E", "--device", "tpu"],
                 ["run", "E", "--prompt", "a", "--task", "b"], ["inspect", "E", "--colour"]):
        cli_error_line(capsys, argv)


def test_a_context_larger_than_memory_is_refused_before_allocating(tmp_path, capsys, monkeypatch):
    from agentopt_compiler import compiler

    monkeypatch.setattr(compiler, "physical_memory_bytes", lambda: 64 << 20)  # 64 MiB
    line = cli_error_line(capsys, ["compile", "--model", "tiny-random", "--out", str(tmp_path / "e"),
                                   "--context-length", "1048576", "--quiet"])
    assert "GiB of KV cache" in line and "at most 32768" in line  # tiny-random: 1 KiB of fp32 K+V per token
    assert tree(tmp_path) == set()


def test_unwritable_outputs_are_refused_before_the_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    blocked = str(tmp_path / "file" / "sub")
    cases = [(["eval", str(tmp_path / "no-engine"), "--json", blocked + "/r.json"], "--json"),
             (["eval", str(tmp_path / "no-engine"), "--json", str(tmp_path)], "--json"),
             (["plan", "precision", "--max-kl", "1", "--out", blocked + "/p.json"], "--out"),
             (["plan", "precision", "--max-kl", "1", "--out", str(tmp_path / "p.json"), "--report", blocked],
              "--report"),
             (["plan", "sparse", "--window", "8", "--max-kl", "1", "--out", str(tmp_path / "missing" / "p.json")],
              "--out"),
             (["compile", "--model", "tiny-random", "--out", str(tmp_path / "e"), "--debug-dump", blocked],
              "--debug-dump")]
    for argv, option in cases:
        assert option in cli_error_line(capsys, argv)
    assert tree(tmp_path) == {"file"}


def test_an_internal_error_is_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    from agentopt_compiler.cli import inspect_cmd

    def broken(args):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(inspect_cmd, "run", broken)
    line = cli_error_line(capsys, ["inspect", "E"], status=1)
    assert "internal error (RuntimeError: a bug over two lines)" in line and "--debug" in line
    assert main(["inspect", "E", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "raise RuntimeError" in err and "the traceback is above" in err


def test_os_errors_name_the_file(capsys, monkeypatch):
    from agentopt_compiler.cli import inspect_cmd

    def unreadable(args):
        raise PermissionError(13, "Permission denied", "E/model.onnx")

    monkeypatch.setattr(inspect_cmd, "run", unreadable)
    assert "cannot use 'E/model.onnx': Permission denied" in cli_error_line(capsys, ["inspect", "E"])


def test_a_closed_pipe_is_quiet(tiny_engine_dir, capsys, monkeypatch):
    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["inspect", str(tiny_engine_dir)]) == 141
    assert capsys.readouterr().err == ""


def test_inspect_into_a_pipe_that_closes_early(tiny_engine_dir):
    # the real thing: the reader is gone before the first write (head -c 0), so every write fails
    result = subprocess.run(f"'{sys.executable}' -m agentopt_compiler.cli.main inspect '{tiny_engine_dir}' --json "
                            "| head -c 0", shell=True, capture_output=True, text=True, timeout=120)
    assert result.stderr == ""


def test_interactive_mode_reports_bad_lines_and_goes_on(chat_engine, capsys, monkeypatch):
    from agentopt_compiler.cli import run_cmd

    monkeypatch.setattr(run_cmd, "MAX_TASK_BYTES", 64)
    lines = [b"first task", b"caf\xe9 in latin-1", b"y" * 200, "é".encode() * 30, b"x" * 60, b"second task"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\n".join(lines) + b"\n")))
    assert main(["run", str(chat_engine.folder), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err and err.count("step(s)") == 4, err
    assert len(errors) == 2 and "line 2 is not UTF-8" in errors[0] and "line 3 is longer" in errors[1], errors


def test_interactive_mode_goes_on_after_a_task_that_does_not_fit(chat_engine, capsys, monkeypatch):
    lines = ["first task", "z" * 3000, "second task"]  # the byte tokenizer: 3000 tokens > the 2048 context
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("\n".join(lines).encode() + b"\n")))
    assert main(["run", str(chat_engine.folder), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert err.count("step(s)") == 2 and len(errors) == 1 and "context" in errors[0], err


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["run", "--help"]])
def test_help_and_version_still_exit_zero(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0


def test_ctrl_c_swallowed_inside_a_library_still_stops_the_compile(tmp_path, capsys, monkeypatch):
    """Ctrl-C that lands in a weakref callback is printed as "Exception ignored" and lost, and the compile runs on to
    the end: the command still ends as interrupted (130), and the engine it wrote is removed."""
    import signal
    import types

    import agentopt_compiler.compiler as compiler

    def compile_that_swallows_an_interrupt(**kwargs):
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # what the process receives on Ctrl-C
        except KeyboardInterrupt:
            pass  # as a weakref callback's caller does
        (tmp_path / "eng").mkdir()
        return types.SimpleNamespace(folder=tmp_path / "eng")

    monkeypatch.setattr(compiler, "compile", compile_that_swallows_an_interrupt)
    assert main(["compile", "--out", str(tmp_path / "eng")]) == 130
    assert "interrupted" in capsys.readouterr().err and not (tmp_path / "eng").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
