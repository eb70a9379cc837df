"""Shared by tests: the CLI run in-process must end in exactly one ``error:`` line, exit status 2, no traceback, and
nothing left on disk (tests of bad input); a live server on a free localhost port (server tests).

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


def run_task_cli(capsys, argv):
    """Run ``agentopt run ... --task`` in-process; assert its exit status says whether the task ended with a
    complete answer (0) or not (1: the bracketed line names the reason); return what it printed."""
    from agentopt_compiler.cli.main import main

    code = main(argv)
    printed = capsys.readouterr()
    assert code == (0 if "[answer:" in printed.err else 1), (argv, code, printed.err)
    return printed


def tree(folder: Path) -> set[str]:
    """Every path under ``folder`` (hidden ones included), relative: to assert a failed command left nothing."""
    return {str(p.relative_to(folder)) for p in Path(folder).rglob("*")}


API_KEY = "test-key"


class Running:
    """``agentopt serve``'s app on a free localhost port, with the service behind it, for the openai client."""

    def __init__(self, engine, **options):
        from agentopt_compiler.runtime.server import ChatService, HttpServer, LocalBackend, make_app

        app_options = {k: options.pop(k) for k in ("max_body_bytes", "read_timeout_s") if k in options}
        self.service = ChatService(engine, **options)
        self.http = HttpServer(make_app(LocalBackend(self.service), api_key=API_KEY, **app_options), "127.0.0.1", 0)
        self.port = self.http.start()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def client(self, **options):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=API_KEY, max_retries=0, timeout=60, **options)

    def idle(self) -> bool:
        """Wait (up to 10 s) until nothing is generating."""
        import time

        for _ in range(200):
            metrics = self.service.metrics()
            if metrics["busy_slots"] == 0 and metrics["active_requests"] == 0 and metrics["queue_depth"] == 0:
                return True
            time.sleep(0.05)
        return False
