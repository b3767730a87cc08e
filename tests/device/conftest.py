"""Fixtures of the emulated-phone tier: the arm64 root, a private adb server of the real client,
and stand-in adbd daemons started per test (each in its own namespaces, killed at teardown with
everything it started).

The tier skips where the machine cannot run it (not root, no qemu-user binfmt, no adb, root not
built: ``python -m tests.device.rig build``); with SAFEEXPORT_DEVICE_RIG=require (CI) it fails
instead, so a broken rig cannot pass as skipped.
"""

import os
import shutil
import time

import pytest

from tests.device import rig

REQUIRED = os.environ.get("SAFEEXPORT_DEVICE_RIG") == "require"
STATE = {"device": "device", "unauthorized": "unauthorized", "offline": "offline"}
# (file, runner, inputs, max |logit difference|, argmax agreement, membership agreement), from
# each test's "comparison" property: the reports reach this process from every test process
COMPARISONS: list[tuple] = []
SPENT = {"seconds": 0.0, "tests": 0}


def _unavailable(reason: str) -> None:
    message = f"emulated arm64 device unavailable: {reason}"
    if REQUIRED:
        pytest.fail(message + " (SAFEEXPORT_DEVICE_RIG=require)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def rig_root():
    missing = rig.missing_prerequisites()
    if missing:
        _unavailable("needs " + "; ".join(missing))
    if not rig.is_ready(rig.DEFAULT_ROOT):
        _unavailable(f"no current root in {rig.DEFAULT_ROOT} (python -m tests.device.rig build)")
    tmp = rig.DEFAULT_ROOT / "data" / "local" / "tmp"
    for leftover in tmp.iterdir():  # from an interrupted session
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    return rig.DEFAULT_ROOT


@pytest.fixture(scope="session")
def adb_server(rig_root, tmp_path_factory):
    server = rig.AdbServer(tmp_path_factory.mktemp("adb-home"))
    yield server
    server.stop()


@pytest.fixture
def adb_env(adb_server, monkeypatch):
    """device_eval's adb calls in this test talk to the private server."""
    for key, value in adb_server.env.items():
        monkeypatch.setenv(key, value)
    return adb_server


@pytest.fixture
def phones(rig_root, adb_env):
    """``phones(mode="device", data_kib=None)`` starts a stand-in adbd and connects it."""
    started: list[rig.Device] = []

    def start(mode: str = "device", data_kib: int | None = None) -> rig.Device:
        device = rig.Device(rig_root, mode, data_kib)
        started.append(device)
        adb_env.connect(device, STATE[mode])
        return device

    yield start
    for device in started:
        adb_env.disconnect(device)
        device.stop()


@pytest.fixture
def phone(phones) -> rig.Device:
    return phones()


def pytest_runtest_logreport(report):
    if report.nodeid.startswith("tests/device/"):
        SPENT["seconds"] += report.duration
        SPENT["tests"] += report.when == "call"
        COMPARISONS.extend(v for k, v in report.user_properties if k == "comparison")


def pytest_terminal_summary(terminalreporter):
    if not SPENT["tests"]:
        return
    tr = terminalreporter
    tr.section("emulated arm64 device (tests/device)")
    tr.write_line(f"{SPENT['tests']} tests, {SPENT['seconds']:.0f} s including setup "
                  f"({time.strftime('%H:%M:%S')})")
    if COMPARISONS:
        tr.write_line("adb (arm64, qemu-user) against the host runtime, same file and inputs:")
        tr.write_line(f"  {'file':40} {'runner':16} {'inputs':>6} {'max |dlogit|':>12} "
                      f"{'argmax':>7} {'membership':>10}")
        for name, runner, n, diff, arg, mem in COMPARISONS:
            tr.write_line(f"  {name:40} {runner:16} {n:6d} {diff:12.3g} {arg:7.1%} "
                          f"{mem if isinstance(mem, str) else f'{mem:.1%}':>10}")
