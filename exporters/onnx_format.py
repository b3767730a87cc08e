"""ONNX: torch.onnx (dynamo, opset 21) export with a dynamic batch, then weight storage.

- 32 bits: as exported (batch norm folded into the convolutions by the exporter).
- 16 bits: every float initializer stored as float16, cast back to float32 in the graph.
- 8/4/3/2 bits, weight-only: each conv/linear weight replaced by int8 (8 bits), int4 (4 and 3
  bits) or int2 (2 bits) levels from ``quantize_channels`` and a per-output-channel
  DequantizeLinear (opset 21 is the first with int4; a 2-bit file is raised to opset 25, the
  first with int2, which onnxruntime loads). Activations stay float.
- sparse storage (``--sparse-storage``, any width and scheme): a weight with few enough
  non-zeros stored as (one-byte gaps, values), decoded in the graph (``_sparse``).
- 8 bits, static: onnxruntime's quantize_static (QDQ, int8 activations calibrated with min/max
  on the calibration samples, int8 symmetric per-channel weights by its own min/max).
"""

import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from exporters.failures import conversion_error
from exporters.quantize import container_bits, quantize_channels
from safeexport.errors import ExportError
from safeexport.stored import ONNX_WEIGHT_OPS, onnx_module
from safeexport.stored import inspect_onnx as inspect  # noqa: F401 - the format's reader

OPSET = 21
INT2_OPSET = 25
SUFFIX = ".onnx"


def _axis(node, weight: np.ndarray) -> int:
    """The output-channel axis of a conv/linear weight."""
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight.ndim - 1
    return 0  # Conv: [out, in, kh, kw]


def _float_export(model: torch.nn.Module, sample: np.ndarray):
    import onnx

    try:
        program = torch.onnx.export(model, (torch.from_numpy(sample),), dynamo=True,
                                    opset_version=OPSET, dynamic_shapes=({0: "batch"},),
                                    verbose=False)
        with tempfile.TemporaryDirectory() as d:
            program.save(str(Path(d) / "m.onnx"))
            proto = onnx.load(str(Path(d) / "m.onnx"))
    except Exception as e:  # the exporter raises many types; its messages name the op
        raise conversion_error("torch.onnx", model, sample, e) from e
    # the exporter annotates every node with its Python stack trace (this machine's paths)
    # and module names: most of a small sparse model's bytes, and nothing a runtime reads
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.graph.metadata_props[:]
    del proto.graph.value_info[:]
    return proto


def _replace(graph, init, new_inits: list, node) -> None:
    """Swap initializer ``init`` for ``new_inits`` and a decoding ``node`` that outputs the
    original name, so consumers are unchanged."""
    graph.initializer.remove(init)
    graph.initializer.extend(new_inits)
    graph.node.insert(0, node)


def _weight_only(proto, bits: int, keep: set[str], asymmetric: bool) -> None:
    from onnx import helper, numpy_helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    done = set()
    for node in list(graph.node):
        if node.op_type not in ONNX_WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        if name not in inits or name in done or onnx_module(name) in keep:
            continue
        w = numpy_helper.to_array(inits[name])
        if w.ndim < 2:
            continue
        axis = _axis(node, w)
        q, scale = quantize_channels(w, bits, axis, asymmetric)
        dtype = {8: np.int8, 4: ml_dtypes.int4, 2: ml_dtypes.int2}[container_bits(bits)]
        zp = np.zeros(len(scale), dtype)
        _replace(graph, inits[name],
                 [numpy_helper.from_array(q.astype(dtype), f"{name}_q"),
                  numpy_helper.from_array(scale, f"{name}_scale"),
                  numpy_helper.from_array(zp, f"{name}_zero_point")],
                 helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale",
                                                       f"{name}_zero_point"], [name], axis=axis,
                                  name=f"{name}_dequantize"))
        done.add(name)
    if done and container_bits(bits) == 2:
        _raise_opset(proto, INT2_OPSET)


def _raise_opset(proto, opset: int) -> None:
    """Declare the default domain at ``opset`` (the exporter's opset 21 has no int2), with
    onnx's version converter, which adapts op by op, and the IR version that opset and int2
    need (the converter keeps the old one); the parity check runs the result."""
    import onnx
    from onnx import helper

    try:
        converted = onnx.version_converter.convert_version(proto, opset)
    except Exception as e:  # the converter raises its own C++ error types
        raise ExportError(f"onnx's version converter cannot raise this model to opset {opset} "
                          f"for int2 weights ({e}); export 3 or more bits") from e
    converted.ir_version = max(converted.ir_version,
                               helper.find_min_ir_version_for(converted.opset_import))
    proto.CopyFrom(converted)


# The sparse storage's stepping stones: a gap is stored in one byte, so a run of zeros longer
# than this many positions carries a stored zero every STONE positions.
STONE = 256


def sparse_encode(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gaps minus one as uint8, values) of ``w``'s flattened non-zeros: each stored value sits
    gap positions after the previous one (the first after position -1), with a stored zero every
    STONE positions across a longer run of zeros. ``safeexport.stored.sparse_positions``
    inverts it."""
    flat = w.reshape(-1)
    nonzero = np.flatnonzero(flat)
    previous = np.concatenate([[-1], nonzero[:-1]])
    stones_per = (nonzero - previous - 1) // STONE
    owner = np.repeat(np.arange(len(nonzero)), stones_per)
    step = np.arange(len(owner)) - np.repeat(np.cumsum(stones_per) - stones_per, stones_per) + 1
    positions = np.sort(np.concatenate([nonzero, previous[owner] + STONE * step]))
    gaps = np.diff(positions, prepend=-1) - 1
    return gaps.astype(np.uint8), flat[positions]


def _sparse(proto) -> None:
    """Store every initializer of two or more dimensions (the conv/linear weights, float or
    integer levels) whose encoding is smaller as (gaps, values): one byte per stored value's
    gap, the values in their own type. Written by hand: ONNX's sparse_initializer costs an
    int64 index per value, more than the dense int8 tensor unless over 8/9 of it is zero. A
    decoding (Cast, Add, CumSum, Sub, ScatterND into ConstantOfShape zeros, Reshape; int4
    values scattered as int8 and cast back, int2 ones scattered as int8 for an int8
    DequantizeLinear) outputs the original name, so consumers are unchanged; onnxruntime folds
    it into a dense constant when the session loads (measured: the optimized graph holds no
    ScatterND)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    shared = {"sparse_one": np.array([1], np.int64), "sparse_axis": np.array(0, np.int64),
              "sparse_rows": np.array([-1, 1], np.int64)}
    done = []
    for init in list(graph.initializer):
        if len(init.dims) < 2:
            continue
        w = numpy_helper.to_array(init)
        packed = {TensorProto.INT4: 0.5, TensorProto.INT2: 0.25}.get(init.data_type)
        gaps, values = sparse_encode(w)
        value_bytes = packed or w.dtype.itemsize
        if not len(values) or len(values) * (1 + value_bytes) >= w.size * value_bytes:
            continue
        n, t = init.name, f"sparse{len(done)}_"  # t: short names for the decoding's tensors
        stored = numpy_helper.from_array(values, f"{n}_values")  # keeps int4, float16 ...
        scatter_type = TensorProto.INT8 if packed else init.data_type
        # int2 levels stay int8 once scattered, for an int8 DequantizeLinear: onnxruntime
        # (1.32) fails to load a file whose constant folding computes an int2 tensor
        cast_back = init.data_type == TensorProto.INT4
        scattered = f"{t}values8" if packed else stored.name
        nodes = [
            helper.make_node("Cast", [f"{n}_gaps"], [f"{t}gaps"], to=TensorProto.INT64),
            helper.make_node("Add", [f"{t}gaps", "sparse_one"], [f"{t}steps"]),
            helper.make_node("CumSum", [f"{t}steps", "sparse_axis"], [f"{t}ends"]),
            helper.make_node("Sub", [f"{t}ends", "sparse_one"], [f"{t}positions"]),
            helper.make_node("Reshape", [f"{t}positions", "sparse_rows"], [f"{t}index"]),
            helper.make_node("ConstantOfShape", [f"{n}_size"], [f"{t}zeros"],
                             value=helper.make_tensor("zero", scatter_type, [1], [0])),
            helper.make_node("ScatterND", [f"{t}zeros", f"{t}index", scattered], [f"{t}flat"]),
            helper.make_node("Reshape", [f"{t}flat", f"{n}_shape"],
                             [f"{t}dense" if cast_back else n])]
        if packed:
            nodes.insert(0, helper.make_node("Cast", [stored.name], [scattered],
                                             to=TensorProto.INT8))
        if cast_back:
            nodes.append(helper.make_node("Cast", [f"{t}dense"], [n], to=init.data_type))
        elif init.data_type == TensorProto.INT2:
            _int8_zero_points(graph, n)
        graph.initializer.remove(init)
        graph.initializer.extend([
            numpy_helper.from_array(gaps, f"{n}_gaps"), stored,
            numpy_helper.from_array(np.array([w.size], np.int64), f"{n}_size"),
            numpy_helper.from_array(np.array(w.shape, np.int64), f"{n}_shape")])
        for k, node in enumerate(nodes):
            graph.node.insert(k, node)
        done.append(n)
    if done:
        graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in shared.items())
        onnx.checker.check_model(proto)


def _int8_zero_points(graph, name: str) -> None:
    """The zero points of the DequantizeLinear nodes reading ``name``, as int8 (a zero point
    has its input's type)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] == name and len(node.input) > 2:
            zp = inits[node.input[2]]
            zp.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(zp).astype(np.int8),
                                                zp.name))


def _float16(proto, keep: set[str]) -> None:
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    for init in list(graph.initializer):
        if init.data_type != TensorProto.FLOAT or onnx_module(init.name) in keep:
            continue
        w = numpy_helper.to_array(init)
        _replace(graph, init, [numpy_helper.from_array(w.astype(np.float16), f"{init.name}_fp16")],
                 helper.make_node("Cast", [f"{init.name}_fp16"], [init.name],
                                  to=TensorProto.FLOAT, name=f"{init.name}_cast"))


def _static(proto, calibration: np.ndarray, keep: set[str], text: bool):
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{input_name: calibration[i:i + 32]}
                                 for i in range(0, len(calibration), 32)])

        def get_next(self):
            return next(self.batches, None)

    input_name = proto.graph.input[0].name
    excluded = [n.name for n in proto.graph.node if n.op_type in ONNX_WEIGHT_OPS
                and len(n.input) > 1 and onnx_module(n.input[1]) in keep]
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "f.onnx", Path(d) / "q.onnx"
        onnx.save(proto, str(src))
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=excluded,
                        # int8 attention softmax/layer-norm inputs ruin a transformer; its
                        # matrix products alone quantize well
                        op_types_to_quantize=["MatMul", "Gemm"] if text else None,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        return onnx.load(str(dst))


def convert(model: torch.nn.Module, sample: np.ndarray, bits: int, scheme: str,
            keep: set[str], calibration: np.ndarray | None, asymmetric: bool = False,
            sparse: bool = False) -> bytes:
    """The ONNX file's bytes for ``model`` at ``bits`` with ``scheme`` (``asymmetric``
    levels: ``quantize_channels``; ``sparse``: weights stored as gaps and values where that
    is smaller)."""
    proto = _float_export(model, sample)
    if scheme == "static":
        proto = _static(proto, calibration, keep, sample.dtype == np.int64)
    elif bits == 16:
        _float16(proto, keep)
    elif bits < 16:
        _weight_only(proto, bits, keep, asymmetric)
    if sparse:
        _sparse(proto)
    return proto.SerializeToString()
