"""The ``adb`` runtime: run an exported file on an Android phone through the real ``adb`` client.

Every step is an argv list (never a host shell string); what runs on the phone is a command of
fixed words and paths this module generates, each quoted. Per model: pick the device, check its
ABI, free space and runner, make a work directory under /data/local/tmp and push the model. Per
chunk of inputs: push them, run the device-side runner, pull the outputs and validate them
(sha256 computed on the phone, size/shape, finite values). The work directory is removed when
the runtime closes and after any failure; a step that times out is killed on the phone too.

Runners: LiteRT's ``benchmark_model`` binary (.tflite; one invocation per input batch, driven by
a pushed shell loop) or ``python`` (``device_runner.py`` with the phone's python3).
"""

import hashlib
import secrets
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from safeexport import names
from safeexport.errors import DeviceError
from safeexport.runtimes import RUNTIMES, Runtime, RuntimeInfo, from_interface, to_interface

REMOTE_ROOT = "/data/local/tmp"
RUNNER_SCRIPT = Path(__file__).with_name("device_runner.py")
# ELF e_machine → Android ABIs that run it
ELF_ABIS = {183: ("arm64-v8a",), 40: ("armeabi-v7a", "armeabi"), 62: ("x86_64",), 3: ("x86",)}
# benchmark_model, once per input file; prints the sha256 of every output for the host to check
LOOP = """cd "$1" || exit 4
for f in in/*.bin; do
  n=${f#in/}
  "$2" --graph=model.tflite --input_layer="$3" --input_layer_shape="$4" \\
    --input_layer_value_files="$3:$f" --output_filepath="out/$n" --num_runs=1 \\
    > log.txt 2>&1 || { tail -n 3 log.txt; exit 3; }
done
sha256sum out/*.bin
"""


class AdbTimeout(DeviceError):
    """A step on the device did not finish in time."""


class Adb:
    """The adb client bound to one device."""

    def __init__(self, adb: str, serial: str | None, timeout: float) -> None:
        exe = shutil.which(adb)
        if exe is None:
            raise DeviceError(f"adb is not installed (no {adb!r} on PATH); install Android "
                              "platform-tools (Debian/Ubuntu: apt install adb) or pass "
                              "--adb /path/to/adb")
        self.exe, self.timeout, self.serial = exe, timeout, None
        self.serial = self._select(serial)

    def run(self, *args: str, timeout: float | None = None) -> str:
        """stdout of ``adb [-s SERIAL] ARGS``; a failure raises DeviceError with adb's words."""
        argv = [self.exe, *(["-s", self.serial] if self.serial else []), *args]
        try:
            r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired as e:
            raise AdbTimeout(f"adb {args[0]} did not finish within {timeout or self.timeout:g}s "
                             "(raise --timeout for a slow phone)") from e
        if r.returncode != 0:
            # adb prints some errors on stdout, followed by a summary ("0 files pushed")
            said = f"{r.stderr}\n{r.stdout}".strip().splitlines() or [f"exit {r.returncode}"]
            text = next((line for line in reversed(said) if "error" in line.lower()), said[-1])
            if "No space left" in r.stderr + r.stdout:
                raise DeviceError(f"no space left on device {self.serial} ({text}); free space "
                                  f"in {REMOTE_ROOT} or lower --chunk")
            raise DeviceError(f"adb {args[0]} failed on {self.serial}: {text}")
        return r.stdout

    def shell(self, *words: str, timeout: float | None = None) -> str:
        """Run a command of ``words`` on the device, each word quoted for the device's shell."""
        return self.run("shell", " ".join(shlex.quote(w) for w in words), timeout=timeout)

    def _select(self, serial: str | None) -> str:
        listed = {}
        for line in self.run("devices").splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2 and not line.startswith("*"):
                listed[parts[0]] = parts[1]
        if not listed:
            raise DeviceError("no Android device is connected (`adb devices` lists none); "
                              "connect a phone with USB debugging on, or `adb connect HOST:PORT`")
        if serial is None:
            if len(listed) > 1:
                raise DeviceError(f"several devices are connected ({', '.join(listed)}); choose "
                                  "one with --serial")
            serial = next(iter(listed))
        if serial not in listed:
            raise DeviceError(f"device {serial} is not connected (`adb devices` lists "
                              f"{', '.join(listed)}); check --serial")
        state = listed[serial]
        if state == "unauthorized":
            raise DeviceError(f"device {serial} is unauthorized: unlock the phone and accept "
                              "the 'Allow USB debugging' prompt, then retry")
        if state != "device":
            raise DeviceError(f"device {serial} is {state}: reconnect it (or run `adb "
                              "reconnect`) until `adb devices` shows it as 'device'")
        return serial

    def abis(self) -> list[str]:
        """The ABIs the device runs, best first."""
        return self.shell("getprop", "ro.product.cpu.abilist").strip().split(",")

    def free_bytes(self, path: str) -> int:
        """Bytes available to the filesystem holding ``path`` (``df -k``)."""
        lines = self.shell("df", "-k", path).strip().splitlines()
        try:
            return int(lines[-1].split()[3]) * 1024
        except (IndexError, ValueError) as e:
            raise DeviceError(f"cannot read free space on {self.serial} from df: "
                              f"{lines[-1] if lines else 'no output'}") from e


def _elf_abis(binary: Path) -> tuple[str, ...]:
    head = binary.read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise DeviceError(f"{binary} is not an executable for Android (no ELF header)")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_ABIS.get(machine, (f"e_machine {machine}",))


class AdbSession:
    """A model pushed to a device work directory, and the runner that executes it."""

    def __init__(self, path: Path, threads: int, serial: str | None, adb: str, runner: str,
                 runner_path: str | None, runner_binary: str | None, timeout: float) -> None:
        if runner == "benchmark_model" and path.suffix != ".tflite":
            raise DeviceError(f"benchmark_model runs .tflite files, not {path.name}; use "
                              "--runner python for ONNX")
        self.dev = Adb(adb, serial, timeout)
        self.path, self.threads, self.runner = path, threads, runner
        self.work = f"{REMOTE_ROOT}/safeexport-{secrets.token_hex(6)}"
        self.closed = False
        if runner == "benchmark_model":
            self.details = self._host_details(path)
        free = self.dev.free_bytes(REMOTE_ROOT)
        need = 2 * path.stat().st_size + (16 << 20)
        if free < need:
            raise DeviceError(f"no space left on device {self.dev.serial}: {free >> 20} MiB "
                              f"free in {REMOTE_ROOT}, {need >> 20} MiB needed; free space "
                              "on the phone")
        self.dev.shell("mkdir", "-p", self.work)
        try:
            self.dev.run("push", str(path), f"{self.work}/model{path.suffix}")
            self.exe = self._prepare_runner(runner_path, runner_binary)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _host_details(path: Path) -> tuple[dict, dict]:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(path))
        return interp.get_input_details()[0], interp.get_output_details()[0]

    def _prepare_runner(self, runner_path: str | None, runner_binary: str | None) -> str:
        if self.runner == "python":
            exe = runner_path or "python3"
            try:
                self.dev.shell(exe, "-c", "import numpy")
            except DeviceError as e:
                raise DeviceError(f"runner missing: {exe} with numpy does not run on "
                                  f"{self.dev.serial} ({e}); install Termux's python and numpy "
                                  "plus ai-edge-litert or onnxruntime, or use --runner "
                                  "benchmark_model") from e
            self.dev.run("push", str(RUNNER_SCRIPT), f"{self.work}/device_runner.py")
            return exe
        if runner_binary:
            binary = Path(runner_binary)
            if not binary.is_file():
                raise DeviceError(f"--runner-binary {binary} does not exist")
            built, device = _elf_abis(binary), self.dev.abis()
            if not set(built) & set(device):
                raise DeviceError(f"wrong ABI: {binary.name} is built for {', '.join(built)}, "
                                  f"device {self.dev.serial} runs {', '.join(device)}; use the "
                                  f"benchmark_model build for {device[0]}")
            exe = f"{self.work}/benchmark_model"
            self.dev.run("push", str(binary), exe)
            self.dev.shell("chmod", "755", exe)
        else:
            exe = runner_path or f"{REMOTE_ROOT}/benchmark_model"
            found = self.dev.shell("sh", "-c", 'test -x "$1" && echo yes || echo no', "sh", exe)
            if "yes" not in found:
                raise DeviceError(f"runner missing: no executable {exe} on {self.dev.serial}; "
                                  "push LiteRT's benchmark_model for the phone's ABI there, "
                                  "pass --runner-binary PATH to push one, or use --runner "
                                  "python")
        script = Path(tempfile.mkdtemp()) / "run.sh"
        try:
            script.write_text(LOOP)
            self.dev.run("push", str(script), f"{self.work}/run.sh")
        finally:
            shutil.rmtree(script.parent, ignore_errors=True)
        return exe

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits of ``x`` computed on the device."""
        try:
            with tempfile.TemporaryDirectory() as d:
                return (self._python(x, Path(d)) if self.runner == "python"
                        else self._benchmark(x, Path(d)))
        except AdbTimeout as e:
            self._kill()
            self.close()
            raise DeviceError(f"{e}; the runner was killed on the device and {self.work} "
                              "removed") from e
        except BaseException:
            self.close()
            raise

    def _python(self, x: np.ndarray, tmp: Path) -> np.ndarray:
        np.save(tmp / "in.npy", x)
        self.dev.run("push", str(tmp / "in.npy"), f"{self.work}/in.npy")
        said = self.dev.shell(self.exe, f"{self.work}/device_runner.py",
                              f"{self.work}/model{self.path.suffix}", f"{self.work}/in.npy",
                              f"{self.work}/out.npy", str(self.threads))
        self.dev.run("pull", f"{self.work}/out.npy", str(tmp / "out.npy"))
        digest = said.strip().splitlines()[-1] if said.strip() else ""
        _check_digest(tmp / "out.npy", digest)
        y = np.load(tmp / "out.npy", allow_pickle=False)
        return _check_logits(y, len(x))

    def _benchmark(self, x: np.ndarray, tmp: Path) -> np.ndarray:
        inp, out = self.details
        batch = int(inp["shape"][0])
        n = len(x)
        if n % batch:
            x = np.concatenate([x, np.repeat(x[-1:], batch - n % batch, axis=0)])
        x = to_interface(x, inp)
        (tmp / "in").mkdir()
        names = [f"{i:06d}.bin" for i in range(len(x) // batch)]
        for i, name in enumerate(names):
            (tmp / "in" / name).write_bytes(x[i * batch:(i + 1) * batch].tobytes())
        self.dev.shell("rm", "-rf", f"{self.work}/in", f"{self.work}/out")
        self.dev.shell("mkdir", "-p", f"{self.work}/out")
        self.dev.run("push", str(tmp / "in"), f"{self.work}/in")
        said = self.dev.shell("sh", f"{self.work}/run.sh", self.work, self.exe,
                              inp["name"], ",".join(str(int(d)) for d in inp["shape"]))
        self.dev.run("pull", f"{self.work}/out", str(tmp))
        digests = {Path(line.split()[-1]).name: line.split()[0]
                   for line in said.strip().splitlines() if len(line.split()) == 2}
        rows, per = [], int(np.prod(out["shape"]))
        for name in names:
            f = tmp / "out" / name
            _check_digest(f, digests.get(name, ""))
            y = np.frombuffer(f.read_bytes(), out["dtype"])
            if y.size != per:
                raise DeviceError(f"benchmark_model wrote {y.size} values for {name}, "
                                  f"expected {per} ({list(out['shape'])})")
            rows.append(from_interface(y, out).reshape(out["shape"]))
        return _check_logits(np.concatenate(rows)[:n], n)

    def _kill(self) -> None:
        try:
            self.dev.shell("pkill", "-f", self.work, timeout=30)
        except DeviceError:
            pass  # nothing left to kill

    def close(self) -> None:
        """Remove the work directory from the device (once; errors are not fatal here)."""
        if self.closed:
            return
        self.closed = True
        try:
            self.dev.shell("rm", "-rf", self.work, timeout=60)
        except DeviceError:
            pass


def _check_digest(path: Path, expected: str) -> None:
    if not path.exists():
        raise DeviceError(f"the device runner wrote no {path.name}")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != expected:
        raise DeviceError(f"{path.name} changed between the phone and this machine (sha256 "
                          f"{actual[:12]} here, {expected[:12] or 'none'} on the device)")


def _check_logits(y: np.ndarray, n: int) -> np.ndarray:
    if y.ndim != 2 or len(y) != n:
        raise DeviceError(f"the device returned logits of shape {list(y.shape)} for {n} inputs")
    if not np.isfinite(y).all():
        raise DeviceError("the device returned non-finite logits")
    return y.astype(np.float32)


def _open_adb(path: Path, threads: int, serial: str | None = None, adb: str = "adb",
              runner: str = "benchmark_model", runner_path: str | None = None,
              runner_binary: str | None = None, timeout: float = 300.0) -> Runtime:
    session = AdbSession(path, threads, serial, adb, runner, runner_path, runner_binary,
                         timeout)
    version = session.dev.run("version").splitlines()[0].strip()
    return Runtime("adb", f"{version}; device {session.dev.serial}; runner {runner}", threads,
                   None, session, session.close)


RUNTIMES.register("adb", RuntimeInfo(_open_adb, (".tflite", ".onnx")))
RUNTIMES.check((*names.HOST_RUNTIMES, "adb"))  # what `evaluate --runtime` takes, but auto
