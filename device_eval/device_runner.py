"""Device-side runner, pushed to the phone and run there with its own python3 (e.g. Termux with
numpy and ai-edge-litert or onnxruntime installed):

    python3 device_runner.py MODEL INPUTS.npy OUTPUTS.npy THREADS

It writes float32 logits for every input row and prints the output file's sha256, which the host
checks after pulling it. It is self-contained on purpose (safeexport is not installed on the
phone), so it repeats the host runtimes' two interface rules: pad the last batch of a
fixed-batch file, and quantize/dequantize an integer (static int8) interface.
"""

import hashlib
import sys

import numpy as np


def _onnx(model: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    return batch, lambda x: sess.run(None, {inp.name: x})[0]


def _tflite(model: str, threads: int):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older phones: the tflite-runtime wheel
        from tflite_runtime.interpreter import Interpreter
    interp = Interpreter(model_path=model, num_threads=threads)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(x):
        scale, zero = inp["quantization"]
        if scale:
            info = np.iinfo(inp["dtype"])
            x = np.clip(np.rint(x / scale + zero), info.min, info.max)
        interp.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interp.invoke()
        y = interp.get_tensor(out["index"])
        oscale, ozero = out["quantization"]
        return (y.astype(np.float32) - ozero) * oscale if oscale else y

    return int(inp["shape"][0]), run


def main() -> None:
    model, inputs, outputs, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = np.load(inputs, allow_pickle=False)
    batch, run = (_onnx if model.endswith(".onnx") else _tflite)(model, threads)
    size = batch or len(x)
    chunks = []
    for s in range(0, len(x), size):
        b = x[s:s + size]
        n = len(b)
        if n < size:
            b = np.concatenate([b, np.repeat(b[-1:], size - n, axis=0)])
        chunks.append(np.asarray(run(b), np.float32)[:n])
    np.save(outputs, np.concatenate(chunks))
    with open(outputs, "rb") as f:
        print(hashlib.sha256(f.read()).hexdigest())


if __name__ == "__main__":
    main()
