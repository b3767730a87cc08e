"""device_eval's adb runtime against the emulated arm64 phone: the real adb client and server,
the stand-in adbd (tests/device/adbd.py), and on the "phone" arm64 dash, python3, numpy,
onnxruntime and LiteRT under qemu-user. Exported files run there must give the host's argmax
and membership decisions; every failure path must say what went wrong and leave nothing on the
device."""

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from device_eval import evaluate
from device_eval.adb import Adb
from device_eval.config import EvalConfig
from safeexport.attacks.final import final_membership
from safeexport.errors import DeviceError
from safeexport.runio import inputs_of, load_data, open_run
from safeexport.runtimes import open_runtime
from tests.device.rig import Device
from tests.test_compress import cli

HERE = Path(__file__).parent
FLOAT_TFLITE = "model-tflite-w32-weight-only.tflite"


def _exp(run: Path, name: str) -> Path:
    return run / "exports" / name


def _device_state(serial: str) -> tuple[str, str]:
    """(work directories left in /data/local/tmp, processes still running from them)."""
    adb = Adb("adb", serial, 60)
    left = adb.shell("sh", "-c", "ls -d /data/local/tmp/safeexport-* 2>/dev/null; true")
    procs = adb.shell("sh", "-c", "pgrep -af '[s]afeexport-'; true")
    return left.strip(), procs.strip()


def _decisions(logits: np.ndarray, run: Path) -> tuple[np.ndarray, dict]:
    """The final attacker's membership decisions and metrics on these logits (all samples)."""
    rd = open_run(run)
    ds, splits = load_data(rd)
    rc = rd.read_config()["config"]
    res = final_membership(lambda idx: logits[idx], ds.y, splits, ds.num_classes, rc["attack"],
                           rc["final_attack_epochs"], rc["seed"], "compressed",
                           torch.device("cpu"))
    return res.scores > 0.5, res.metrics


def _compare(run: Path, name: str, serial: str, runner: str, record, rows: int | None = None
             ) -> None:
    """Same file, same inputs: logits from the phone against the host runtime's, recorded
    (``record_property``) for the tier's summary table."""
    path = _exp(run, name)
    ds, _ = load_data(open_run(run))
    x = inputs_of(ds, np.arange(rows or len(ds.y)))
    with open_runtime(path) as host:
        want = host(x)
    with open_runtime(path, "adb", serial=serial, runner=runner, timeout=300) as phone:
        assert phone.name == "adb" and serial in phone.version
        got = phone(x, chunk=len(x))
    diff = float(np.abs(got - want).max())
    argmax = float((got.argmax(1) == want.argmax(1)).mean())
    membership = "-"
    if rows is None:  # the attack needs every sample
        (dec_got, m_got), (dec_want, m_want) = _decisions(got, run), _decisions(want, run)
        membership = float((dec_got == dec_want).mean())
        assert membership == 1.0
        assert m_got["mia_acc"] == m_want["mia_acc"]
    record("comparison", (name, runner, len(x), diff, argmax, membership))
    assert argmax == 1.0
    assert diff < 1e-3 * max(1.0, float(np.abs(want).max()))
    assert _device_state(serial) == ("", "")


@pytest.mark.parametrize("name", ["model-onnx-w32-weight-only.onnx",
                                  "model-onnx-w8-weight-only.onnx", FLOAT_TFLITE,
                                  "model-tflite-w8-static.tflite"])
def test_python_runner_on_the_phone_matches_the_host(run, phone, name, record_property):
    _compare(run, name, phone.serial, "python", record_property)


@pytest.mark.parametrize("name", [FLOAT_TFLITE, "model-tflite-w8-static.tflite"])
def test_benchmark_model_runner_on_the_phone_matches_the_host(run, phone, name,
                                                             record_property):
    adb = Adb("adb", phone.serial, 60)
    adb.run("push", str(HERE / "benchmark_model.py"), "/data/local/tmp/benchmark_model")
    adb.shell("chmod", "755", "/data/local/tmp/benchmark_model")
    try:
        # one invocation per batch of 25: 50 inputs keep the emulated imports to two
        _compare(run, name, phone.serial, "benchmark_model", record_property, rows=50)
    finally:
        adb.shell("rm", "-f", "/data/local/tmp/benchmark_model")


def test_evaluate_cli_over_adb_matches_the_host(run, phone, tmp_path):
    """`safeexport evaluate --runtime adb` end to end: the same figures as on the host."""
    path = _exp(run, "model-onnx-w8-weight-only.onnx")
    host = evaluate(path, EvalConfig(), json_out=tmp_path / "host.json").report
    r = cli("evaluate", path, "--runtime", "adb", "--runner", "python", "--serial",
            phone.serial, "--chunk", "1024", "--json", tmp_path / "adb.json")
    dev = json.loads((tmp_path / "adb.json").read_text())
    assert dev["runtime"]["name"] == "adb" and phone.serial in dev["runtime"]["version"]
    for key in ("task_acc", "mia_acc", "auc"):
        assert dev["after"][key] == pytest.approx(host["after"][key], abs=1e-6), key
    outcome = dev["verdict"]["outcome"]
    assert outcome == host["verdict"]["outcome"]
    assert r.returncode == {"PASS": 0, "FAIL": 1, "INCONCLUSIVE": 3}[outcome], r.stderr
    assert _device_state(phone.serial) == ("", "")


def _fails(run: Path, pattern: str, name: str = FLOAT_TFLITE, **kw) -> None:
    cfg = EvalConfig(**{"runtime": "adb", "timeout": 60, "chunk": 1024, **kw})
    with pytest.raises(DeviceError, match=pattern):
        evaluate(_exp(run, name), cfg, run)


def test_device_selection_errors(run, phones, adb_env):
    _fails(run, "adb is not installed .*--adb", adb="no-such-adb")
    _fails(run, "no Android device is connected")
    locked = phones("unauthorized")
    _fails(run, f"{locked.serial} is unauthorized: .*Allow USB debugging")
    adb_env.disconnect(locked)
    silent = phones("offline")
    _fails(run, f"{silent.serial} is offline: reconnect it")
    adb_env.disconnect(silent)
    one, two = phones(), phones()
    _fails(run, f"several devices are connected \\(.*{one.serial}.*\\); .*--serial")
    _fails(run, "device 127.0.0.1:1 is not connected", serial="127.0.0.1:1")
    assert Adb("adb", two.serial, 60).shell("getprop", "ro.product.cpu.abilist") == \
        "arm64-v8a\n"


def test_runner_errors_leave_nothing_behind(run, phone):
    _fails(run, "benchmark_model runs .tflite files", name="model-onnx-w8-weight-only.onnx")
    _fails(run, f"wrong ABI: ls is built for x86_64, device {phone.serial} runs arm64-v8a",
           runner_binary="/bin/ls")
    _fails(run, "runner missing: no executable /data/local/tmp/benchmark_model")
    _fails(run, "runner missing: nothing-here with numpy", runner="python",
           runner_path="nothing-here")
    assert _device_state(phone.serial) == ("", "")


def test_no_space_on_the_phone(run, phones, tmp_path):
    full = phones(data_kib=4096)  # /data/local/tmp is a 4 MiB tmpfs
    _fails(run, f"no space left on device {full.serial}: 4 MiB free in /data/local/tmp, "
           "16 MiB needed")
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(5 << 20))
    with pytest.raises(DeviceError, match=f"no space left on device {full.serial} .*No space"):
        Adb("adb", full.serial, 60).run("push", str(big), "/data/local/tmp/big.bin")
    assert "big.bin" not in Adb("adb", full.serial, 60).shell("ls", "/data/local/tmp")


def test_timeout_kills_the_runner_on_the_phone_and_cleans_up(run, phone, tmp_path):
    # a python runner that passes the numpy check, then hangs when asked to run the model
    slow = tmp_path / "slow-python"
    slow.write_text('#!/bin/sh\ncase "$1" in -c) exec python3 "$@" ;; esac\n'
                    'exec python3 -c "import time; time.sleep(600)" "$@"\n')
    adb = Adb("adb", phone.serial, 60)
    adb.run("push", str(slow), "/data/local/tmp/slow-python")
    adb.shell("chmod", "755", "/data/local/tmp/slow-python")
    try:
        _fails(run, "did not finish within 8s.*killed on the device", runner="python",
               runner_path="/data/local/tmp/slow-python", timeout=8)
        assert _device_state(phone.serial) == ("", "")
    finally:
        adb.shell("rm", "-f", "/data/local/tmp/slow-python")


def _wait(condition, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_no_process_outlives_the_phone(rig_root, adb_env):
    """A command whose client went away runs on (as under adbd's raw shell) until the stand-in
    adbd stops: then its pid namespace, and every process in it, is gone."""
    device = Device(rig_root)
    try:
        adb_env.connect(device)
        client = subprocess.Popen(["adb", "-s", device.serial, "shell", "sleep 299"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        adb = Adb("adb", device.serial, 60)
        assert _wait(lambda: "sleep 299" in adb.shell("sh", "-c", "ps -eo args; true"))
        client.kill()
        client.wait()

        def on_host() -> bool:
            return subprocess.run(["pgrep", "-f", "sleep 299"]).returncode == 0

        assert on_host(), "the command should outlive its client"
        adb_env.disconnect(device)
    finally:
        device.stop()
    assert _wait(lambda: not on_host(), 10)
