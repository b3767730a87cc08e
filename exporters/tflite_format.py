"""TFLite: litert-torch conversion (no TensorFlow) at a fixed batch size, then ai-edge-quantizer
for the graph surgery, then the weights rewritten with safeexport's own quantizer.

ai-edge-quantizer builds the right structure (int8/int4 weight tensors with per-channel
quantization, DEQUANTIZE ops for weight-only, hybrid kernels for dynamic), but its min/max scales
give an all-zero (pruned) channel scale 0, which XNNPACK refuses, and it ignores 3- and 2-bit
requests. So for weight-only and dynamic schemes every quantized weight is rewritten from the
float file: levels and scales from ``quantize_channels`` on the stored layout (batch norm already
folded), 3 bits in int4 containers, 2 bits in int2 (weight-only; dynamic: int4). Static int8
keeps the quantizer's own weights (their scales are tied to the int32 biases) and is checked
like every export.
"""

import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from exporters.failures import conversion_error
from exporters.quantize import container_bits, pack_ints, quantize_channels
from safeexport.errors import ExportError
from safeexport.stored import (
    INT2,
    INT4,
    INT8,
    INT_WIDTH,
    module_of,
    read_tflite,
    tflite_weights,
    unpack_ints,
)
from safeexport.stored import inspect_tflite as inspect  # noqa: F401 - the format's reader

SUFFIX = ".tflite"
def _float_tflite(model: torch.nn.Module, sample: np.ndarray) -> bytes:
    import litert_torch

    try:
        edge = litert_torch.convert(model, (torch.from_numpy(sample),))
        with tempfile.TemporaryDirectory() as d:
            edge.export(str(Path(d) / "m.tflite"))
            return (Path(d) / "m.tflite").read_bytes()
    except Exception as e:  # the converter raises many types; its messages name the op
        raise conversion_error("litert-torch", model, sample, e) from e


def _quantizer(path: Path, bits: int, scheme: str):
    """An ai-edge-quantizer for the file at ``path`` with the recipe for ``bits``/``scheme``."""
    from ai_edge_quantizer import qtyping, quantizer, recipe

    if bits == 16:
        q = quantizer.Quantizer(str(path))
        q.update_quantization_recipe(
            regex=".*", operation_name="*", algorithm_key="float_casting",
            op_config=qtyping.OpQuantizationConfig(
                weight_tensor_config=qtyping.TensorQuantizationConfig(
                    num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
                compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True))
        return q
    container = 8 if bits == 8 else 4
    if scheme == "static":
        rec = recipe.static_wi8_ai8()
    elif scheme == "dynamic":
        rec = recipe.dynamic_wi8_afp32() if container == 8 else recipe.dynamic_wi4_afp32()
    else:
        rec = (recipe.weight_only_wi8_afp32() if container == 8
               else recipe.weight_only_wi4_afp32())
    return quantizer.Quantizer(str(path), rec)


def _quantize(float_bytes: bytes, bits: int, scheme: str, keep: set[str],
              calibration: np.ndarray | None) -> bytes:
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils

    fmodel = read_tflite(float_bytes)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "f.tflite"
        src.write_bytes(float_bytes)
        q = _quantizer(src, bits, scheme)
        tensors = fmodel.subgraphs[0].tensors
        for op, idx, _ in tflite_weights(fmodel):
            if module_of(tensors[idx].name.decode()) in keep:
                scope = tfl_flatbuffer_utils.get_op_scope(op, tensors)
                q.update_quantization_recipe(regex=f"^{re.escape(scope)}$", operation_name="*",
                                             algorithm_key="no_quantize")
        result = None
        if scheme == "static":
            sig = fmodel.signatureDefs[0]
            batch = int(tensors[sig.inputs[0].tensorIndex].shape[0])
            n = len(calibration) // batch * batch
            samples = [{sig.inputs[0].name.decode(): calibration[i:i + batch]}
                       for i in range(0, n, batch)]
            result = q.calibrate({sig.signatureKey.decode(): samples})
        try:
            return bytes(q.quantize(result).quantized_model)
        except Exception as e:  # noqa: BLE001 - report the quantizer's own words
            raise ExportError(f"ai-edge-quantizer failed for {bits}-bit {scheme}: {e}") from e


def _rewrite_weights(model, fmodel, bits: int, asymmetric: bool) -> None:
    """Replace every int8/int4 weight's levels and scales in ``model`` by ``quantize_channels``
    of the float model ``fmodel``'s same tensor; 2-bit levels that a DEQUANTIZE reads
    (weight-only) go into int2 (LiteRT loads them; the dynamic scheme's hybrid kernels read
    their weights themselves and keep int4)."""
    ftensors = {t.name: t for t in fmodel.subgraphs[0].tensors}
    tensors = model.subgraphs[0].tensors
    for _, idx, stored in tflite_weights(model):
        t = tensors[stored]
        if t.type not in (INT8, INT4) or t.name not in ftensors:
            continue
        ft = ftensors[t.name]
        w = np.frombuffer(bytes(fmodel.buffers[ft.buffer].data), np.float32).reshape(ft.shape)
        axis = t.quantization.quantizedDimension
        levels, scale = quantize_channels(w, bits, axis, asymmetric)
        width = INT_WIDTH[t.type]
        if width == 4 and stored != idx:  # a DEQUANTIZE reads it: 2 bits go into int2
            width = container_bits(bits)
            t.type = INT2 if width == 2 else INT4
        model.buffers[t.buffer].data = np.frombuffer(
            levels.tobytes() if width == 8 else pack_ints(levels, width), np.uint8)
        t.quantization.scale = scale.astype(np.float32)
        t.quantization.zeroPoint = np.zeros(len(scale), np.int64)


def _short_names(model) -> None:
    """Name each weight after its PyTorch module (``features.4``) and leave every other inner
    tensor without a name: litert-torch's names spell out each op's whole module scope
    (hundreds of bytes a tensor, a fifth of a small sparse file). The model's inputs and outputs
    keep theirs. Empty quantization tables are dropped too (a few bytes each)."""
    sg = model.subgraphs[0]
    weights = {idx: module_of(sg.tensors[idx].name.decode()) for _, idx, _ in tflite_weights(model)}
    io = set(sg.inputs) | set(sg.outputs)
    for i, t in enumerate(sg.tensors):
        if i not in io:
            t.name = weights[i].encode() if i in weights else None
        q = t.quantization
        if q is not None and all(getattr(q, f) is None or len(getattr(q, f)) == 0
                                 for f in ("scale", "zeroPoint", "min", "max")):
            t.quantization = None


def _smallest_uint(top: int) -> tuple[type, int]:
    """The smallest unsigned type (numpy, TFLite's SparseIndexVector) holding 0..top."""
    from ai_edge_litert import schema_py_generated as fb

    for dtype, kind in ((np.uint8, fb.SparseIndexVector.Uint8Vector),
                        (np.uint16, fb.SparseIndexVector.Uint16Vector)):
        if top <= np.iinfo(dtype).max:
            return dtype, kind
    return np.int32, fb.SparseIndexVector.Int32Vector


def _index_vector(values: np.ndarray, kind: int):
    from ai_edge_litert import schema_py_generated as fb

    vector, dtype = {fb.SparseIndexVector.Uint8Vector: (fb.Uint8VectorT, np.uint8),
                     fb.SparseIndexVector.Uint16Vector: (fb.Uint16VectorT, np.uint16),
                     fb.SparseIndexVector.Int32Vector: (fb.Int32VectorT, np.int32)}[kind]
    vector = vector()
    vector.values = np.asarray(values, dtype)
    return vector


def _csr_layout(shape: list[int], nnz: int) -> tuple[int, int, type, int, type, int]:
    """The cheapest TFLite sparse layout of a tensor with ``nnz`` non-zeros: one dimension
    compressed (CSR), the others dense before it in the traversal order. Returns (that
    dimension, its bytes, segment type and kind, index type and kind): each dense row costs a
    segment, each non-zero an index, so the compressed dimension is the one that makes the rows
    fewest while its indices still fit the smallest type (ties: the last, natural order)."""
    best = None
    for axis in reversed(range(len(shape))):
        index_type, index_kind = _smallest_uint(shape[axis] - 1)
        segment_type, segment_kind = _smallest_uint(nnz)
        rows = int(np.prod(shape)) // shape[axis]
        cost = nnz * (1 + np.dtype(index_type).itemsize) \
            + (rows + 1) * np.dtype(segment_type).itemsize
        if best is None or cost < best[1]:
            best = (axis, cost, segment_type, segment_kind, index_type, index_kind)
    return best


def _sparse(model) -> None:
    """Store every quantized weight of ``model`` that a DEQUANTIZE reads, whose non-zeros are
    few enough, in TFLite's own sparse format: one dimension compressed (CSR: each dense row's
    segment and its non-zeros' indices, in the smallest unsigned types that hold them;
    ``_csr_layout``), the others dense, the values as int8 (int4 and int2 levels too: LiteRT's
    DENSIFY takes float32, float16 and int8), and a DENSIFY op giving the dense tensor, which alone
    carries the quantization, to the DEQUANTIZE. Only where that is smaller than the dense
    tensor. LiteRT densifies a constant once, on the first run."""
    import copy

    from ai_edge_litert import schema_py_generated as fb

    sg = model.subgraphs[0]
    tensors = sg.tensors
    densify = None
    for _, idx, stored in tflite_weights(model):
        t = tensors[stored]
        if stored == idx or t.type not in INT_WIDTH or t.sparsity is not None:
            continue  # only a quantized weight feeding its DEQUANTIZE
        shape = [int(d) for d in t.shape]
        raw = bytes(model.buffers[t.buffer].data)
        q = unpack_ints(raw, int(np.prod(shape)), INT_WIDTH[t.type]).reshape(shape)
        nnz = int(np.count_nonzero(q))
        axis, sparse_bytes, segment_type, segment_kind, index_type, index_kind = \
            _csr_layout(shape, nnz)
        if not nnz or sparse_bytes >= len(raw):
            continue
        if densify is None:
            code = fb.OperatorCodeT()
            code.builtinCode = fb.BuiltinOperator.DENSIFY
            code.deprecatedBuiltinCode = min(fb.BuiltinOperator.DENSIFY, 127)
            code.version = 1
            model.operatorCodes.append(code)
            densify = len(model.operatorCodes) - 1
        order = [d for d in range(len(shape)) if d != axis] + [axis]
        rows = q.transpose(order).reshape(-1, shape[axis])  # in traversal order
        nonzero = rows != 0
        dims = []
        for d in order[:-1]:
            dense = fb.DimensionMetadataT()
            dense.format, dense.denseSize = fb.DimensionType.DENSE, shape[d]
            dims.append(dense)
        csr = fb.DimensionMetadataT()
        csr.format = fb.DimensionType.SPARSE_CSR
        csr.arraySegmentsType, csr.arrayIndicesType = segment_kind, index_kind
        csr.arraySegments = _index_vector(
            np.concatenate([[0], np.cumsum(nonzero.sum(1))]), segment_kind)
        csr.arrayIndices = _index_vector(np.nonzero(nonzero)[1], index_kind)
        dims.append(csr)
        sparsity = fb.SparsityParametersT()
        sparsity.traversalOrder, sparsity.blockMap = order, []
        sparsity.dimMetadata = dims
        out = copy.deepcopy(t)  # the dense int8 tensor DENSIFY gives the DEQUANTIZE
        out.buffer, out.type = 0, INT8
        tensors.append(out)
        for reader in sg.operators:
            reader.inputs = [len(tensors) - 1 if i == stored else i for i in reader.inputs]
        t.type, t.sparsity, t.quantization = INT8, sparsity, None
        model.buffers[t.buffer].data = np.frombuffer(rows[nonzero].tobytes(), np.uint8)
        op_densify = fb.OperatorT()
        op_densify.opcodeIndex, op_densify.inputs = densify, [stored]
        op_densify.outputs = [len(tensors) - 1]
        sg.operators.insert(0, op_densify)


def convert(model: torch.nn.Module, sample: np.ndarray, bits: int, scheme: str,
            keep: set[str], calibration: np.ndarray | None, asymmetric: bool = False,
            sparse: bool = False) -> bytes:
    """The TFLite file's bytes for ``model`` (batch fixed to ``len(sample)``) at ``bits``
    (``asymmetric`` levels: ``quantize_channels``; ``sparse``: weight-only quantized weights
    with few non-zeros in TFLite's sparse format, ``_sparse``)."""
    float_bytes = _float_tflite(model, sample)
    fmodel = read_tflite(float_bytes)
    out = fmodel
    if bits != 32:
        out = read_tflite(_quantize(float_bytes, bits, scheme, keep, calibration))
        if bits <= 8 and scheme != "static":
            _rewrite_weights(out, fmodel, bits, asymmetric)
        if sparse and bits <= 8 and scheme == "weight-only":
            _sparse(out)
    _short_names(out)
    return _serialised(out)


def _serialised(model) -> bytes:
    """The bytes of a parsed TFLite ``model``, each distinct vector stored once: FlatBuffers
    lets any number of tables point at one vector, but the schema's writer
    (``flatbuffer_utils.convert_object_to_bytearray``) writes one per table. Every per-channel
    quantization carries a run of int64 zero points (8 bytes a channel, a seventh of a 2-bit
    sparse file), so layers with as many channels share one. (Only numpy vectors are shared:
    the parsed model holds shapes and operator inputs as lists.)"""
    import hashlib

    import flatbuffers

    class SharedVectors(flatbuffers.Builder):
        def __init__(self):
            super().__init__(1024)
            self.written = {}

        def CreateNumpyVector(self, x):  # noqa: N802 - the Builder method it overrides
            data = np.ascontiguousarray(x)  # keyed by digest: no second copy of the weights
            key = (data.dtype.str, data.size, hashlib.sha256(data.data).digest())
            if key not in self.written:
                self.written[key] = super().CreateNumpyVector(x)
            return self.written[key]

    builder = SharedVectors()
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
