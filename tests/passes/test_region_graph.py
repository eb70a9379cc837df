import networkx as nx

from agentopt_compiler.capture.export import capture
from agentopt_compiler.passes.region_graph import build_region_graph, summarize


def test_region_graph_of_a_two_layer_decoder(tiny_model):
    graph = build_region_graph(capture(tiny_model, context_length=16).module)
    expected = {"embed_tokens", "norm", "lm_head"} | {f"layers.{i}{s}" for i in range(2)
                                                        for s in ("", ".self_attn", ".mlp")}
    assert expected <= set(graph.nodes)
    assert nx.has_path(graph, "embed_tokens", "lm_head")
    assert graph.has_edge("layers.0.self_attn", "layers.0") and graph.has_edge("layers.0.mlp", "layers.0")
    total = sum(p.numel() * 4 for p in tiny_model.parameters())
    assert sum(graph.nodes[n]["param_bytes"] for n in graph) == total
    order = [r["region"] for r in summarize(graph)]
    assert order.index("embed_tokens") < order.index("layers.1.mlp") < order.index("lm_head")
