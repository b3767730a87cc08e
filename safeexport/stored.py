"""What an exported file really stores, read back from the file itself (never from what a
converter, quantizer or manifest claims): one record per weight tensor of a convolution, linear
or embedding layer, for ONNX and TFLite files. The exporters read their files back with it, and
``evaluate`` checks a manifest's format and bit width against it; the file is parsed, never
run.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from safeexport.errors import ExportError

ONNX_WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
TFLITE_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL",
                     "TRANSPOSE_CONV", "EMBEDDING_LOOKUP", "GATHER")
# TFLite's tensor type codes (schema.fbs), and the integer ones' widths
FLOAT32, FLOAT16, INT8, INT4, INT2 = 0, 1, 9, 17, 19
INT_WIDTH = {INT8: 8, INT4: 4, INT2: 2}


@dataclass
class StoredWeight:
    """A conv/linear weight as stored in an exported file."""

    name: str
    module: str  # the PyTorch module it came from (``features.0``), as far as names tell
    shape: list[int]
    storage: str  # float32, float16, int8, int4 or int2
    container_bits: int  # bits per stored value
    effective_bits: int  # bits of the smallest two's-complement integer holding its levels
    #                     (= container bits for floats)
    levels: int | None  # most distinct integer levels in one channel (None for floats)
    numel: int
    nnz: int
    zero_scales: int  # channels whose scale is 0 (runtimes such as XNNPACK refuse them)
    sparse: bool = False  # stored as its non-zeros (ONNX: gaps and values), not every entry

    def to_dict(self) -> dict:
        return asdict(self)


def levels_per_channel(q: np.ndarray, axis: int) -> int:
    """The largest number of distinct levels any channel uses."""
    moved = np.moveaxis(q, axis, 0).reshape(q.shape[axis], -1)
    return max((len(np.unique(row)) for row in moved), default=0)


def effective_bits(values: np.ndarray) -> int:
    """Bits of the smallest two's-complement integer holding every level in ``values``
    (−2^(k−1) … 2^(k−1) − 1): a symmetric k-bit code's ±(2^(k−1) − 1) and an asymmetric one's
    extra −2^(k−1) both take k bits, and one level beyond either takes k + 1."""
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    return max(1, (max(hi, -lo - 1)).bit_length() + 1)


def unpack_ints(data: bytes | np.ndarray, count: int, width: int) -> np.ndarray:
    """``count`` int8 values from two's-complement ``width``-bit values (8, 4 or 2) packed
    8 // width per byte, the first in the lowest bits (TFLite's and ONNX's layout)."""
    raw = np.frombuffer(bytes(data), np.uint8)
    if width == 8:
        return raw[:count].view(np.int8)
    mask, per = (1 << width) - 1, 8 // width
    v = np.stack([(raw >> (k * width)) & mask for k in range(per)], axis=1).reshape(-1)
    v = v[:count].astype(np.int16)
    return np.where(v >= 1 << (width - 1), v - (1 << width), v).astype(np.int8)


def record(name: str, module: str, values: np.ndarray, storage: str, axis: int | None = None,
           scale: np.ndarray | None = None, sparse: bool = False) -> StoredWeight:
    """A StoredWeight from decoded values (integer levels for int storage, with their channel
    ``axis`` and scales; floats otherwise)."""
    container = {"float32": 32, "float16": 16, "int8": 8, "int4": 4, "int2": 2}[storage]
    if storage.startswith("int"):
        levels = levels_per_channel(values, axis)
        eff = effective_bits(values)
    else:
        levels, eff = None, container
    zero_scales = 0 if scale is None else int((np.asarray(scale) == 0).sum())
    return StoredWeight(name, module, [int(d) for d in values.shape], storage, container, eff,
                        levels, int(values.size), int(np.count_nonzero(values)), zero_scales,
                        sparse)


# ---------------------------------------------------------------- ONNX


def onnx_module(init_name: str) -> str:
    """The PyTorch module an ONNX weight initializer came from."""
    return init_name.removesuffix(".weight")


def sparse_positions(gaps: np.ndarray) -> np.ndarray:
    """Flat positions of sparsely stored values from their gaps minus one (uint8): position i
    is the sum of the first i + 1 gaps, minus one. The ONNX graph computes the same with
    Cast, Add, CumSum and Sub."""
    return np.cumsum(gaps.astype(np.int64) + 1) - 1


class _OnnxConstants:
    """The constant tensors of an ONNX graph: its initializers, and the tensors that
    ``exporters.onnx_format``'s sparse storage decodes from (gaps, values) initializers. A
    decoding is recognised only node by node, every operand checked (a graph that merely names
    its tensors alike is not decoded), and computed here from the stored arrays."""

    def __init__(self, graph) -> None:
        from onnx import numpy_helper

        self.to_array = numpy_helper.to_array
        self.inits = {i.name: i for i in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}

    def _node(self, name: str, op: str):
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def _init(self, name: str, expect=None) -> np.ndarray | None:
        if name not in self.inits:
            return None
        value = self.to_array(self.inits[name])
        if expect is not None and not np.array_equal(value, np.asarray(expect)):
            return None
        return value

    def stored(self, name: str):
        """(the initializer that stores ``name``, its value, whether it is stored sparse) for a
        plain initializer or a sparse decoding; None for anything else."""
        if name in self.inits:
            return self.inits[name], self._init(name), False
        return self._sparse(name)

    def _sparse(self, name: str):
        from onnx import TensorProto

        cast = self._node(name, "Cast")  # int4: scattered as int8, cast back (int2 is not)
        reshape = self._node(cast.input[0] if cast is not None else name, "Reshape")
        scatter = reshape and self._node(reshape.input[0], "ScatterND")
        zeros = scatter and self._node(scatter.input[0], "ConstantOfShape")
        rows = scatter and self._node(scatter.input[1], "Reshape")
        sub = rows and self._node(rows.input[0], "Sub")
        cumsum = sub and self._node(sub.input[0], "CumSum")
        add = cumsum and self._node(cumsum.input[0], "Add")
        gaps64 = add and self._node(add.input[0], "Cast")
        if not gaps64 or self._init(rows.input[1], [-1, 1]) is None \
                or self._init(sub.input[1], [1]) is None or self._init(add.input[1], [1]) is None \
                or self._init(cumsum.input[1], 0) is None:
            return None
        values_node = self._node(scatter.input[2], "Cast")
        values_name = values_node.input[0] if values_node is not None else scatter.input[2]
        gaps, values = self._init(gaps64.input[0]), self._init(values_name)
        size, shape = self._init(zeros.input[0]), self._init(reshape.input[1])
        fill = next((a.t for a in zeros.attribute if a.name == "value"), None)
        if any(v is None for v in (gaps, values, size, shape)) or gaps.dtype != np.uint8 \
                or fill is None or self.to_array(fill).any() or len(gaps) != len(values) \
                or (cast is not None and _cast_to(cast) != TensorProto.INT4):
            return None
        positions = sparse_positions(gaps)
        if positions.size and positions[-1] >= int(size[0]):
            return None  # the runtime refuses it too
        dense = np.zeros(int(size[0]), values.dtype)
        dense[positions] = values
        return self.inits[values_name], dense.reshape([int(d) for d in shape]), True


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def inspect_onnx(path: Path) -> list[StoredWeight]:
    """Every conv/linear weight of the file as stored (following DequantizeLinear and Cast, and
    sparse storage's decoding)."""
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        raise ExportError(f"{path} is not a valid ONNX file ({e})") from e
    try:
        return _onnx_weights(proto.graph)
    except Exception as e:  # numpy_helper and a malformed graph raise assorted errors
        raise ExportError(f"{path} is not a valid ONNX file ({type(e).__name__}: {e})") \
            from e


def _onnx_weights(graph) -> list[StoredWeight]:
    from onnx import TensorProto, numpy_helper

    constants = _OnnxConstants(graph)
    inits, producer = constants.inits, constants.producer
    out, seen = [], set()
    for node in graph.node:
        if node.op_type not in ONNX_WEIGHT_OPS or len(node.input) < 2:
            continue
        name = node.input[1]
        if name in seen:
            continue
        seen.add(name)
        src = producer.get(name)
        plain = constants.stored(name)
        inner = constants.stored(src.input[0]) if plain is None and src is not None \
            and src.op_type in ("Cast", "DequantizeLinear") else None
        if plain is not None:
            if plain[1].ndim >= 2:
                out.append(record(name, onnx_module(name), plain[1], "float32",
                                  sparse=plain[2]))
        elif inner is not None and src.op_type == "Cast":
            out.append(record(name, onnx_module(name), inner[1], "float16", sparse=inner[2]))
        elif inner is not None and src.input[1] in inits:
            x, q, sparse = inner
            scale = numpy_helper.to_array(inits[src.input[1]])
            axis = next((a.i for a in src.attribute if a.name == "axis"), 1)
            storage = {TensorProto.INT4: "int4", TensorProto.INT2: "int2"}.get(x.data_type,
                                                                               "int8")
            out.append(record(name, onnx_module(name), q.astype(np.int8), storage,
                              axis % q.ndim, scale, sparse))
    return out


# ---------------------------------------------------------------- TFLite


def read_tflite(data: bytes):
    """The TFLite flatbuffer as LiteRT's object model (parsed, not run)."""
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))


def tflite_opname(model, op) -> str:
    from ai_edge_litert.tools import flatbuffer_utils

    return flatbuffer_utils.opcode_to_name(model, op.opcodeIndex) or ""


def module_of(tensor_name: str) -> str:
    """The PyTorch module path in a litert-torch tensor name: the attribute names after each
    ``Class_attr`` scope segment (``…Sequential_features/…Conv2d_0;1`` → ``features.0``). Fused
    names list several modules separated by ';'; the weight's own (conv/linear) one is last."""
    paths = []
    for part in tensor_name.split(";"):
        segs = [s.rsplit(".", 1)[-1] for s in part.split("/")[1:]]
        attrs = [s.split("_", 1)[1] for s in segs if "_" in s]
        if attrs:
            paths.append(".".join(attrs))
    return paths[-1] if paths else tensor_name


def tflite_weights(model):
    """(op, weight tensor index, stored tensor index) per conv/linear/embedding weight: the
    stored tensor is the constant itself or the input of the DEQUANTIZE feeding it (or of the
    DENSIFY feeding that DEQUANTIZE)."""
    sg = model.subgraphs[0]
    producer = {o: op for op in sg.operators for o in op.outputs}
    out = []
    for op in sg.operators:
        name = tflite_opname(model, op)
        if name not in TFLITE_WEIGHT_OPS or len(op.inputs) < 2:
            continue
        idx = op.inputs[0] if name == "GATHER" else op.inputs[1]  # GATHER(params, indices)
        stored = idx
        for step in ("DEQUANTIZE", "DENSIFY"):  # sparse storage: DENSIFY feeds the DEQUANTIZE
            src = producer.get(stored)
            if src is not None and tflite_opname(model, src) == step:
                stored = src.inputs[0]
        buf = model.buffers[sg.tensors[stored].buffer]
        if buf.data is not None and len(buf.data) > 0:
            out.append((op, idx, stored))
    return out


def _densify(sparsity, values: np.ndarray, shape: list[int]) -> np.ndarray | None:
    """The dense tensor of TFLite sparse storage in the layouts exporters.tflite_format
    writes (no blocks; in some traversal order, every dimension dense but the last, which is
    CSR); None for any other layout or inconsistent arrays."""
    from ai_edge_litert import schema_py_generated as fb

    dims = sparsity.dimMetadata or []
    order = [] if sparsity.traversalOrder is None else [int(d) for d in sparsity.traversalOrder]
    blocks = sparsity.blockMap is not None and len(sparsity.blockMap) > 0
    if not shape or sorted(order) != list(range(len(shape))) or blocks \
            or len(dims) != len(shape) \
            or any(d.format != fb.DimensionType.DENSE or d.denseSize != shape[k]
                   for d, k in zip(dims[:-1], order[:-1], strict=True)) \
            or dims[-1].format != fb.DimensionType.SPARSE_CSR \
            or dims[-1].arraySegments is None or dims[-1].arrayIndices is None:
        return None
    segments = np.asarray(dims[-1].arraySegments.values, np.int64)
    columns = np.asarray(dims[-1].arrayIndices.values, np.int64)
    width = shape[order[-1]]
    rows = int(np.prod(shape)) // width if width else 0
    if len(segments) != rows + 1 or segments[0] != 0 or np.any(np.diff(segments) < 0) \
            or segments[-1] != len(values) or len(columns) != len(values) \
            or (columns.size and (columns.min() < 0 or columns.max() >= width)):
        return None
    dense = np.zeros((rows, width), values.dtype)
    dense[np.repeat(np.arange(rows), np.diff(segments)), columns] = values
    return dense.reshape([shape[k] for k in order]).transpose(np.argsort(order))


def tflite_stored(model) -> list[tuple]:
    """(name, values, storage, channel axis, scales, sparse) per conv/linear/embedding weight of
    a parsed TFLite model, as ``record`` takes them: the values decoded from the stored bytes
    (integer levels for int storage; a sparse tensor densified)."""
    tensors = model.subgraphs[0].tensors
    # a sparse weight's quantization is on the dense tensor its DENSIFY gives
    densified = {op.inputs[0]: tensors[op.outputs[0]] for op in model.subgraphs[0].operators
                 if tflite_opname(model, op) == "DENSIFY"}
    out = []
    for _, idx, stored in tflite_weights(model):
        t = tensors[stored]
        raw = bytes(model.buffers[t.buffer].data)
        shape = [int(s) for s in t.shape]
        name = (tensors[idx].name or b"").decode()
        if t.type in (FLOAT32, FLOAT16) and t.sparsity is None:
            storage = "float32" if t.type == FLOAT32 else "float16"
            out.append((name, np.frombuffer(raw, storage).reshape(shape), storage, None, None,
                        False))
        elif t.type == INT8 and t.sparsity is not None:
            q = _densify(t.sparsity, np.frombuffer(raw, np.int8), shape)
            quant = densified[stored].quantization if stored in densified else None
            if q is not None and quant is not None and quant.scale is not None:
                out.append((name, q, "int8", quant.quantizedDimension, np.asarray(quant.scale),
                            True))
        elif t.type in INT_WIDTH and t.sparsity is None:
            q = unpack_ints(raw, int(np.prod(shape)), INT_WIDTH[t.type])
            out.append((name, q.reshape(shape), f"int{INT_WIDTH[t.type]}",
                        t.quantization.quantizedDimension, np.asarray(t.quantization.scale),
                        False))
    return out


def inspect_tflite(path: Path) -> list[StoredWeight]:
    """Every conv/linear/embedding weight of the file as stored."""
    try:
        return [record(name, module_of(name), values, storage, axis, scale, sparse=sparse)
                for name, values, storage, axis, scale, sparse
                in tflite_stored(read_tflite(Path(path).read_bytes()))]
    except Exception as e:  # flatbuffers and a malformed graph raise assorted errors
        raise ExportError(f"{path} is not a valid TFLite file ({type(e).__name__}: {e})") \
            from e


# ---------------------------------------------------------------- a file against its claims


def file_format(path: Path) -> str:
    """onnx or tflite, from the file's bytes (a TFLite flatbuffer names itself TFL3)."""
    with open(path, "rb") as f:
        head = f.read(8)
    return "tflite" if head[4:8] == b"TFL3" else "onnx"


INSPECT = {"onnx": inspect_onnx, "tflite": inspect_tflite}


def width_problems(stored: list[StoredWeight], bits: int) -> list[str]:
    """How weights as stored contradict a ``bits``-bit file: 32 bits hold float32 only; 16
    bits float16 and no integers; 8 bits and fewer integer weights whose levels fit ``bits``
    (a layer kept in float beside them is allowed)."""
    ints = [w for w in stored if w.storage.startswith("int")]
    problems = [f"{w.module} holds {w.levels} levels per channel, more than {bits} bits allow"
                for w in ints if w.effective_bits > bits]
    if bits <= 8 and not ints:
        problems.append("no weight is stored as an integer: the model is in float")
    if bits >= 16:
        problems += [f"{w.module} is stored as {w.storage} in a {bits}-bit file" for w in stored
                     if w.storage.startswith("int") or (bits == 32 and w.storage == "float16")]
    if bits == 16 and not any(w.storage == "float16" for w in stored):
        problems.append("no weight is stored as float16")
    return problems


def storage_problems(path: Path, fmt: str, bits: int) -> list[str]:
    """How the file at ``path`` contradicts a claim that it is ``fmt`` at ``bits`` bits (empty:
    it does not): its format, then its weights (``width_problems``)."""
    actual = file_format(path)
    if actual != fmt:
        return [f"the file is {actual}, not {fmt}"]
    return width_problems(INSPECT[fmt](path), bits)
