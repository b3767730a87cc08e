"""A converter's failure as one line that names the operator and the layer it sits in."""

import re

import numpy as np
import torch

from safeexport.errors import ExportError

_OP = re.compile(r"aten\.(\w+)(?:\.\w+)?")


def _text(exc: BaseException) -> str:
    parts = []
    while exc is not None and len(parts) < 8:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _layer_of(model: torch.nn.Module, sample: np.ndarray, op: str) -> str | None:
    """The module path whose forward calls ``op``, from torch.export's module stack."""
    try:
        program = torch.export.export(model, (torch.from_numpy(sample),), strict=False)
    except Exception:  # noqa: BLE001 - the converter already failed; this is only a hint
        return None
    base = op.lstrip("_")
    for node in program.graph.nodes:
        if node.op == "call_function" and base in str(node.target):
            stack = node.meta.get("nn_module_stack") or {}
            path = list(stack.values())[-1][0] if stack else ""
            return path or f"{type(model).__name__}.forward"
    return None


def conversion_error(tool: str, model: torch.nn.Module, sample: np.ndarray,
                     exc: BaseException) -> ExportError:
    """ExportError for ``tool`` failing on ``model``: the unsupported operator and its layer
    when the converter's messages name one, else the converter's first line."""
    text = _text(exc)
    found = _OP.search(text)
    if found:
        layer = _layer_of(model, sample, found.group(1))
        where = f" in layer {layer}" if layer else ""
        return ExportError(f"{tool} cannot convert {type(model).__name__}: operator "
                           f"aten.{found.group(1)}{where} is not supported")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ExportError(f"{tool} cannot convert {type(model).__name__}: {first}")
