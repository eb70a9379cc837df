"""Make ONNX Runtime's contrib-op schemas (com.microsoft) known to ``onnx.defs``.

torch.onnx's tracer needs an ``onnx.defs.OpSchema`` for every op a translation emits; the ``onnx`` package knows only
standard ops (``SchemaError: No schema registered for 'GroupQueryAttention' ... 'com.microsoft'``). ORT ships the
schemas it implements, so we copy the ones we emit from ORT into ``onnx.defs`` once per process.
"""

from __future__ import annotations

import onnx
import onnx.defs

_registered: set[str] = set()


def register_ort_contrib_schema(op_type: str, domain: str = "com.microsoft") -> None:
    if (domain, op_type) in _registered or onnx.defs.has(op_type, domain):
        _registered.add((domain, op_type))
        return
    from onnxruntime.capi import _pybind_state as ort_c

    source = next((s for s in ort_c.get_all_operator_schema() if s.name == op_type and s.domain == domain), None)
    if source is None:
        raise RuntimeError(f"this onnxruntime has no {domain}::{op_type} schema")

    def parameters(params):
        return [onnx.defs.OpSchema.FormalParameter(
            p.name, p.typeStr, p.description,
            param_option=onnx.defs.OpSchema.FormalParameterOption(int(p.option)))
            for p in params]

    attributes = [onnx.defs.OpSchema.Attribute(name, onnx.defs.OpSchema.AttrType(int(a.type)), a.description,
                                               required=False)
                  for name, a in source.attributes.items()]
    constraints = [(t.type_param_str, list(t.allowed_type_strs), t.description) for t in source.type_constraints]
    schema = onnx.defs.OpSchema(op_type, domain, source.since_version, inputs=parameters(source.inputs),
                                outputs=parameters(source.outputs), type_constraints=constraints,
                                attributes=attributes)
    onnx.defs.register_schema(schema)
    _registered.add((domain, op_type))
