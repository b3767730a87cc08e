"""Shared fixtures: a tiny, fast compress config, a finished tiny run with its exports, and the
location of the real datasets."""

import safeexport  # noqa: F401 - first: OpenMP's wait policy before torch loads (openmp.py)

# isort: split
import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from compressor import compress
from compressor.config import CompressConfig
from exporters import export
from exporters.config import ExportConfig

REPO = Path(__file__).resolve().parents[1]
FAST_EXPORT = dict(parity_samples=64, calibration=32, min_agreement=0.0)
# Only a guard against a hung child, never a speed check: the suite has taken 51 minutes on a
# loaded machine, and a tighter limit failed correct code there.
HANG_GUARD_S = 3600


@dataclass
class CliResult:
    """What a command printed and its exit status (the fields of subprocess's result)."""

    returncode: int
    stdout: str
    stderr: str


def cli(*args, cwd: Path | None = None, env: dict | None = None) -> CliResult:
    """``safeexport ARGS`` in this process (click's CliRunner): what the command line does,
    without a cold interpreter and torch import per call. An exception the command does not
    turn into its one-line error is raised here, traceback and all. The torch thread count a
    command sets (--threads) is restored after it."""
    from commands.cli import main

    threads = torch.get_num_threads()
    try:
        with contextlib.chdir(cwd or Path.cwd()):
            r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    finally:
        torch.set_num_threads(threads)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return CliResult(r.exit_code, r.stdout, r.stderr)


def cli_process(*args, cwd: Path | None = None, env: dict | None = None,
                module: str = "safeexport") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as a real process, for what needs one: a kill and resume,
    the entry points themselves, a crash in native code."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd or REPO,
                          env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound by the OS, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(r, pattern: str) -> str:
    """Assert ``r`` (a ``cli`` or ``cli_process`` result) is a refusal: exit status 2 and
    exactly one "error: " line on stderr, matching ``pattern``, and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def tiny_config(**overrides) -> CompressConfig:
    """A config that runs the whole method on the synthetic data in a few seconds."""
    base = dict(dataset="synthetic", model="cnn", sparsity=0.2, epochs=4, update_frequency=6,
                batch_size=32, finetune_iters=2, attack_epochs=2, attack_finetune_epochs=1,
                final_attack_epochs=2, max_samples=400, device="cpu", seed=0)
    base.update(overrides)
    return CompressConfig(**base)


class RunsOnDemand(Mapping):
    """``key -> run path`` for the keys given, each run made by ``make(key)`` when a test first
    asks for it: a module's tests share the runs, and no single test waits for all of them (a
    fast test takes at most 30 s). Iterating gives the keys; the values make every run."""

    def __init__(self, keys, make: Callable[[object], Path]) -> None:
        self._keys, self._make, self._made = tuple(keys), make, {}

    def __getitem__(self, key) -> Path:
        if key not in self._keys:
            raise KeyError(key)
        if key not in self._made:
            self._made[key] = self._make(key)
        return self._made[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def write_agnews_csv(folder: Path, n: int = 400) -> None:
    """A two-topic AG-News-layout train.csv in ``folder/ag_news`` that a tiny BERT learns."""
    rng = np.random.default_rng(0)
    words = [["stocks", "market", "shares", "profit"], ["match", "goal", "team", "coach"]]
    rows = [f'"{c + 1}","{" ".join(rng.choice(words[c], 6))}","news {i}"'
            for i, c in enumerate(np.arange(n) % 2)]
    (folder / "ag_news").mkdir(parents=True, exist_ok=True)
    (folder / "ag_news" / "train.csv").write_text("\n".join(rows))


def write_tabular_npz(path: Path, n: int = 400) -> None:
    """Binary features whose class shows in every fourth column (4 classes), as an npz."""
    rng = np.random.default_rng(0)
    y = np.arange(n) % 4
    x = (rng.random((n, 30)) < 0.2 + 0.15 * (np.arange(30) % 4 == y[:, None])).astype(
        np.float32)
    np.savez(path, x=x, y=y)


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="the full suite (what CI runs): also the tests marked slow, the "
                          "real-data tier and the emulated phone")
    parser.addoption("--threads", type=int, default=1,
                     help="torch CPU threads of each test process and the commands it starts "
                          "(default 1: with one test process per core, more threads only "
                          "fight over the cores, and another job on the machine multiplies "
                          "the time of tests that spin more threads than it has cores)")


def pytest_configure(config):
    """Every test process trains on ``--threads`` threads, whatever the machine's core count;
    a test that needs another count sets it itself (torch_threads)."""
    threads = config.getoption("--threads")
    if threads < 1:
        raise pytest.UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the commands a test starts as processes


def pytest_collection_modifyitems(config, items):
    """A bare ``pytest`` is the fast tier: the tests marked slow, the real-data tier and the
    device tier run with --full (each slow test has a small sibling in the fast tier). Named
    files or tests run whole."""
    if config.getoption("--full") or config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        return
    slow = [i for i in items if i.get_closest_marker("slow") or i.get_closest_marker("realdata")
            or "tests/device/" in i.nodeid]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if i not in slow]


def real_data_dir() -> Path | None:
    """SAFEEXPORT_DATASETS, else ../shared/datasets beside the checkout, if present."""
    env = os.environ.get("SAFEEXPORT_DATASETS")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "datasets"]:
        if cand.is_dir():
            return cand
    return None


@pytest.fixture
def datasets_dir() -> Path:
    d = real_data_dir()
    if d is None:
        pytest.skip("real datasets not found (set SAFEEXPORT_DATASETS or add ../shared/datasets)")
    return d


@pytest.fixture(scope="session")
def run(tmp_path_factory) -> Path:
    """A tiny CNN run on the synthetic images, and its exports (ONNX and TFLite, float and
    int8, and a 2-bit TFLite)."""
    root = tmp_path_factory.mktemp("exported-run")
    path = compress(tiny_config(dense_reference=False), root / "run").path
    for fmt, bits, scheme in (("onnx", 32, "weight-only"), ("tflite", 32, "weight-only"),
                              ("onnx", 8, "weight-only"), ("tflite", 8, "static"),
                              ("tflite", 2, "weight-only")):
        # a batch of 25 keeps benchmark_model invocations (one per batch) few
        export(ExportConfig(format=fmt, bits=bits, scheme=scheme, batch_size=25, **FAST_EXPORT),
               path)
    return path
