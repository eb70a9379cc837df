import json

import pytest

from tests.helpers import cli_error_line
import torch

import agentopt_compiler as ao
from agentopt_compiler.analysis import precision
from agentopt_compiler.analysis.calibration import calibration_batches
from agentopt_compiler.analysis.sparse import (choose_sparse_layers, measure_fidelity, measure_sparse_costs,
                                               plan_sparse, sparse_layers)
from agentopt_compiler.cli.main import main
from agentopt_compiler.errors import AgentOptError
from agentopt_compiler.models.registry import load_model
from agentopt_compiler.passes.insert_sparse_attention import SparseAttentionPlan, SparsePattern

PATTERN = SparsePattern(8, 2)


@pytest.fixture(scope="module")
def tiny():
    loaded = load_model("tiny-random")
    return loaded, calibration_batches(loaded, None, sequences=2, length=40)


@pytest.fixture(scope="module")
def measured(tiny):
    loaded, batches = tiny
    return measure_sparse_costs(loaded.model, batches, PATTERN, context_length=128)


def test_a_covering_window_costs_nothing(tiny):
    loaded, batches = tiny
    m = measure_sparse_costs(loaded.model, batches, SparsePattern(40), context_length=64)
    assert [m.sparse_option(i).kl for i in range(2)] == [0.0, 0.0]
    assert [m.sparse_option(i).top1 for i in range(2)] == [1.0, 1.0]
    assert m.head_mass_outside == [[0.0] * 4, [0.0] * 4] and m.queries_beyond_window == 0
    # a window of 40 keys hides nothing from 40 tokens, so the plan refuses to call that a measurement
    with pytest.raises(AgentOptError, match="fit inside the window of 40 and the 0 sink"):
        plan_sparse(loaded.model, batches, SparsePattern(40), max_kl=0.1)
    with pytest.raises(AgentOptError, match="use --length > 40"):  # nor do a window of 32 and 8 sinks (it measured
        plan_sparse(loaded.model, batches, SparsePattern(32, sinks=8), max_kl=0.1)  # KL 0, so every layer sparse)
    assert choose_sparse_layers(m, 0.0).sparse_layers == [0, 1]  # free layers go sparse even at a zero budget


def test_a_short_window_costs_something(measured):
    for layer in range(2):
        option = measured.sparse_option(layer)
        assert option.kl > 1e-4 and option.top1 < 1.0
        assert option.kv_bytes < measured._dense(layer).kv_bytes  # a ring of 74 slots (sinks + window + spare) instead of 128
    masses = [v for heads in measured.head_mass_outside for v in heads]
    assert len(masses) == 8 and all(0.0 < v <= 1.0 for v in masses)
    assert measured.queries_beyond_window == 2 * (40 - 8)


def test_mass_outside_matches_a_direct_computation(tiny):
    # layer 0's input is the embedding, so its dense attention probabilities can be recomputed by hand
    loaded, batches = tiny
    model, ids = loaded.model, batches[0]
    m = measure_sparse_costs(model, [ids], PATTERN, context_length=64)
    attention, s = model.layers[0].self_attn, ids.shape[1]
    with torch.no_grad():
        x = model.layers[0].input_layernorm(model.embed_tokens(ids))
        cos, sin = model.rope_cos[:s][None, None], model.rope_sin[:s][None, None]
        from agentopt_compiler.models.llama import apply_rope

        q = apply_rope(attention.q_proj(x).view(1, s, 4, 32).transpose(1, 2), cos, sin)
        k = apply_rope(attention.k_proj(x).view(1, s, 2, 32).transpose(1, 2), cos, sin).repeat_interleave(2, 1)
        p = torch.arange(s)
        causal = p[None, :] <= p[:, None]
        probs = torch.softmax((q @ k.transpose(-1, -2) / 32 ** 0.5).masked_fill(~causal, float("-inf")), -1)
        hidden = causal & (p[None, :] <= p[:, None] - 8) & (p[None, :] >= 2)
        expected = (probs * hidden).sum(-1)[0, :, 8:].mean(-1)
    assert m.head_mass_outside[0] == pytest.approx(expected.tolist(), abs=1e-5)


def test_kl_over_selected_positions_matches_a_direct_computation(tiny, measured):
    # the pattern hides keys 2 <= k <= p - 8 from query p, so nothing from queries p <= 9: KL 0 there
    loaded, batches = tiny
    model = loaded.model
    early = [torch.arange(b.shape[1])[None] <= 8 for b in batches]
    late = [~m for m in early]
    m_early = measure_sparse_costs(model, batches, PATTERN, context_length=64, positions=early)
    m_late = measure_sparse_costs(model, batches, PATTERN, context_length=64, positions=late)
    with torch.no_grad():
        ref = [torch.log_softmax(model(b).double(), -1) for b in batches]
        with sparse_layers(model, {0: PATTERN}):
            oth = [torch.log_softmax(model(b).double(), -1) for b in batches]
    token_kl = torch.cat([(r.exp() * (r - o)).sum(-1)[0] for r, o in zip(ref, oth)])  # (2 * 40,)
    selected_late = torch.cat([m[0] for m in late])
    assert m_early.sparse_option(0).kl == pytest.approx(0.0, abs=1e-12)
    assert m_late.sparse_option(0).kl == pytest.approx(float(token_kl[selected_late].mean()), rel=1e-9)
    assert m_late.sparse_option(0).kl > measured.sparse_option(0).kl  # the mean over all positions dilutes it
    with pytest.raises(AgentOptError, match="all false"):
        measure_sparse_costs(model, batches, PATTERN, context_length=64,
                             positions=[torch.zeros_like(m) for m in early])


def test_plan_meets_its_budget_and_a_tighter_budget_keeps_more_layers_dense(measured):
    kls = sorted(measured.sparse_option(i).kl for i in range(2))
    dense_counts = []
    for budget in (sum(kls) * 1.01, kls[0] * 1.01, kls[0] * 0.5, 0.0):
        result = choose_sparse_layers(measured, budget)
        assert result.predicted["kl"] <= budget
        assert result.budget == {"max_kl": budget}
        dense_counts.append(len(result.predicted["dense_layers"]))
    assert dense_counts == [0, 1, 2, 2]
    one = choose_sparse_layers(measured, kls[0] * 1.01)
    assert one.sparse_layers == [min(range(2), key=lambda i: measured.sparse_option(i).kl)]
    assert one.plan.layers == {one.sparse_layers[0]: PATTERN}
    assert one.predicted["kv_bytes"] < one.predicted["kv_bytes_all_dense"]
    with pytest.raises(AgentOptError, match="max-kl"):
        choose_sparse_layers(measured, -1.0)


def test_held_out_fidelity(tiny, measured):
    loaded, _ = tiny
    held_out = calibration_batches(loaded, None, sequences=2, length=40, seed=1234)
    result = choose_sparse_layers(measured, 10.0)  # both layers sparse
    fidelity = measure_fidelity(loaded.model, result.plan, held_out)
    assert fidelity["kl"] > 0 and fidelity["tokens"] == 80 and 0 <= fidelity["top1"] <= 1
    assert measure_fidelity(loaded.model, SparseAttentionPlan({}), held_out)["kl"] == 0.0


def test_the_hooks_match_the_model_and_leave_no_trace(tiny):
    loaded, batches = tiny
    model, ids = loaded.model, batches[0]
    with torch.no_grad():
        dense = model(ids)
        with sparse_layers(model, {0: SparsePattern(40)}):  # covering: same mask, same result
            assert torch.equal(model(ids), dense)
        with sparse_layers(model, {1: PATTERN}):
            assert not torch.allclose(model(ids), dense, atol=1e-4)
        assert torch.equal(model(ids), dense)  # hooks removed
    with pytest.raises(AgentOptError, match="layers 0-1"):
        with sparse_layers(model, {5: PATTERN}):
            pass


def test_cli_plan_compiles_and_the_engine_matches_the_eager_sparse_model(tmp_path, capsys):
    out, report = tmp_path / "plan.json", tmp_path / "report"
    # budget between the two layers' KL on these tokens (0.033 and 0.053), so one layer stays dense
    assert main(["plan", "sparse", "--model", "tiny-random", "--window", "8", "--sinks", "2", "--max-kl", "0.04",
                 "--sequences", "2", "--length", "48", "--context-length", "128", "--out", str(out),
                 "--report", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| layer | chosen |" in printed and "held-out" in printed
    doc = json.loads(out.read_text())
    assert doc["format"] == "agentopt-sparse-attention-plan" and doc["budget"] == {"max_kl": 0.04}
    assert doc["predicted"]["kl"] <= 0.04 and doc["fidelity"]["tokens"] == 96
    assert doc["fidelity"]["kl"] <= 0.04  # seeded: the plan also holds on held-out (other random) tokens
    chosen = doc["predicted"]["sparse_layers"]
    assert chosen == [1] and doc["predicted"]["dense_layers"] == [0]
    plan = SparseAttentionPlan.load(out)
    assert plan == SparseAttentionPlan({1: PATTERN}, model="tiny-random")  # the model it was measured on, recorded
    assert (report / "heatmap.png").stat().st_size > 1000
    assert "per layer, not per head" in (report / "report.md").read_text()
    assert len(json.loads((report / "sensitivity.json").read_text())["layers"]) == 2

    engine = ao.compile("tiny-random", out=tmp_path / "eng", context_length=128, sparse_attention=str(out))
    assert engine.manifest["sparse_attention"]["layers"] == {"1": doc["layers"]["1"]}
    layers = engine.manifest["engine"]["attention"]["layers"]
    assert [(a["window"], a["sinks"], a["ring"]) for a in layers] == [(0, 0, False), (8, 2, True)]
    record = next(r for r in engine.manifest["passes"] if r["name"] == "insert_sparse_attention")
    assert record["stats"] == {"window8+sinks2": 1, "ring_caches": 1}
    loaded = load_model("tiny-random")
    held_out = calibration_batches(loaded, None, sequences=1, length=40, seed=7)
    with sparse_layers(loaded.model, plan.resolve(2)):  # the planner's eager mask is the engine's pattern
        assert precision.measure_fidelity(engine, loaded.model, held_out)["kl"] < 1e-6


def test_cli_refuses_sequences_inside_the_window(tmp_path, capsys):
    assert main(["plan", "sparse", "--window", "64", "--max-kl", "0.1", "--length", "64",
                 "--out", str(tmp_path / "p.json")]) != 0
    assert "fit inside the window" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def _chat_file(tmp_path, conversations: int = 5):
    """agent-tiny training-split episodes as chat JSON lines (system, user, assistant calls, tool results, answer)."""
    from agentopt_compiler.agent_tiny.tasks import generate_tasks

    path = tmp_path / "chats.jsonl"
    tasks = generate_tasks(conversations, "train", seed=5)
    path.write_text("\n".join(json.dumps({"messages": t.episode}) for t in tasks) + "\n")
    return path, tasks


def test_chat_calibration_marks_the_positions_that_predict_assistant_tokens(tmp_path):
    from agentopt_compiler.analysis.calibration import chat_calibration
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.runtime.tokenizer import Tokenizer

    path, tasks = _chat_file(tmp_path, 3)
    loaded = load_model("agent-tiny")
    batches, masks = chat_calibration(loaded, path, sequences=2, length=4096)
    assert len(batches) == len(masks) == 2 and all(b.shape == m.shape for b, m in zip(batches, masks))
    tokenizer = Tokenizer(loaded.tokenizer_dir)
    for ids, mask, task in zip(batches, masks, tasks):
        predicted = [int(ids[0, t + 1]) for t in range(ids.shape[1] - 1) if mask[0, t]]
        # the predicted tokens are exactly the assistant messages' tokens: what the template renders for each after
        # the generation prompt (its content, end marker and newline)
        text = tokenizer.decode(predicted, skip_special_tokens=False)
        assistant = [m["content"] for m in task.episode if m["role"] == "assistant"]
        assert text == "".join(f"{content}<|im_end|>\n" for content in assistant)
        assert not mask[0, -1]  # the last position predicts nothing inside the row
    first, _ = chat_calibration(loaded, path, sequences=1, length=4096)
    three, _ = chat_calibration(loaded, path, sequences=3, length=4096)
    assert len(first) == 1 and len(three) == 3 and all(torch.equal(a, b) for a, b in zip(batches, three))
    assert torch.equal(first[0], three[0]) and not torch.equal(three[1], three[2])  # in file order
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(AgentOptError, match="line 2: not JSON"):
        chat_calibration(loaded, tmp_path / "bad.jsonl")


def test_cli_plans_over_assistant_positions_from_chat_calibration(tmp_path, capsys):
    path, _ = _chat_file(tmp_path, 4)
    assert main(["plan", "sparse", "--model", "agent-tiny", "--calib-chat", str(path), "--window", "32",
                 "--max-kl", "0.05", "--sequences", "2", "--length", "512", "--out", str(tmp_path / "plan.json"),
                 "--report", str(tmp_path / "report")]) == 0
    captured = capsys.readouterr()
    assert "predicting assistant tokens" in captured.err
    fidelity = json.loads(captured.out.split("held-out ")[1].split(" -> ")[0])
    assert fidelity["sequences"] == 2 and 0 < fidelity["tokens"] < 2 * 512  # held out over assistant positions
    assert "predict assistant tokens" in (tmp_path / "report" / "report.md").read_text()
    assert main(["plan", "sparse", "--calib", str(path), "--calib-chat", str(path), "--window", "8", "--max-kl",
                 "0.1", "--out", str(tmp_path / "x.json")]) == 2  # --calib and --calib-chat are alternatives
    capsys.readouterr()
    # conversations cut before their first assistant turn, or just after it: said up front, naming --length (a
    # plan was written from a single assistant position)
    for length in (40, 160):  # 0 and 5 positions
        line = cli_error_line(capsys, ["plan", "sparse", "--model", "agent-tiny", "--calib-chat", str(path),
                                       "--window", "8", "--max-kl", "0.05", "--length", str(length), "--out",
                                       str(tmp_path / "short.json")])
        assert f"have {0 if length == 40 else 5} position(s) that predict assistant tokens (at least 32 are needed)" \
            in line and "--length" in line
    # a --length past the model's positions (the RoPE tables end there), for either planner
    for planner in (["sparse", "--window", "8"], ["precision"]):
        line = cli_error_line(capsys, ["plan", *planner, "--model", "tiny-random", "--max-kl", "0.1", "--length",
                                       "257", "--out", str(tmp_path / "long.json")])
        assert "--length 257 is longer than the 256 positions" in line
    assert not any((tmp_path / name).exists() for name in ("short.json", "long.json"))


def test_chat_calibration_refuses_a_template_that_rewrites_earlier_turns(tmp_path, monkeypatch):
    from agentopt_compiler.analysis.calibration import chat_calibration
    from agentopt_compiler.models.registry import load_model
    from agentopt_compiler.runtime import chat

    path, _ = _chat_file(tmp_path, 1)
    render = chat.render_chat
    # a template whose first line counts the messages: a conversation's start changes as messages are added
    monkeypatch.setattr(chat, "render_chat", lambda tok, messages, tools=None, add_generation_prompt=True:
                        f"{len(messages)}\n" + render(tok, messages, tools, add_generation_prompt))
    with pytest.raises(AgentOptError, match="does not render this conversation message by message"):
        chat_calibration(load_model("agent-tiny"), path)
