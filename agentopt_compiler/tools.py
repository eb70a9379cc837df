"""Ready-made tools for ``agentopt run --tools`` and the Agent API: the ones the built-in ``agent-tiny`` was trained
with, returning the exact observation text it saw in training.

    agentopt run ENGINE --task "What is 12 * 34?" --tools agentopt_compiler.tools:calculator

``memory_lookup`` here reads an empty memory; ``agentopt run --memory FILE.json`` gives it one (a JSON object of
key -> value), and the evaluation binds it to each task's memory; bound to a memory, its schema lists the stored
keys as an ``enum`` (``runtime_tools``), so a constrained call names one of them.
"""

from .agent_tiny.tools import runtime_tools

calculator, convert_units, memory_lookup = runtime_tools({})

__all__ = ["calculator", "convert_units", "memory_lookup"]
