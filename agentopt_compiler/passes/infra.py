"""Pass infrastructure: a pass returns what it changed; a pipeline runs passes in order and records it all.

A pass rewrites an FX ``GraphModule`` (from ``CapturedProgram.module``) in place and returns a ``PassResult`` whose
``stats`` count each kind of rewrite. ``check(node)`` answers, per candidate node, *why* a rewrite does not apply
(``None`` when it does), so a user can see why a pass did not fire. The pipeline:

    captured program -> module -> pass 1 -> pass 2 -> ... -> re-export (only if something changed)

with a graph dump after each pass (``debug_dump``), ``skip`` by name, and one ``PassRecord`` per pass for the compile
report and the engine manifest.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from ..errors import AgentOptError, OutputPathError


@dataclass(frozen=True)
class PassResult:
    modified: bool
    stats: dict[str, int] = field(default_factory=dict)  # rewrite kind -> how many times it fired
    notes: tuple[str, ...] = ()  # why candidates were not rewritten, for the report
    # what the user asked of this pass (a plan's unit, a layer's pattern) that it did not do, and why: the compile
    # prints these as warnings (a request silently left undone would look like it was applied)
    unmet: tuple[str, ...] = ()


@dataclass(frozen=True)
class PassRecord:
    name: str
    skipped: bool
    stats: dict[str, int]
    notes: tuple[str, ...]
    seconds: float
    ops_before: int
    ops_after: int
    unmet: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"name": self.name, "skipped": self.skipped, "stats": self.stats, "notes": list(self.notes),
                "unmet": list(self.unmet), "seconds": round(self.seconds, 3), "ops_before": self.ops_before,
                "ops_after": self.ops_after}


class GraphPass:
    """Base class. Subclasses set ``name`` (verb_object) and implement ``call``."""

    name: ClassVar[str]

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = self.call(gm)
        if result.modified:
            gm.graph.lint()
            gm.recompile()
        return result


def owner_of(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    """The submodule that holds attribute ``target`` ("layers.0.self_attn.kv_cache.key") and the attribute name."""
    owner = gm
    *path, leaf = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


def op_histogram(gm: torch.fx.GraphModule) -> Counter:
    """Count call_function nodes by target, e.g. {'aten.linear.default': 15, ...}."""
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


class PassPipeline:
    """An ordered list of passes, run top to bottom."""

    def __init__(self, passes: list[GraphPass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate pass names in pipeline: {names}")
        self.passes = passes

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def run(self, program, skip: frozenset[str] | set[str] = frozenset(), debug_dump: Path | None = None,
            log: Callable[[str], None] = lambda _msg: None):
        """Run the passes on ``program`` (a CapturedProgram); return the new program and one record per pass."""
        unknown = set(skip) - set(self.names)
        if unknown:
            raise AgentOptError(
                f"unknown pass to skip: {', '.join(sorted(unknown))}; passes are: {', '.join(self.names)}"
            )
        gm = program.module
        _dump(debug_dump, 0, "captured", gm)
        records, modified = [], False
        for index, graph_pass in enumerate(self.passes, start=1):
            ops_before = sum(op_histogram(gm).values())
            if graph_pass.name in skip:
                log(f"pass {graph_pass.name}: skipped")
                records.append(PassRecord(graph_pass.name, True, {}, (), 0.0, ops_before, ops_before))
                continue
            start = time.perf_counter()
            try:
                result = graph_pass(gm)
            except AgentOptError:
                raise
            except Exception as exc:
                ran = ", ".join(self.names[: index - 1]) or "none"
                raise AgentOptError(f"pass {graph_pass.name} failed ({type(exc).__name__}: {exc}); "
                                    f"passes that ran before it: {ran}; skip it with --skip-pass "
                                    f"{graph_pass.name}") from exc
            seconds = time.perf_counter() - start
            ops_after = sum(op_histogram(gm).values())
            modified |= result.modified
            records.append(PassRecord(graph_pass.name, False, dict(result.stats), result.notes, seconds,
                                      ops_before, ops_after, result.unmet))
            summary = ", ".join(f"{k}={v}" for k, v in result.stats.items()) or "no change"
            log(f"pass {graph_pass.name}: {summary} ({ops_before} -> {ops_after} ops, {seconds:.2f}s)")
            for request in result.unmet:
                log(f"WARNING: {graph_pass.name} did not apply {request}")
            _dump(debug_dump, index, graph_pass.name, gm)
        if modified:
            program = program.recapture(gm)
        return program, records


def _dump(folder: Path | None, index: int, name: str, gm: torch.fx.GraphModule) -> None:
    if folder is None:
        return
    histogram = "\n".join(f"#   {count:5d}  {op}" for op, count in sorted(op_histogram(gm).items()))
    text = f"# after {name}\n# op histogram:\n{histogram}\n\n{gm.graph}\n\n# python:\n{gm.code}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:02d}-{name}.txt").write_text(text)
    except OSError as exc:  # a full disk, or a folder that became unwritable after the compile checked it
        raise OutputPathError(f"cannot write the debug dump to '{folder}': {exc.strerror or exc}; choose another "
                              "--debug-dump") from None
