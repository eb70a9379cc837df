"""Analysis: the region graph of a captured decoder (a networkx DiGraph of module regions and their dataflow).

Each FX node belongs to the innermost module it was traced in (``nn_module_stack``), collapsed to a region such as
``embed_tokens``, ``layers.3.self_attn``, ``layers.3.mlp``, ``layers.3`` (its norms and residual adds), ``norm`` or
``lm_head``. Edges are tensors that flow between regions. Per-layer planners (precision, sparse attention) work on
regions rather than on thousands of nodes, and the compile report lists them; the graph is also how a rewrite's
locality is checked (a fused attention op must stay inside one ``*.self_attn`` region).
"""

from __future__ import annotations

import re
from collections import Counter

import networkx as nx
import torch

_REGION = re.compile(r"^(layers\.\d+\.(?:self_attn|mlp)|layers\.\d+|embed_tokens|norm|lm_head)")


def region_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _type in reversed(list(stack.values())):
        match = _REGION.match(path.removeprefix("model."))
        if match:
            return match.group(1)
    return "top"


def build_region_graph(gm: torch.fx.GraphModule) -> nx.DiGraph:
    graph = nx.DiGraph()
    region: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = region_of(node)
        region[node] = name
        if name not in graph:
            graph.add_node(name, ops=Counter(), param_bytes=0)
        graph.nodes[name]["ops"][str(node.target)] += 1
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":  # a weight or buffer: charge its bytes to the region that reads it
                tensor = _attr(gm, arg.target)
                if isinstance(tensor, torch.nn.Parameter):
                    graph.nodes[name]["param_bytes"] += tensor.numel() * tensor.element_size()
            elif arg in region and region[arg] != name:
                graph.add_edge(region[arg], name)
    return graph


def summarize(graph: nx.DiGraph) -> list[dict]:
    """Regions in dataflow order, JSON-ready for the manifest and the compile report."""
    order = list(nx.topological_sort(graph)) if nx.is_directed_acyclic_graph(graph) else list(graph)
    return [{"region": name, "ops": sum(graph.nodes[name]["ops"].values()),
             "param_bytes": graph.nodes[name]["param_bytes"], "inputs_from": sorted(graph.predecessors(name))}
            for name in order]


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj
