"""Runtimes: callables ``logits = runtime(inputs)``, registered by name with the model-file
suffixes they run (``auto`` picks by suffix: torch for a run's .safetensors, onnxruntime for
.onnx, the LiteRT interpreter for .tflite; device_eval adds ``adb`` for a phone).

They live in the shared core because two stages run exported files: the exporters check every
file in its own runtime, and device_eval re-runs the attacks through the same callables, so the
figures of both stages come from one code path. A runtime takes a numpy batch of any size (it
chunks and pads to the file's batch size), quantizes the input and dequantizes the output when
the file's interface is integer, and returns float32 logits.
"""

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safeexport import names
from safeexport.console import quiet
from safeexport.errors import DeviceError
from safeexport.registry import Registry


@dataclass
class Runtime:
    """A loaded model file: ``run(batch) -> logits`` for batches of exactly ``batch_size`` (None:
    any size), plus what a report needs to say which engine produced the figures."""

    name: str
    version: str
    threads: int
    batch_size: int | None
    run: Callable[[np.ndarray], np.ndarray]
    close: Callable[[], None] = lambda: None  # release what the runtime holds (a phone's files)

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, inputs: np.ndarray, chunk: int = 256,
                 progress: Callable[[int], None] | None = None) -> np.ndarray:
        """float32 logits for every row of ``inputs``."""
        size = self.batch_size or chunk
        out = []
        for s in range(0, len(inputs), size):
            batch = inputs[s:s + size]
            n = len(batch)
            if self.batch_size and n < size:  # fixed-batch file: pad the last batch
                batch = np.concatenate([batch, np.repeat(batch[-1:], size - n, axis=0)])
            out.append(np.asarray(self.run(batch), np.float32)[:n])
            if progress is not None:
                progress(n)
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class RuntimeInfo:
    """How to open a model file (``open(path, threads, **options)``) and which suffixes;
    ``native``: it parses the file with native code inside this process, where a crash on a
    damaged or hostile file would end the tool without a word (see ``probe_in_child``)."""

    open: Callable[..., Runtime]
    suffixes: tuple[str, ...]
    native: bool = False


RUNTIMES: Registry[RuntimeInfo] = Registry("runtime")


def _threads(threads: int | None) -> int:
    return threads or min(4, os.cpu_count() or 1)


def _open_onnx(path: Path, threads: int) -> Runtime:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types on a bad file
        raise DeviceError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0]}") from e
    inp = sess.get_inputs()[0]
    dim = inp.shape[0]
    return Runtime("onnxruntime", ort.__version__, threads,
                   dim if isinstance(dim, int) else None,
                   lambda x: sess.run(None, {inp.name: x})[0])


def to_interface(x: np.ndarray, detail: dict) -> np.ndarray:
    """Inputs in a TFLite input's dtype; an integer interface (static int8) is quantized with
    the tensor's scale and zero point."""
    scale, zero = detail["quantization"]
    if scale:
        info = np.iinfo(detail["dtype"])
        x = np.clip(np.rint(x / scale + zero), info.min, info.max)
    return x.astype(detail["dtype"])


def from_interface(y: np.ndarray, detail: dict) -> np.ndarray:
    """float32 values of a TFLite output (dequantized when its interface is integer)."""
    scale, zero = detail["quantization"]
    return (y.astype(np.float32) - zero) * scale if scale else y.astype(np.float32)


def _open_tflite(path: Path, threads: int) -> Runtime:
    from importlib.metadata import version

    from ai_edge_litert.interpreter import Interpreter

    try:
        with quiet():  # LiteRT logs its delegate choice on stderr
            interp = Interpreter(model_path=str(path), num_threads=threads)
            interp.allocate_tensors()
    except Exception as e:  # the interpreter raises ValueError/RuntimeError on a bad file
        raise DeviceError(f"LiteRT cannot load {path}: {str(e).splitlines()[0]}") from e
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]

    def run(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp["index"], to_interface(x, inp))
        interp.invoke()
        return from_interface(interp.get_tensor(out["index"]), out)

    return Runtime("litert", version("ai-edge-litert"), threads, int(inp["shape"][0]), run)


def _open_torch(path: Path, threads: int) -> Runtime:
    """A run's own PyTorch model (the architecture from model.json beside the weights)."""
    from safeexport.rundir import RunDir
    from safeexport.runio import load_model

    return torch_runtime(load_model(RunDir(path.parent), path))


def torch_runtime(model) -> Runtime:
    """A loaded PyTorch model (eval mode, CPU) as a runtime."""
    import torch

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).float().numpy()

    return Runtime("torch", torch.__version__, torch.get_num_threads(), None, run)


RUNTIMES.register("torch", RuntimeInfo(_open_torch, (".safetensors",)))
RUNTIMES.register("onnxruntime", RuntimeInfo(_open_onnx, (".onnx",), native=True))
RUNTIMES.register("tflite", RuntimeInfo(_open_tflite, (".tflite",), native=True))
RUNTIMES.check(names.HOST_RUNTIMES)


def probe_in_child(path: Path, runtime: str, sample: np.ndarray, timeout: float) -> None:
    """Load ``path`` in ``runtime`` and run ``sample`` through it in a child process, so that
    a native crash (an abort inside the runtime on a damaged file) is reported as an error with
    the runtime's own last words instead of killing this process silently."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "sample.npy", sample)
        try:
            r = subprocess.run([sys.executable, "-m", "safeexport.probe", str(path), runtime,
                                str(Path(tmp) / "sample.npy")],
                               capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise DeviceError(f"{runtime} did not finish loading and running {path} within "
                              f"{timeout:g} s (--timeout)") from e
    if r.returncode == 0:
        return
    said = [line for line in r.stderr.splitlines() if line.strip()]
    if r.returncode < 0:
        try:
            how = signal.Signals(-r.returncode).name
        except ValueError:
            how = f"signal {-r.returncode}"
        raise DeviceError(f"the runtime crashed loading {path} ({runtime}, {how}): "
                          f"{' / '.join(said[-3:]) or 'it printed nothing'}")
    raise DeviceError(said[-1].removeprefix("error: ") if said else
                      f"{runtime} failed on {path} (exit status {r.returncode})")


def open_runtime(path: Path, runtime: str = "auto", threads: int | None = None,
                 probe: np.ndarray | None = None, probe_timeout: float = 300.0,
                 **options) -> Runtime:
    """Open a model file in ``runtime`` (``auto``: the first registered for its suffix). With
    ``probe`` (a sample input), a native runtime first loads and runs the file in a child
    process (``probe_in_child``, at most ``probe_timeout`` s): use it for files from
    elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise DeviceError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    if runtime == "auto":
        names = [n for n in RUNTIMES.names() if suffix in RUNTIMES.get(n).suffixes]
        if not names:
            known = sorted({s for n in RUNTIMES.names() for s in RUNTIMES.get(n).suffixes})
            raise DeviceError(f"no runtime runs {suffix or 'suffix-less'} files ({path}); "
                              f"model files end in {', '.join(known)}")
        runtime = names[0]
    info = RUNTIMES.get(runtime)
    if suffix not in info.suffixes:
        raise DeviceError(f"runtime {runtime} runs {', '.join(info.suffixes)} files, not "
                          f"{path.name}")
    if probe is not None and info.native:
        probe_in_child(path, runtime, probe, probe_timeout)
    return info.open(path, _threads(threads), **options)
