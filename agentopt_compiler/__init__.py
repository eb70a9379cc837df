"""AgentOpt Compiler: compile decoder LLMs into engines for agent workloads.

    import agentopt_compiler as ao
    engine = ao.compile("tiny-random", out="eng/")          # needs torch
    engine = ao.load_engine("eng/")                          # deploy side: onnxruntime + numpy + tokenizers
    print(engine.generate("Hello", max_new_tokens=32))

Attributes are imported lazily, so ``import agentopt_compiler`` works without torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "compile": "agentopt_compiler.compiler:compile",
    "CompileReport": "agentopt_compiler.compiler:CompileReport",
    "load_engine": "agentopt_compiler.runtime.engine:load_engine",
    "Engine": "agentopt_compiler.runtime.engine:Engine",
    "GenerationConfig": "agentopt_compiler.runtime.engine:GenerationConfig",
    "AgentOptError": "agentopt_compiler.errors:AgentOptError",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'agentopt_compiler' has no attribute '{name}'")
    module, attr = _LAZY[name].split(":")
    return getattr(import_module(module), attr)
