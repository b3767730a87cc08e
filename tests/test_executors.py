"""The executor seam: the local executor and Ray (a local instance started by the test, no
dashboard, shut down after) give the same outcomes in the same order; a task that raises is
reported while the others finish; reference models built through Ray equal the local ones."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from compressor import compress
from compressor.references import ensure_references
from safeexport.data import load_dataset
from safeexport.data.splits import Splits
from safeexport.errors import ConfigError
from safeexport.executors import Task, run_tasks
from safeexport.rundir import sha256_file
from tests.conftest import tiny_config


def _square(x: int) -> int:
    if x == 3:
        raise ConfigError("three is refused")
    return x * x


def _starting_environment(keys: tuple[str, ...]) -> dict[str, str]:
    """The variables this process STARTED with (what libgomp reads when torch loads it)."""
    pairs = (e.split("=", 1) for e in Path("/proc/self/environ").read_text().split("\0") if e)
    return {k: v for k, v in pairs if k in keys}


def _dies_once(marker: str) -> str:
    """Kills its worker the first time (as the kernel's out-of-memory killer would), answers
    the second."""
    if not Path(marker).exists():
        Path(marker).write_text("died once")
        os._exit(1)
    return "answered"


def _always_dies(attempts: str) -> None:
    with open(attempts, "a") as f:
        f.write("attempt\n")
    os._exit(1)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    assert not ray.is_initialized()


def test_ray_auto_without_a_cluster_is_one_error(tmp_path, monkeypatch):
    """First in the file: the module's Ray instance must not be running yet."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance of this process would be joined")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # no cluster file of another test run
    with pytest.raises(ConfigError, match="--ray-address auto: Could not find any running Ray"):
        run_tasks([Task("t0", _square, (0,))], "ray", False, address="auto")


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_outcomes_in_order_and_a_failure_does_not_stop_the_others(executor, request):
    if executor == "ray":
        request.getfixturevalue("ray_instance")
    out = run_tasks([Task(f"t{i}", _square, (i,)) for i in range(5)], executor, False)
    assert [o.name for o in out] == ["t0", "t1", "t2", "t3", "t4"]
    assert [o.value for o in out if o.ok] == [0, 1, 4, 16]
    assert out[3].error == "three is refused" and not out[3].ok


def test_the_local_executor_refuses_options_instead_of_dropping_them():
    with pytest.raises(ConfigError, match="local executor takes no address, cpus_per_task"):
        run_tasks([Task("t0", _square, (0,))], "local", False, address="auto",
                  cpus_per_task=1.0)


def test_references_through_ray_equal_the_local_ones(ray_instance, tmp_path):
    cfg = tiny_config(method="dense", dense_reference=False, attack="loss", epochs=2)
    y = load_dataset("synthetic", None, False, 400, 0).y
    models = {}
    threads = torch.get_num_threads()
    for executor in ("local", "ray"):
        run = compress(cfg, tmp_path / executor, progress=False)
        torch.set_num_threads(1)  # a Ray task with one CPU trains on one thread
        try:
            run_cfg = replace(cfg, executor=executor)
            refs = ensure_references(run, run_cfg, Splits.load(run.splits), y, 2, compress)
        finally:
            torch.set_num_threads(threads)
        models[executor] = [sha256_file(r.model) for r in refs]
        index = json.loads((run.path / "references" / "index.json").read_text())
        assert [m["status"] for m in index["models"].values()] == ["built", "built"]
    assert models["ray"] == models["local"]
    # the executor is not a setting: the local references are reused as they are under Ray
    run_cfg = replace(cfg, executor="ray")
    ensure_references(run, run_cfg, Splits.load(run.splits), y, 2, compress)
    index = json.loads((run.path / "references" / "index.json").read_text())
    assert [m["status"] for m in index["models"].values()] == ["reused", "reused"]


def test_a_comparison_through_ray_equals_the_local_one_and_a_failed_run_is_reported(
        ray_instance, tmp_path):
    from study import compare

    cfg = tiny_config(attack="loss", epochs=2, retrain_epochs=1, dense_reference=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray tasks (one CPU each) train
    try:
        compare(cfg, tmp_path / "local", ["dense", "prune"], progress=False)
    finally:
        torch.set_num_threads(threads)
    # a folder the prune run may not use: that task fails, the others finish and are written
    blocked = tmp_path / "ray" / "seed-0" / "prune"
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="seed 0 prune failed: .*not a run directory"):
        compare(replace(cfg, executor="ray"), tmp_path / "ray", ["dense", "prune"],
                progress=False)
    table = (tmp_path / "ray" / "compare.md").read_text()
    assert "| dense |" in table and "| prune |" not in table
    dense = tmp_path / "ray" / "seed-0" / "dense" / "model.safetensors"
    stamp = dense.stat().st_mtime_ns
    (blocked / "notes.txt").unlink()
    compare(replace(cfg, executor="ray"), tmp_path / "ray", ["dense", "prune"], progress=False)
    assert dense.stat().st_mtime_ns == stamp  # resumed: the finished run was not redone
    for m in ("dense", "prune"):
        assert sha256_file(tmp_path / "ray" / "seed-0" / m / "model.safetensors") == \
            sha256_file(tmp_path / "local" / "seed-0" / m / "model.safetensors")


def test_a_ray_worker_starts_with_the_drivers_openmp_spin(ray_instance, monkeypatch):
    # The Ray instance started with this process's environment (the project's spin count); a
    # setting made after that reaches the worker only through the task's runtime environment.
    monkeypatch.setenv("GOMP_SPINCOUNT", "4321")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    keys = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    [out] = run_tasks([Task("env", _starting_environment, (keys,))], "ray", False)
    assert out.value == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "4321"}, out


def test_a_task_whose_ray_worker_dies_is_retried_then_reported(ray_instance, tmp_path):
    from safeexport.executors import RETRIES

    attempts = tmp_path / "attempts"
    out = run_tasks([Task("once", _dies_once, (str(tmp_path / "marker"),)),
                     Task("always", _always_dies, (str(attempts),)),
                     Task("t2", _square, (2,))], "ray", False)
    assert out[0].value == "answered", out[0]  # retried on a fresh worker
    assert not out[1].ok and f"its Ray worker died {RETRIES + 1} times" in out[1].error, out[1]
    assert "WorkerCrashedError" in out[1].error and "resumes" in out[1].error
    assert attempts.read_text().count("attempt") == RETRIES + 1
    assert out[2].value == 4  # the others finish


def test_a_ray_study_refuses_a_folder_its_workers_cannot_write_before_training(
        ray_instance, tmp_path):
    from safeexport.executors import check_workers_write
    from study import compare

    (tmp_path / "a-file").write_text("not a folder")
    cfg = tiny_config(attack="loss", epochs=2, dense_reference=False, executor="ray")
    with pytest.raises(ConfigError, match=r"^a Ray worker cannot write into \S*a-file "
                                          r"\(NotADirectoryError.*give --out a folder"):
        compare(cfg, tmp_path / "a-file" / "study", ["dense"], progress=False)
    # a folder the workers can write passes, and the probe creates and leaves nothing
    check_workers_write(tmp_path / "new" / "study")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
