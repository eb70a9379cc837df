"""The CLI is a thin shell: these run ``main(argv)`` in-process (and the real console script once), and check that
every kind of bad input ends in exactly one ``error:`` line and exit status 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import agentopt_compiler as ao
from agentopt_compiler.cli.main import main
from agentopt_compiler.errors import AgentOptError
from tests.helpers import cli_error_line, run_task_cli


def test_compile_run_inspect(tmp_path, capsys):
    out = tmp_path / "eng"
    assert main(["compile", "--model", "tiny-random", "--out", str(out), "--context-length", "64"]) == 0
    captured = capsys.readouterr()
    assert "compiled tiny-random for onnxruntime/cpu" in captured.out and "remove_noop_ops" in captured.out
    assert "capture done" in captured.err  # progress lines
    assert main(["run", str(out), "--prompt", "Hello", "--max-new-tokens", "8", "--ignore-eos"]) == 0
    assert "5 prompt tokens, 8 generated" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny-random" in text and "Attention" in text and "remove_noop_ops" in text and "sha256" in text
    assert "attention 2 × GroupQueryAttention (window none, sinks 0, full cache)" in text
    assert "kv cache 0.06 MiB, 64 slots per cache tensor\n" in text  # 4 x (1, 2, 64, 32) fp32
    assert main(["inspect", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["op_histogram"]["MatMul"] > 0
    ring = tmp_path / "ring"
    assert main(["compile", "--model", "tiny-random", "--out", str(ring), "--context-length", "128",
                 "--sparse-attention", "window=8"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(ring)]) == 0
    text = capsys.readouterr().out
    assert "2 × Attention (window 8, sinks 0, ring)" in text and "72 slots" in text  # window + 64 spare
    assert "calls of up to 65 tokens (longer ones are split)" in text
    strided = tmp_path / "strided"
    assert main(["compile", "--model", "tiny-random", "--out", str(strided), "--context-length", "32",
                 "--sparse-attention", "window=8,stride=4,kv_heads=1"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(strided)]) == 0  # every part of the pattern, as --json has it
    assert "(window 8, sinks 0, stride 4, dense KV heads [0], full cache)" in capsys.readouterr().out


def test_console_script_help_does_not_import_torch():
    # next to this interpreter (CI runs .venv/bin/python without .venv/bin on PATH), else on PATH
    beside = Path(sys.executable).parent / "agentopt"
    script = str(beside) if beside.is_file() else shutil.which("agentopt") or pytest.skip("console script not installed")
    code = ("import sys, runpy; sys.argv = ['agentopt', '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)" % script)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "compile" in result.stdout and result.stdout.strip().endswith("False")


def test_unknown_model(tmp_path, capsys):
    line = cli_error_line(capsys, ["compile", "--model", "gpt-5", "--out", str(tmp_path / "e")])
    assert "unknown model 'gpt-5'" in line and "tiny-random" in line


def test_folder_without_config(tmp_path, capsys):
    assert "no config.json" in cli_error_line(capsys, ["compile", "--model", str(tmp_path), "--out", str(tmp_path / "e")])


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"]}))
    line = cli_error_line(capsys, ["compile", "--model", str(tmp_path), "--out", str(tmp_path / "e")])
    assert "FalconForCausalLM" in line and "LlamaForCausalLM" in line


@torch.library.custom_op("agentopt_cli_test::sparkle", mutates_args=())
def sparkle(x: torch.Tensor) -> torch.Tensor:
    return x + 1


@sparkle.register_fake
def _(x):
    return torch.empty_like(x)


def test_op_the_exporter_cannot_handle(tmp_path, capsys, monkeypatch):
    from agentopt_compiler.models import registry

    real_load = registry.load_model

    def load_with_odd_op(spec, *args, **kwargs):
        loaded = real_load(spec, *args, **kwargs)
        mlp = loaded.model.layers[0].mlp
        mlp.forward = lambda x: mlp.down_proj(torch.ops.agentopt_cli_test.sparkle(mlp.gate_proj(x)))
        return loaded

    monkeypatch.setattr(registry, "load_model", load_with_odd_op)
    line = cli_error_line(capsys, ["compile", "--model", "tiny-random", "--out", str(tmp_path / "e"),
                                   "--context-length", "16"])
    assert "agentopt_cli_test.sparkle" in line and "layers.0.mlp" in line
    assert not (tmp_path / "e").exists()


def test_prompt_longer_than_the_context(tmp_path, capsys):
    main(["compile", "--model", "tiny-random", "--out", str(tmp_path / "e"), "--context-length", "16", "--quiet"])
    capsys.readouterr()
    line = cli_error_line(capsys, ["run", str(tmp_path / "e"), "--prompt", "x" * 40])
    assert "40 tokens" in line and "holds 16" in line


def test_corrupt_engine(tiny_engine_dir, tmp_path, capsys):
    engine = shutil.copytree(tiny_engine_dir, tmp_path / "e")
    with open(engine / "model.onnx", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    assert "corrupt" in cli_error_line(capsys, ["run", str(engine), "--prompt", "hi"])
    assert "not an engine folder" in cli_error_line(capsys, ["inspect", str(tmp_path)])


def test_unwritable_output(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "cannot write the engine" in cli_error_line(capsys, ["compile", "--out", str(tmp_path / "file" / "e")])


def test_missing_cuda(tiny_engine_dir, capsys):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    line = cli_error_line(capsys, ["run", str(tiny_engine_dir), "--prompt", "hi", "--device", "cuda"])
    assert "CUDAExecutionProvider" in line and "--device cpu" in line


def test_run_task_with_tools_and_interactive_mode(chat_engine, capsys, monkeypatch, tmp_path):
    (tmp_path / "mytools.py").write_text("def shout(text: str) -> str:\n    '''Upper-case text.'''\n"
                                         "    return text.upper()\n")
    monkeypatch.chdir(tmp_path)
    err = run_task_cli(capsys, ["run", str(chat_engine.folder), "--task", "Shout hello", "--tools", "mytools:shout",
                                "--max-new-tokens", "48", "--max-steps", "1"]).err
    assert "step(s)" in err and "tokens prefilled" in err
    # an answer cut by the token limit is not a complete one: exit status 1 (run_task_cli checks it)
    assert "[length: " in run_task_cli(capsys, ["run", str(chat_engine.folder), "--task", "Shout hello",
                                                "--max-new-tokens", "1", "--ignore-eos"]).err
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("first task\nsecond task\n"))
    assert main(["run", str(chat_engine.folder), "--max-new-tokens", "4"]) == 0
    err = capsys.readouterr().err
    assert err.count("step(s)") == 2 and "reused from cache" in err


def test_run_takes_tools_from_every_flag_and_commands_are_not_tasks(chat_engine, capsys, monkeypatch, tmp_path):
    from tests.helpers import cli_error_line

    from agentopt_compiler.runtime.agent import Agent

    (tmp_path / "flagtools.py").write_text("def shout(text: str) -> str:\n    return text.upper()\n"
                                         "def whisper(text: str) -> str:\n    return text.lower()\n")
    monkeypatch.chdir(tmp_path)  # (a module name no other test imports: sys.modules keeps the first one)
    offered, tasks, run = [], [], Agent.run

    def recording_run(self, task, *a, **kw):
        offered.append(sorted(self.tools))
        tasks.append(task)
        return run(self, task, *a, **kw)

    monkeypatch.setattr(Agent, "run", recording_run)
    # a second --tools adds to the first (it replaced it); /help is a command, not a task; /quit ends the session
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("/help\nfirst task\n/quit\nnever run\n"))
    assert main(["run", str(chat_engine.folder), "--tools", "flagtools:shout", "--tools", "flagtools:whisper",
                 "--max-new-tokens", "2", "--max-steps", "1"]) == 0
    assert tasks == ["first task"] and offered == [["shout", "whisper"]]
    assert "error: unknown command /help; commands: /reset" in capsys.readouterr().err
    # text that is not UTF-8 on the command line; an abbreviated option
    assert "holds the lone surrogate '\\udcff'" in cli_error_line(capsys, ["run", str(chat_engine.folder), "--task",
                                                                         "What \udcff is 2 + 2?"])
    assert "unrecognized arguments: --json" in cli_error_line(capsys, ["run", str(chat_engine.folder), "--json", "x"])


def test_interactive_tasks_start_afresh_unless_asked_to_continue(chat_engine, capsys, monkeypatch):
    from agentopt_compiler.runtime.agent import Agent

    seen, run = [], Agent.run

    def recording_run(self, task, *a, **kw):
        seen.append(len(self.messages))  # the history each task starts from
        return run(self, task, *a, **kw)

    monkeypatch.setattr(Agent, "run", recording_run)
    for flags, want in [([], [1, 1, 1]), (["--continue"], [1, 3, 5])]:
        seen.clear()
        monkeypatch.setattr("sys.stdin", __import__("io").StringIO("one\ntwo\nthree\n"))
        assert main(["run", str(chat_engine.folder), "--system", "Be brief.", "--max-new-tokens", "2",
                     "--max-steps", "1", *flags]) == 0
        assert seen == want, flags
    capsys.readouterr()


def test_a_continued_conversation_that_outgrows_the_context_says_so_and_resets(chat_engine, capsys, monkeypatch):
    """With --continue each task adds to the history until it no longer fits: the error says why and how to start
    afresh (/reset), and after /reset tasks run again."""
    from agentopt_compiler.runtime.agent import Agent

    seen, run = [], Agent.run

    def recording_run(self, task, *a, **kw):
        seen.append(len(self.messages))
        return run(self, task, *a, **kw)

    monkeypatch.setattr(Agent, "run", recording_run)
    lines = ["a" * 900, "b" * 900, "c" * 900, "/reset", "short task"]  # the byte tokenizer, a 2048-token context
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("\n".join(lines) + "\n"))
    assert main(["run", str(chat_engine.folder), "--continue", "--max-new-tokens", "2", "--max-steps", "1"]) == 0
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "grown to 4 messages" in errors[0] and "/reset" in errors[0], err
    assert "starts afresh" in err and seen == [0, 2, 4, 0] and err.count("step(s)") == 3


def test_prompt_mode_refuses_the_options_of_agent_tasks(chat_engine, capsys):
    for flags in (["--tools", "agentopt_compiler.tools:calculator"], ["--system", "Be brief."], ["--continue"]):
        line = cli_error_line(capsys, ["run", str(chat_engine.folder), "--prompt", "hi", *flags])
        assert flags[0] in line and "--prompt is a raw completion" in line


def test_run_memory_file_errors_say_what_to_fix(chat_engine, capsys, tmp_path):
    base = ["run", str(chat_engine.folder), "--task", "x", "--tools", "agentopt_compiler.tools:memory_lookup"]
    line = cli_error_line(capsys, base + ["--memory", str(tmp_path / "none.json")])
    assert "--memory: no such file" in line and "locker code" in line
    for index, (text, says) in enumerate([
            ("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list"),
            ('{"Locker Code": "1", "my locker code?": "2"}', "'Locker Code' and 'my locker code?', which a lookup "
                                                             "cannot tell apart"),
            ('{"wifi": "1", "wifi": "2"}', "has the key 'wifi' twice"), ('{" ": "1"}', "names nothing")]):
        (tmp_path / f"m{index}.json").write_text(text)
        assert says in cli_error_line(capsys, base + ["--memory", str(tmp_path / f"m{index}.json")]), text
    (tmp_path / "ok.json").write_text('{"locker code": 4821}')
    line = cli_error_line(capsys, ["run", str(chat_engine.folder), "--task", "x", "--memory",
                                   str(tmp_path / "ok.json")])
    assert "add --tools agentopt_compiler.tools:memory_lookup" in line


def test_memory_lookup_reads_the_memory_file(tmp_path):
    from agentopt_compiler.cli.run_cmd import _read_memory, _with_memory
    from agentopt_compiler.runtime.tools import load_tool

    (tmp_path / "m.json").write_text('{"locker code": 4821, "wifi": "sunflower"}')
    tools = _with_memory([load_tool("agentopt_compiler.tools:calculator"),
                          load_tool("agentopt_compiler.tools:memory_lookup")], _read_memory(str(tmp_path / "m.json")))
    assert [t.name for t in tools] == ["calculator", "memory_lookup"]
    assert tools[1].function(key="my locker code") == '{"key": "my locker code", "value": "4821"}'
    # the stored keys are the schema's enum (constrained decoding writes one of them); the prompt's type stays string
    assert tools[1].parameters["properties"]["key"] == {"type": "string", "enum": ["locker code", "wifi"]}


def test_run_with_prompt_lookup_prints_the_same_text_and_the_drafts(chat_engine, capsys):
    base = ["run", str(chat_engine.folder), "--task", "Say hello hello hello", "--max-new-tokens", "24",
            "--max-steps", "1"]
    plain = run_task_cli(capsys, base)
    looked_up = run_task_cli(capsys, base + ["--prompt-lookup", "4"])
    assert looked_up.out == plain.out
    assert "drafted tokens accepted" in looked_up.err and "drafted" not in plain.err
    sampled = run_task_cli(capsys, base + ["--prompt-lookup", "4", "--temperature", "0.8", "--seed", "1"])
    assert "drafted tokens accepted" in sampled.err  # sampling drafts too


def test_run_constrains_tool_calls_unless_told_not_to_and_shapes_prompt_output(chat_engine, capsys, monkeypatch,
                                                                              tmp_path):
    (tmp_path / "mytools.py").write_text("def shout(text: str) -> str:\n    '''Upper-case text.'''\n"
                                         "    return text.upper()\n")
    monkeypatch.chdir(tmp_path)
    base = ["run", str(chat_engine.folder), "--task", "Shout hello", "--tools", "mytools:shout", "--max-steps", "1"]
    # a step's token limit below the shortest call would silently leave the tools unusable: refused
    line = cli_error_line(capsys, base + ["--max-new-tokens", "8"])
    assert "too small for a call" in line and "--max-new-tokens" in line
    base += ["--max-new-tokens", "48"]
    assert "forced by the tools' grammar" in run_task_cli(capsys, base).err
    assert "grammar" not in run_task_cli(capsys, base + ["--no-constrain"]).err
    (tmp_path / "answer.json").write_text('{"type": "object", "properties": {"ok": {"type": "boolean"}}, '
                                          '"required": ["ok"], "additionalProperties": false}')
    prompt = ["run", str(chat_engine.folder), "--prompt", "Answer:", "--max-new-tokens", "40"]
    assert main(prompt + ["--json-schema", "answer.json", "--temperature", "1", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out) in ({"ok": True}, {"ok": False})
    assert main(prompt + ["--regex", "(yes|no)"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    assert "cannot read --json-schema" in cli_error_line(capsys, prompt + ["--json-schema", "missing.json"])
    (tmp_path / "broken.json").write_text("{not json")
    assert "is not valid JSON" in cli_error_line(capsys, prompt + ["--json-schema", "broken.json"])
    assert "cannot constrain decoding" in cli_error_line(capsys, prompt + ["--regex", "(unclosed"])
    too_short = ["run", str(chat_engine.folder), "--prompt", "Answer:", "--max-new-tokens", "2", "--json-schema",
                 "answer.json"]
    assert "--max-new-tokens" in cli_error_line(capsys, too_short)  # no whole answer fits: said, not cut
    assert "shape a --prompt" in cli_error_line(capsys, base + ["--regex", "x"])


def test_bad_tool_spec(chat_engine, capsys):
    line = cli_error_line(capsys, ["run", str(chat_engine.folder), "--task", "x", "--tools", "no_such_module:f"])
    assert "cannot load tool 'no_such_module:f'" in line


def test_kv_cache_dtype_and_per_head_sparse_flags_reach_the_engine(tmp_path, capsys):
    import json

    out = tmp_path / "e"
    assert main(["compile", "--model", "tiny-random", "--out", str(out), "--context-length", "16", "--quiet",
                 "--kv-cache-dtype", "fp16", "--sparse-attention", "window=4,kv_heads=1,layers=1"]) == 0
    engine = json.loads((out / "manifest.json").read_text())["engine"]
    assert {cache["dtype"] for cache in engine["caches"]} == {"float16"}
    assert [layer.get("dense_kv_heads") for layer in engine["attention"]["layers"]] == [None, [0]]


def test_a_plan_is_refused_for_a_model_it_was_not_measured_on(tmp_path, capsys):
    """Plans record their model; plan and compile default to the same one (agent-tiny), and a plan made for one
    model is refused by the compile of another instead of being applied to it."""
    from agentopt_compiler.passes.precision_plan import PrecisionPlan

    plan = tmp_path / "sparse.json"
    assert main(["plan", "sparse", "--model", "tiny-random", "--window", "8", "--max-kl", "1", "--sequences", "1",
                 "--length", "32", "--context-length", "64", "--out", str(plan)]) == 0
    assert json.loads(plan.read_text())["model"] == "tiny-random"
    line = cli_error_line(capsys, ["compile", "--sparse-attention", str(plan), "--context-length", "64",
                                   "--out", str(tmp_path / "e1")])
    assert "measured on 'tiny-random'" in line and "'agent-tiny'" in line and not (tmp_path / "e1").exists()
    assert main(["compile", "--model", "tiny-random", "--sparse-attention", str(plan), "--context-length", "64",
                 "--out", str(tmp_path / "e2"), "--quiet"]) == 0
    with pytest.raises(AgentOptError, match="measured on 'tiny-random'"):
        ao.compile("agent-tiny", out=tmp_path / "e3",
                   precision_plan=PrecisionPlan({"lm_head": "int8"}, model="tiny-random"))
