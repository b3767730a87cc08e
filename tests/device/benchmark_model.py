#!/usr/bin/env python3
"""A stand-in for LiteRT's benchmark_model binary, pushed to the emulated phone as
/data/local/tmp/benchmark_model: it takes the flags device_eval passes (--graph, --input_layer,
--input_layer_shape, --input_layer_value_files, --output_filepath, --num_runs) and runs the
graph with the phone's arm64 LiteRT interpreter. It proves the benchmark_model runner's flags,
files and shell loop on the device, not the real binary (none is built for this rig)."""

import sys

import numpy as np
from ai_edge_litert.interpreter import Interpreter


def main() -> None:
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    interp = Interpreter(model_path=flags["graph"])
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    name, path = flags["input_layer_value_files"].split(":", 1)
    shape = [int(d) for d in flags["input_layer_shape"].split(",")]
    if name != flags["input_layer"] or name != inp["name"] or shape != list(inp["shape"]):
        sys.exit(f"input layer {name} {shape} does not match {inp['name']} {inp['shape']}")
    with open(path, "rb") as f:
        x = np.frombuffer(f.read(), inp["dtype"]).reshape(shape)
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    with open(flags["output_filepath"], "wb") as f:
        f.write(interp.get_tensor(out["index"]).tobytes())


if __name__ == "__main__":
    main()
