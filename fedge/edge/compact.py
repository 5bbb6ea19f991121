"""Lossless size cuts for exported ONNX files (fp32 and int8 alike).

fedge's models are so small that graph bookkeeping is a visible share of an int8 file:
names, attributes spelled out at their default, the quantizer's repeated zero-point
scalars, unused opset imports and metadata. Removing them changes no computation.
"""

from __future__ import annotations

import itertools
import logging
import string
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import AttributeProto, helper, numpy_helper

log = logging.getLogger(__name__)

_DEFAULT_DOMAIN = ""


def _short_names(reserved: set[str]) -> Iterator[str]:
    """a, ..., Z, aa, ...: the shortest identifiers (none starts with a digit), minus `reserved`."""
    rest = string.ascii_letters + string.digits
    for length in itertools.count(1):
        for chars in itertools.product(string.ascii_letters, *[rest] * (length - 1)):
            name = "".join(chars)
            if name not in reserved:
                yield name


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(attr.g.node or attr.graphs for node in graph.node for attr in node.attribute)


def _shared_initializers(graph: onnx.GraphProto, keep: set[str]) -> dict[str, str]:
    """Drop initializers equal (dtype, shape, values) to an earlier one; returns old -> kept name.

    The static quantizer writes one zero-point scalar per tensor, most of them the same 0.
    """
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    unique = []
    for tensor in graph.initializer:
        key = (tensor.data_type, tuple(tensor.dims), numpy_helper.to_array(tensor).tobytes())
        if tensor.name not in keep and key in first:
            alias[tensor.name] = first[key]
        else:
            first.setdefault(key, tensor.name)
            unique.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(unique)
    return alias


def _drop_default_attributes(node: onnx.NodeProto, opsets: dict[str, int]) -> None:
    """Remove attributes set to the value their operator schema defaults to."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opsets[node.domain], node.domain)
    except (KeyError, onnx.defs.SchemaError):  # e.g. a contrib op onnx has no schema for
        return

    def is_default(attr: AttributeProto) -> bool:
        spec = schema.attributes.get(attr.name)
        if spec is None or spec.default_value.type == AttributeProto.UNDEFINED:
            return False
        return helper.get_attribute_value(attr) == helper.get_attribute_value(spec.default_value)

    explicit = [attr for attr in node.attribute if not is_default(attr)]
    del node.attribute[:]
    node.attribute.extend(explicit)


def compact_onnx(path: Path) -> None:
    """Shrink a model file in place without changing what it computes, then check it.

    Drops doc strings, cached shapes, metadata, duplicate initializers, default-valued
    attributes and unused opset imports, and gives every internal tensor the shortest free
    name: exporter and quantizer names (e.g. `/features/features.0/Conv_output_0_QuantizeLinear`)
    cost ~100 bytes per node, a quarter of a tiny int8 file. Graph inputs and outputs keep
    their names; graphs with control-flow subgraphs keep all names and imports, since
    subgraphs may refer to outer tensors by name.
    """
    model = onnx.load(str(path))
    graph = model.graph
    del graph.value_info[:]
    del model.metadata_props[:]  # fedge writes none; the quantizer's are notes to its own tools
    graph.doc_string = ""
    model.doc_string = ""
    simple = not _has_subgraphs(graph) and not model.functions
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    alias = _shared_initializers(graph, keep) if simple else {}
    names = _short_names(keep)
    short: dict[str, str] = {}

    def shorten(name: str) -> str:
        if not simple or not name or name in keep:
            return name
        name = alias.get(name, name)
        if name not in short:
            short[name] = next(names)
        return short[name]

    opsets = {entry.domain: entry.version for entry in model.opset_import}
    for tensor in graph.initializer:
        tensor.name = shorten(tensor.name)
    for node in graph.node:
        node.doc_string = ""
        if simple:
            node.name = ""
        _drop_default_attributes(node, opsets)
        node.input[:] = [shorten(name) for name in node.input]
        node.output[:] = [shorten(name) for name in node.output]
    if simple:
        used = {node.domain for node in graph.node} | {_DEFAULT_DOMAIN}
        imports = [entry for entry in model.opset_import if entry.domain in used]
        del model.opset_import[:]
        model.opset_import.extend(imports)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    log.debug("compacted %s (%d tensors renamed, %d shared)", path, len(short), len(alias))
