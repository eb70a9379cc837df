"""Run one tool call so that nothing it does can stop the caller: hangs, ``sys.exit``, ``KeyboardInterrupt`` raised
by the tool, or a pile of earlier calls that never returned.

    outcome = call_isolated(function, {"city": "Oslo"}, timeout_s=10)
    outcome.value / outcome.error            # exactly one is set; never raises for the tool's sake

Each call gets a fresh daemon thread:
- a call that hangs holds only its own thread, never a slot of a shared pool, so hung calls cannot starve later
  ones, and a daemon thread never keeps the process alive at exit;
- on timeout the thread is asked to stop: an exception is raised inside it (``PyThreadState_SetAsyncExc``), which
  ends a pure-Python loop at its next bytecode; a call blocked inside C (``time.sleep``, a socket read) stops when
  that returns;
- ``BaseException`` is caught in the thread (``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``), so a tool's
  own exit or interrupt becomes an error result instead of ending the agent process.

Why threads and not a subprocess per call: tools are ordinary Python callables, often closures over the caller's
state (``agent_tiny.tools.runtime_tools(memory)`` reads the conversation's memory; user tools update objects the program
keeps). A subprocess would have to pickle them, would lose every change they make, would cost a process start
(or a fork of a process holding ONNX Runtime's threads) per call, and would run them in another interpreter. What a
thread cannot do is kill C code that never returns; such a thread is abandoned (daemon), and reported.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any, Callable


class ToolTimeout(BaseException):
    """Raised inside a timed-out call's thread to stop it (a BaseException, so ``except Exception`` in the tool
    does not swallow it)."""


@dataclass
class Outcome:
    value: Any = None
    error: str | None = None


def call_isolated(function: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float,
                  name: str = "tool") -> Outcome:
    """``function(**kwargs)`` in its own daemon thread, waited for at most ``timeout_s`` seconds."""
    outcome = Outcome()
    done = threading.Event()

    def run() -> None:
        try:
            try:
                outcome.value = function(**kwargs)
            except ToolTimeout:
                pass
            except BaseException as exc:  # noqa: BLE001  the tool's failure, whatever it is, is an observation
                detail = _text_of(exc)
                outcome.error = f"{name} raised {type(exc).__name__}{': ' + detail if detail else ''}"
            finally:
                done.set()
        except ToolTimeout:  # the stop request arrived just as the call ended
            pass

    worker = threading.Thread(target=run, name=f"agentopt-tool-{name}", daemon=True)
    worker.start()
    if not done.wait(timeout_s):
        _raise_in_thread(worker, ToolTimeout)
        return Outcome(error=f"{name} timed out after {timeout_s:g}s")
    return outcome


def _text_of(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001  an exception whose __str__ fails still gets reported
        return "(its message could not be shown)"


def _raise_in_thread(thread: threading.Thread, exception: type[BaseException]) -> None:
    """Ask ``thread`` to raise ``exception`` at its next Python bytecode (no effect while it is inside C code)."""
    if thread.ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exception))
