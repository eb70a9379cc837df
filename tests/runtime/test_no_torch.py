"""The deploy side runs with onnxruntime + numpy + tokenizers only: torch (and the compile-side packages) are made
unimportable in a subprocess, which then loads an engine, generates, and runs the CLI's run and inspect commands."""

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"torch", "onnx", "onnxscript", "onnx_ir", "transformers", "safetensors", "networkx"}
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
    sys.meta_path.insert(0, Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)


def test_engine_loads_and_generates_without_torch(tiny_engine_dir, tiny_engine):
    expected = tiny_engine.generate_ids([1, 2, 3, 4], max_new_tokens=12, ignore_eos=True)
    result = _run(f"""
        try:
            import torch
            raise SystemExit("torch was importable")
        except ImportError:
            pass
        import agentopt_compiler as ao
        engine = ao.load_engine({str(tiny_engine_dir)!r})
        print(engine.generate_ids([1, 2, 3, 4], max_new_tokens=12, ignore_eos=True))
        print(repr(engine.generate("Hello", max_new_tokens=4)))
        from agentopt_compiler.runtime.constraints import regex_grammar
        print(repr(engine.generate("Hello", max_new_tokens=8, grammar=regex_grammar("(yes|no)"))))  # llguidance
        assert "torch" not in sys.modules
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(expected)
    assert result.stdout.splitlines()[2] in ("'yes'", "'no'")


def test_cli_run_and_inspect_without_torch(tiny_engine_dir):
    result = _run(f"""
        from agentopt_compiler.cli.main import main
        assert main(["run", {str(tiny_engine_dir)!r}, "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
        assert main(["inspect", {str(tiny_engine_dir)!r}]) == 0
        assert "torch" not in sys.modules
    """)
    assert result.returncode == 0, result.stderr
    assert "install onnx to see the op histogram" in result.stdout
    assert "prompt tokens" in result.stderr


def test_compile_and_plan_without_torch_name_the_install(tmp_path):
    result = _run(f"""
        import agentopt_compiler as ao
        from agentopt_compiler.cli.main import main
        from agentopt_compiler.errors import AgentOptError
        try:
            ao.compile("tiny-random", out={str(tmp_path / "engine")!r})
            raise SystemExit("compiled without torch")
        except AgentOptError as exc:
            print(exc)
        assert main(["compile", "--model", "tiny-random", "--out", {str(tmp_path / "cli")!r}]) == 2
        assert main(["plan", "precision", "--max-kl", "0.1", "--out", {str(tmp_path / "p.json")!r}]) == 2
    """)
    assert result.returncode == 0, result.stderr
    assert "compile needs torch, which is not installed: pip install 'agentopt-compiler[compile]'" in result.stdout
    assert result.stderr.count("error: compile needs torch") == 1
    assert "error: agentopt plan needs torch" in result.stderr and "internal error" not in result.stderr
    assert not (tmp_path / "engine").exists() and not (tmp_path / "cli").exists()
