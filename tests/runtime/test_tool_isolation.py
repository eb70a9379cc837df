"""Fuzzing tool outcomes: tools that raise anything (SystemExit and KeyboardInterrupt included), hang, spin, return
what JSON cannot hold, or whose modules cannot be imported. Calls become error observations, never crash or stall
the caller; hung calls never starve later ones and never keep the process alive; loading problems are one
AgentOptError (one ``error:`` line from ``agentopt run --tools``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.runtime.tools import Tool, ToolCall, load_tool, run_tool_call


class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no text")


def _raiser(exception: BaseException):
    def tool() -> str:
        """Fails."""
        raise exception

    return tool


RAISED = [(SystemExit(3), "raised SystemExit: 3"), (SystemExit(), "raised SystemExit"),
          (KeyboardInterrupt(), "raised KeyboardInterrupt"), (GeneratorExit(), "raised GeneratorExit"),
          (ValueError("bad"), "raised ValueError: bad"), (RecursionError(), "raised RecursionError"),
          (MemoryError(), "raised MemoryError"), (Unprintable(), "could not be shown")]


def test_whatever_a_tool_raises_is_an_observation():
    for exception, expected in RAISED:
        result = run_tool_call(ToolCall("tool", {}), {"tool": Tool.from_function(_raiser(exception), "tool")})
        assert result.error is not None and expected in result.error, (exception, result.error)


def _returning(value):
    def tool() -> str:
        """Returns a value."""
        return value

    return tool


def test_outputs_json_cannot_hold_are_rendered_not_raised():
    circular: list = []
    circular.append(circular)
    for value, expected in [(circular, "[[...]]"), ({1, 2}, "{1, 2}"), (float("nan"), "NaN"), (None, "null"),
                            ({"a": object}, "class 'object'")]:
        result = run_tool_call(ToolCall("tool", {}), {"tool": Tool.from_function(_returning(value), "tool")})
        assert result.error is None and expected in result.output, (value, result)


def test_hung_tools_time_out_and_never_starve_later_calls():
    release = threading.Event()

    def hang() -> str:
        """Blocks until released."""
        release.wait()
        return "late"

    def quick() -> str:
        """Answers at once."""
        return "ok"

    tools = {t.name: t for t in map(Tool.from_function, (hang, quick))}
    started = time.perf_counter()
    for _ in range(8):  # more hung calls than the old 4-thread pool had workers
        assert "timed out after 0.05s" in run_tool_call(ToolCall("hang", {}), tools, timeout_s=0.05).text
    assert run_tool_call(ToolCall("quick", {}), tools, timeout_s=1).output == "ok"
    assert time.perf_counter() - started < 3
    release.set()


def test_a_spinning_tool_is_stopped_after_its_timeout():
    counter = {"n": 0}

    def spin() -> str:
        """Loops forever in Python."""
        while True:
            counter["n"] += 1

    assert "timed out" in run_tool_call(ToolCall("spin", {}), {"spin": Tool.from_function(spin)}, 0.05).text
    time.sleep(0.2)  # the stop request lands at the loop's next bytecode
    seen = counter["n"]
    time.sleep(0.2)
    assert counter["n"] == seen  # the thread has ended: it no longer burns a CPU
    assert not [t for t in threading.enumerate() if t.name == "agentopt-tool-spin"]


def test_the_process_exits_promptly_after_a_hung_tool():
    code = textwrap.dedent("""
        import time
        from agentopt_compiler.runtime.tools import Tool, ToolCall, run_tool_call
        def sleepy() -> str:
            '''Sleeps a minute.'''
            time.sleep(60)
        print(run_tool_call(ToolCall("sleepy", {}), {"sleepy": Tool.from_function(sleepy)}, timeout_s=0.1).text)
    """)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert "timed out" in result.stdout and result.returncode == 0
    assert time.perf_counter() - started < 20  # not the 60 s the tool sleeps


MODULES = {
    "syntax_error": ("def f(:\n    pass\n", "syntax error"),
    "raises_on_import": ("raise RuntimeError('no config')\n", "RuntimeError: no config"),
    "exits_on_import": ("import sys\nsys.exit(4)\n", "SystemExit"),
    "undefined_type": ("def f(x: 'Missing') -> str:\n    '''F.'''\n    return x\n", "Missing"),
    "not_callable": ("f = 42\n", "not a function"),
    "missing_attribute": ("def g():\n    pass\n", "has no 'f'"),
    "imports_missing": ("import no_such_package_xyz\n", "No module named 'no_such_package_xyz'"),
}


def test_tool_modules_that_cannot_load_are_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, (source, expected) in MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
        with pytest.raises(AgentOptError) as error:
            load_tool(f"{name}:f")
        assert expected in str(error.value) and f"{name}:f" in str(error.value), (name, str(error.value))
    for spec in ("nocolon", ":f", "module:", "no_such_module_xyz:f"):
        with pytest.raises(AgentOptError, match="tool"):
            load_tool(spec)
    with pytest.raises(AgentOptError, match="signature cannot be read"):
        Tool.from_function(max)  # a builtin with no introspectable signature
    assert Tool.from_function(type(len)).name == "builtin_function_or_method"  # its __doc__ is not a string
    # a name no model can call (a lambda's) is refused, and a file path is answered with the module's name
    (tmp_path / "lambdas.py").write_text("f = lambda x: x\n")
    with pytest.raises(AgentOptError, match="tool name '<lambda>' is not one a model can call"):
        load_tool("lambdas:f")
    assert Tool.from_function(lambda x: x, name="echo").name == "echo"
    with pytest.raises(AgentOptError, match=r"names a file; give the module's name instead \(lambdas:f\)"):
        load_tool(str(tmp_path / "lambdas.py") + ":f")


def test_run_tools_errors_are_one_line(chat_engine, tmp_path, capsys, monkeypatch):
    from tests.helpers import cli_error_line

    monkeypatch.chdir(tmp_path)
    for name, (source, _expected) in MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
        line = cli_error_line(capsys, ["run", str(chat_engine.folder), "--task", "x", "--tools", f"{name}:f"])
        assert f"{name}:f" in line
