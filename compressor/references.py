"""Reference models for LiRA and RMIA (SPEC §8): K runs trained like the target, each on a random
half of the attacker's auxiliary data (the known members ∪ known non-members), never on the
unknown members or non-members the audit scores. A half is 3/16 of the pool against the
target's 1/2, so a reference trains for proportionally more epochs: the target's number of
iterations, hence of mask updates. Each is a normal run directory ``RUN/references/ref-i/``
(inspectable, exportable, resumable), built through the executor seam; its splits.npz records
which auxiliary samples it trained on (its members).

Halves come in complementary pairs (ref-0 trains on what ref-1 does not, and so on), so with an
even K every auxiliary sample is out of exactly half the references: both "in" and "out"
statistics exist for it. A reference is rebuilt only when a setting that made it changed (its
config, the data fingerprint or its half); an unfinished one resumes.
"""

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from compressor.config import DENSE_KEYS, EXECUTION_KEYS, CompressConfig
from compressor.train import iters_per_epoch
from safeexport.data.base import ArrayDataset, stratified_order
from safeexport.data.splits import Splits
from safeexport.errors import ConfigError, SafeExportError
from safeexport.executors import Task, run_tasks
from safeexport.rundir import LOCK, RunDir, atomic_write, write_json
from safeexport.runio import REFERENCE_INDEX, REFERENCES, load_data
from safeexport.seeding import derive_seed

# where the data is read from, which device trains and how runs are executed do not change
# what a reference is
NOT_SETTINGS = ("data_dir", "download", "device", *EXECUTION_KEYS)


def reference_dir(run: RunDir, i: int) -> RunDir:
    return RunDir(run.path / REFERENCES / f"ref-{i}")


def reference_splits(splits: Splits, y: np.ndarray, i: int, seed: int) -> Splits:
    """Reference ``i``'s split: its members are one class-stratified half of the auxiliary data
    (pair i // 2 draws the half; an odd i takes the complement), its non-members the other
    half; validation and test are the target's. The unknown parts are in no part at all."""
    aux = np.concatenate([splits.known_members, splits.known_nonmembers])
    order = aux[stratified_order(y[aux], np.random.default_rng(
        derive_seed(seed, "reference-half", i // 2)))]
    half = len(order) // 2
    ins, outs = (order[half:], order[:half]) if i % 2 else (order[:half], order[half:])
    # every prefix of a part keeps the class mix (the reference's own attacker cuts prefixes)
    ins, outs = (p[stratified_order(y[p], np.random.default_rng(derive_seed(seed, "ref", i)))]
                 for p in (ins, outs))
    mi, no = len(ins) // 2, len(outs) // 2
    return Splits(known_members=ins[:mi], unknown_members=ins[mi:], known_nonmembers=outs[:no],
                  unknown_nonmembers=outs[no:], validation=splits.validation, test=splits.test,
                  fingerprint=splits.fingerprint)


def matched_epochs(epochs: int, n_target: int, n_ref: int, batch_size: int) -> int:
    """Epochs over ``n_ref`` members that make at least the iterations ``epochs`` make over
    ``n_target`` (SPEC §8: a reference sees the target's number of training steps, hence its
    mask updates, which are counted in iterations; fewer steps made references weaker than the
    target, an offset RMIA does not absorb)."""
    target = epochs * iters_per_epoch(n_target, batch_size)
    return max(1, math.ceil(target / iters_per_epoch(n_ref, batch_size))) if epochs else 0


def reference_config(cfg: CompressConfig, i: int, n_target: int, n_ref: int) -> CompressConfig:
    """The target's settings (or a dense model's, with ``reference_method`` dense) under a seed
    of its own, with its training and retraining epochs scaled so that the reference, on its
    ``n_ref`` members, makes as many iterations as the target on its ``n_target``; the data
    subset keeps the target's seed so the indices mean the same samples. A dense reference
    keeps only what decides a dense model (``DENSE_KEYS``, the augmentation, where the data
    is read and how runs execute), the rest at its defaults: every method of the same data,
    split and recipe then needs the same dense references (``ensure_references`` copies
    them from a ``source`` run)."""
    method = "dense" if cfg.reference_method == "dense" else cfg.method
    if method == "dense":
        keep = (*DENSE_KEYS, "augment", "data_seed", "data_dir", "download", "device",
                *EXECUTION_KEYS,
                # its own final evaluation (which does not change its model)
                "attack", "final_attack_epochs", "attack_seeds", "lam")
        cfg = CompressConfig(**{k: getattr(cfg, k) for k in keep})
    return replace(cfg, seed=derive_seed(cfg.seed, "reference", i) % 2**31,
                   data_seed=cfg.seed if cfg.data_seed is None else cfg.data_seed,
                   method=method,
                   epochs=matched_epochs(cfg.epochs, n_target, n_ref, cfg.batch_size),
                   retrain_epochs=matched_epochs(cfg.retrain_epochs, n_target, n_ref,
                                                 cfg.batch_size),
                   references=0, dense_reference=False,
                   # a reference has no references of its own to read LiRA's z against
                   score="loss" if cfg.score == "lira" else cfg.score,
                   threads=None)  # the executor gives each reference its threads


def settings_key(cfg: CompressConfig, splits: Splits) -> str:
    """sha256 of what made a reference: its config, the data fingerprint and its half."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in NOT_SETTINGS}
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(splits.fingerprint.encode())
    for part in (splits.known_members, splits.unknown_members, splits.known_nonmembers,
                 splits.unknown_nonmembers):
        h.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    return h.hexdigest()


def _recorded_key(ref: RunDir) -> str | None:
    """The settings key of the run in ``ref`` (None when there is no readable run)."""
    if not ref.is_run():
        return None
    try:
        cfg = CompressConfig.from_run_record(ref.read_config())
        return settings_key(cfg, Splits.load(ref.splits))
    except SafeExportError:
        return None


Build = Callable[..., RunDir]  # compressor.run.compress, handed down by its callers


def _build(build: Build, cfg: dict, path: str, splits: Splits, resume: bool, overwrite: bool,
           progress: bool | None) -> str:
    build(CompressConfig.from_dict(cfg), path, resume=resume, overwrite=overwrite,
          progress=progress, splits=splits)
    return path


def ensure_references(run: RunDir, cfg: CompressConfig, splits: Splits, y: np.ndarray,
                      k: int, build: Build, progress: bool | None = None,
                      source: RunDir | None = None) -> list[RunDir]:
    """Make sure references 0..k-1 of ``run`` exist with the settings ``cfg`` implies, each
    built by ``build`` (``compressor.run.compress``, which builds references through this
    module, so it is passed down rather than imported): reuse finished ones, resume
    unfinished ones, rebuild changed ones, through ``cfg.executor``
    (local, or Ray with ``cfg``'s address and per-run resources). Writes
    ``references/index.json`` (each reference's settings key and status) and returns the
    finished references; raises ConfigError naming every one that failed (after the others
    finished). ``source``: another run of the same data and split (a study's dense run) whose
    finished references are copied where they have the very settings key one of these needs,
    instead of trained again."""
    tasks, status, keys, epochs = [], {}, {}, {}
    for i in range(k):
        ref = reference_dir(run, i)
        rsplits = reference_splits(splits, y, i, cfg.seed)
        rcfg = reference_config(cfg, i, len(splits.members), len(rsplits.members))
        keys[i], epochs[i] = settings_key(rcfg, rsplits), rcfg.epochs
        same = _recorded_key(ref) == keys[i]
        if same and ref.report.exists():
            status[i] = "reused"
            continue
        theirs = reference_dir(source, i) if source is not None else None
        if theirs is not None and theirs.report.exists() and _recorded_key(theirs) == keys[i]:
            with theirs.lock(shared=True):
                shutil.rmtree(ref.path, ignore_errors=True)
                shutil.copytree(theirs.path, ref.path, ignore=shutil.ignore_patterns(LOCK))
            status[i] = f"copied from {theirs.path}"
            continue
        status[i] = "resumed" if same else ("rebuilt" if ref.is_run() else "built")
        tasks.append((i, Task(ref.path.name, _build,
                              (build, rcfg.to_dict(), str(ref.path), rsplits, same, not same,
                               progress))))
    failed = {}
    if tasks:
        cfg.check_executor(run.path)
        outcomes = run_tasks([t for _, t in tasks], cfg.executor, progress,
                             **cfg.executor_options())
        for (i, _), o in zip(tasks, outcomes, strict=True):
            if not o.ok:
                status[i], failed[i] = "failed", o.error
    write_json(run.path / REFERENCES / REFERENCE_INDEX,
               {"references": k, "method": cfg.reference_method, "target_epochs": cfg.epochs,
                "models": {f"ref-{i}": {"settings_sha256": keys[i], "status": status[i],
                                        "epochs": epochs[i],
                                        **({"error": failed[i]} if i in failed else {})}
                           for i in range(k)}})
    if failed:
        raise ConfigError("; ".join(f"reference ref-{i} failed: {e}" for i, e in failed.items())
                          + f" (the others are kept in {run.path / REFERENCES}; the same "
                          "command resumes)")
    return [reference_dir(run, i) for i in range(k)]


def ensure_run_references(run: RunDir, k: int, build: Build,
                          data_dir: Path | None = None,
                          progress: bool | None = None) -> list[RunDir]:
    """``ensure_references`` for ``run`` (a finished run ``open_run`` verified: its own config
    and split), for ``safeexport evaluate --references K``; holds the run's shared lock
    meanwhile."""
    cfg = CompressConfig.from_run_record(run.read_config())
    if data_dir is not None:
        cfg = replace(cfg, data_dir=str(data_dir))
    with run.lock(shared=True):
        ds, splits = load_data(run, data_dir)
        return ensure_references(run, cfg, splits, ds.y, k, build, progress)


def ensure_audit_references(folder: Path, ds: ArrayDataset, splits: Splits,
                            train: CompressConfig, k: int, build: Build,
                            progress: bool | None = None) -> RunDir:
    """``ensure_references`` for an audit of a file safeexport did not make (``safeexport
    evaluate FILE --members --references K``): ``folder`` becomes a work folder holding the
    audit's data (data.npz), its split (splits.npz, the references' validation and test
    halves of the audit's test part, which they never train on), how the references are
    trained (train_config.json: ``train`` on this data) and references/ref-i. Returns the
    folder as the run whose references they are."""
    from compressor.baselines import TRAINS_ON_VALIDATION

    if train.method in TRAINS_ON_VALIDATION:
        raise ConfigError(f"references trained with --method {train.method} train on "
                          "non-member data; an audit has none to spare (its non-members are "
                          "measured): use another method in --train-config")
    validation, test = np.array_split(splits.test, 2)
    base = replace(splits, validation=validation, test=test)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "data.npz"
    atomic_write(data, lambda f: np.savez(f, x=ds.x, y=ds.y))
    base.save(folder / "splits.npz")
    cfg = replace(train, dataset=f"npz:{data.resolve()}", data_dir=None, download=False,
                  max_samples=None, data_seed=None, references=0, dense_reference=False)
    write_json(folder / "train_config.json", cfg.to_dict())
    work = RunDir(folder)
    ensure_references(work, cfg, base, ds.y, k, build, progress)
    return work
