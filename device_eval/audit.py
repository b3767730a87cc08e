"""Audit a model file safeexport did not make: ``safeexport evaluate FILE.onnx|FILE.tflite
--members M.npz --nonmembers N.npz`` (or one npz whose ``member`` array marks them).

There is no run and no PyTorch model to compare with, so the result is the file's figures, not
a before/after verdict: task accuracy (on ``--test`` when given, else on the non-members, which
the model did not train on), and every attack that needs no reference models: the trained
attacker (Nasr et al.'s, trained on half of the members and half of the non-members, measured on
the other halves) and the four threshold attacks beside it, each with its bootstrap interval.

With ``--model`` (the file's architecture) and ``--references K``, LiRA and RMIA run on the file
too (SPEC §8): K reference models are trained like the file's model (``--train-config``: a
YAML/JSON of ``safeexport compress`` keys, default a dense model) on complementary halves of the
KNOWN members and non-members, never on the measured ones, into ``<report>-references/``
(reused while their settings and the data are unchanged); the figures are measured on the
other half. Then the halves swap (cross-fitting): K more references train on the measured half,
into ``<report>-references-swapped/``, and score the known half, so that every member gets a
LiRA score from references that never saw it. The per-record exposure
(``<report>-exposure.csv``) ranks EVERY member by LiRA, each against its own half's
non-members and named by its row in the members file.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from device_eval.config import EvalConfig
from device_eval.run import (
    EvalReport,
    check_report_targets,
    exposure_path,
    file_logits,
    measure,
    open_file_runtime,
)
from safeexport.attacks.evaluate import exposure_for_report, rank_members, write_exposure_csv
from safeexport.attacks.final import attack_parts, part_signals
from safeexport.attacks.reference import (
    References,
    lira_scores,
    margins,
    reference_attacks,
    reference_outputs,
)
from safeexport.data.base import ArrayDataset, stratified_order
from safeexport.data.images import arrays_dataset, read_npz
from safeexport.data.splits import Splits, balanced
from safeexport.errors import ConfigError, DataError
from safeexport.plots import plot_roc, roc_curves
from safeexport.rundir import (
    RunDir,
    regular_file,
    sha256_file,
    write_json,
)
from safeexport.runio import inputs_of

MIN_HALF = 10  # samples in each half of members and non-members (the attacker's and the test's)
ATTACK_EPOCHS = 300  # the compressor's final_attack_epochs default; early stopping ends it sooner
NO_REFERENCES = ("not run: LiRA and RMIA need reference models trained like this one; give "
                 "--model (its architecture) and --references K")


def _sets(members: Path, nonmembers: Path | None):
    """(members, non-members) as checked datasets, from two npz files or one with a
    ``member`` array (1 = member, 0 = not), and each member's row in its file."""
    if nonmembers is not None:
        mem, non = (arrays_dataset(f"npz:{p}", a["x"], a["y"], str(p))
                    for p, a in ((members, read_npz(members, ("x", "y"))),
                                 (nonmembers, read_npz(nonmembers, ("x", "y")))))
        return mem, non, np.arange(len(mem))
    a = read_npz(members, ("x", "y", "member"))
    flag = a["member"]
    if flag.shape != a["y"].shape or not np.isin(flag, (0, 1)).all():
        raise DataError(f"{members}: 'member' must hold one 0 or 1 per sample (1 = the model "
                        "trained on it)")
    flag = flag.astype(bool)
    mem, non = (arrays_dataset(f"npz:{members}", a["x"][m], a["y"][m], f"{members} ({what})")
                for m, what in ((flag, "members"), (~flag, "non-members")))
    return mem, non, np.flatnonzero(flag)


def _digests(ds: ArrayDataset) -> list[bytes]:
    """The sha256 of each input's bytes: what makes two samples the same record."""
    return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest() for x in ds.x]


def _check_disjoint(mem: ArrayDataset, non: ArrayDataset, test: ArrayDataset | None) -> None:
    """Refuse inputs that are in two of the sets (by the sha256 of their bytes): a sample is a
    member or not, and the task test must not read a member."""
    seen = set(_digests(mem))
    for other, what in ((non, "non-members"), (test, "test samples")):
        if other is None:
            continue
        both = sum(d in seen for d in _digests(other))
        if both:
            raise DataError(f"{both} of the {len(other)} {what} are also among the members "
                            "(the same input in both sets): a sample is a member or not; "
                            "remove them from one of the files")


def _halves(ds: ArrayDataset, offset: int, seed: int, what: str
            ) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``offset + i`` cut into two class-stratified halves (the attacker and the
    references train on the first, the second is measured). Copies of one input (the same
    bytes) stay in one half: cut by row, a record present four times had copies on both sides,
    so the references trained on it and LiRA ranked it as unexposed."""
    y = ds.y
    if len(y) < 2 * MIN_HALF:
        raise DataError(f"{len(y)} {what} are too few to train an attacker on half and measure "
                        f"it on the other half; give at least {2 * MIN_HALF}")
    groups: dict[bytes, list[int]] = {}
    for i, d in enumerate(_digests(ds)):
        groups.setdefault(d, []).append(i)
    rows = list(groups.values())
    first: list[int] = []
    second: list[int] = []
    for g in stratified_order(y[[r[0] for r in rows]], np.random.default_rng(seed)):
        (first if len(first) < len(y) // 2 else second).extend(rows[g])
    return np.array(first, np.int64) + offset, np.array(second, np.int64) + offset


def _references(build: Callable[[Path, ArrayDataset, Splits], RunDir], folder: Path,
                ds: ArrayDataset, splits: Splits, k: int) -> tuple[References, RunDir]:
    """K references trained on halves of ``splits``' known parts into ``folder``, and their
    outputs on the known and unknown parts."""
    work = build(folder, ds, splits)
    refs = reference_outputs(work, np.concatenate([
        splits.known_members, splits.known_nonmembers, splits.unknown_members,
        splits.unknown_nonmembers]), k)
    if refs is None or len(refs) < k:
        raise ConfigError(f"fewer than {k} reference models finished in {folder}")
    return refs, work


def _lira_fold(logits: np.ndarray, y: np.ndarray, refs: References, members: np.ndarray,
               nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LiRA's z of ALL of one half's members and non-members (none of which ``refs`` trained
    on): (member scores, member indices, non-member scores), a fold of ``rank_members``. The
    figures are measured on balanced parts; the ranking needs every member."""
    idx = np.concatenate([members, nonmembers])
    rows = refs.rows(idx)
    z, _ = lira_scores(margins(logits[idx], y[idx]), margins(refs.logits[:, rows], y[idx]),
                       refs.trained[:, rows])
    return z[:len(members)], members, z[len(members):]


def _swapped_figures(logits: np.ndarray, y: np.ndarray, swapped: Splits,
                     refs: References) -> dict:
    """LiRA's and RMIA's figures on the known half, from the references trained on the
    measured one (the cross-fitted fold; the thresholds fitted on the measured half)."""
    parts = attack_parts(swapped)
    scored, settings = reference_attacks(part_signals(lambda i: logits[i], y, parts), parts,
                                         refs)
    return {**{k: {**r.metrics, "threshold": r.threshold} for k, r in scored.items()},
            "settings": settings}


def audit(model_file: Path | str, members: Path | str, nonmembers: Path | str | None = None,
          test: Path | str | None = None, cfg: EvalConfig | None = None,
          json_out: Path | None = None, overwrite: bool = False, seed: int = 0,
          build_references: Callable[[Path, ArrayDataset, Splits], RunDir] | None = None
          ) -> EvalReport:
    """The file's task accuracy and membership figures on the user's members and non-members;
    written to ``json_out`` (default ``FILE-audit-<runtime>.json`` beside the file) with the
    ROC beside it as .png and the per-record exposure as ``-exposure.csv``. With
    ``cfg.references`` K, LiRA and RMIA too: ``build_references(folder, data, split)`` makes
    sure K reference models exist in ``folder/references/`` (``<report>-references/``),
    trained on halves of the split's known parts (the command line trains them with the
    compressor; a stage does not import another)."""
    cfg = cfg or EvalConfig()
    if json_out is not None:  # a bad --json is refused before the file runs
        check_report_targets(Path(json_out), overwrite, "the audit")
    model_file = regular_file(Path(model_file))
    if model_file.suffix.lower() not in (".onnx", ".tflite"):
        raise ConfigError(f"{model_file.name}: an audit takes an .onnx or .tflite file; a run's "
                          "model.safetensors is evaluated with its run (--run)")
    if cfg.references and build_references is None:
        raise ConfigError("--references in an audit needs --model: the architecture of the "
                          "file's model, to train reference models like it")
    mem, non, member_rows = _sets(Path(members),
                                  Path(nonmembers) if nonmembers is not None else None)
    parts = [mem, non] + ([arrays_dataset(f"npz:{test}", **read_npz(Path(test), ("x", "y")),
                                          where=str(test))] if test is not None else [])
    shapes = {(d.kind, d.input_shape()) for d in parts}
    if len(shapes) > 1:
        raise DataError(f"members, non-members and test data must be the same kind of input "
                        f"of one shape, found {sorted(shapes)}")
    _check_disjoint(mem, non, parts[2] if len(parts) > 2 else None)
    x = np.concatenate([d.x for d in parts])
    y = np.concatenate([d.y for d in parts])
    ds = arrays_dataset("audit", x, y, "audit data")
    n_m, n_n = len(mem), len(non)
    km, um = _halves(mem, 0, seed, "members")
    kn, un = _halves(non, n_m, seed + 1, "non-members")
    test_idx = np.arange(n_m + n_n, len(y)) if test is not None else un
    splits = Splits(km, um, kn, un, np.empty(0, np.int64), test_idx, ds.fingerprint())
    inputs = inputs_of(ds, np.arange(len(y)))

    with open_file_runtime(model_file, cfg, inputs[:1]) as rt:
        probe = rt(inputs[:1])
        if probe.ndim != 2 or probe.shape[1] <= int(y.max()):
            raise ConfigError(f"{model_file.name} outputs shape {list(probe.shape[1:])}; the "
                              f"labels need at least {int(y.max()) + 1} classes")
        if cfg.references and probe.shape[1] != ds.num_classes:
            raise ConfigError(f"{model_file.name} has {probe.shape[1]} outputs but the labels "
                              f"name {ds.num_classes} classes; reference models of this data "
                              "would not be like it (give data with every class, or run "
                              "without --references)")
        logits = file_logits(rt, inputs, cfg.chunk, f"{rt.name} {model_file.name}")
        runtime = {"name": rt.name, "version": rt.version, "threads": rt.threads}
    if not np.isfinite(logits).all():
        raise ConfigError(f"{model_file.name} produced non-finite logits in {runtime['name']}")
    stem = f"{model_file.stem}-audit-{runtime['name']}"
    json_path = Path(json_out) if json_out else model_file.parent / f"{stem}.json"
    plot_path = json_path.with_suffix(".png")
    check_report_targets(json_path, overwrite, "the audit")

    eval_m, eval_n = balanced(um, un)
    refs, ref_folder = None, json_path.with_name(f"{json_path.stem}-references")
    swap_folder = json_path.with_name(f"{json_path.stem}-references-swapped")
    if cfg.references:
        refs, work = _references(build_references, ref_folder, ds, splits, cfg.references)
        # cross-fitting: the halves swap roles (the task test is the known non-members' half
        # when no --test is given, as it is the unknown one's above)
        swapped = Splits(um, km, un, kn, np.empty(0, np.int64),
                         test_idx if test is not None else kn, splits.fingerprint)
        swapped_refs, _ = _references(build_references, swap_folder, ds, swapped,
                                      cfg.references)
    attack = cfg.attack or "nasr"
    epochs = cfg.attack_epochs or ATTACK_EPOCHS
    seeds = cfg.attack_seeds or 1
    figures, res = measure(logits, {i: i for i in range(len(y))}, y, splits, logits.shape[1],
                           attack, epochs, seed, 1.0, seeds, refs)
    data = {"members": str(Path(members).resolve()),
            "members_sha256": sha256_file(Path(members))}
    for name, path in (("nonmembers", nonmembers), ("test", test)):
        if path is not None:
            data[name] = str(Path(path).resolve())
            data[f"{name}_sha256"] = sha256_file(Path(path))
    # the exposure names each member by its row in the members file
    exposure = (rank_members([_lira_fold(logits, y, refs, um, un),
                              _lira_fold(logits, y, swapped_refs, km, kn)], y, "lira")
                if refs is not None else res.exposure(y))
    for r in exposure["records"]:
        r["index"] = int(member_rows[r["index"]])
    report = {
        "model_file": str(model_file.resolve()), "sha256": sha256_file(model_file),
        "runtime": runtime, "data": data,
        "attack": {"name": attack, "epochs": epochs, "seed": seed, "seeds": seeds},
        "samples": {"members": n_m, "nonmembers": n_n, "known_members": len(km),
                    "known_nonmembers": len(kn), "eval_members": len(eval_m),
                    "eval_nonmembers": len(eval_n), "test": len(test_idx)},
        "task_acc_on": "test" if test is not None else "the unknown non-members (no --test)",
        "figures": figures,
        "reference_attacks": (figures["reference_attacks"] if refs is not None
                              else NO_REFERENCES),
        "exposure": {**exposure_for_report(exposure), "index": "row of the members file"},
        "warnings": figures["warnings"],
        "config": cfg.to_dict(),
    }
    if refs is not None:
        report["references"] = {
            "per_half": cfg.references, "folder": str(ref_folder.resolve()),
            "swapped_folder": str(swap_folder.resolve()),
            "train_config": work.read_json(work.path / "train_config.json"),
            "cross_fit": "the references in folder trained on the known half and score the "
                         "measured one (the figures); those in swapped_folder trained on the "
                         "measured half and score the known one; every member is ranked by "
                         "the LiRA of the references that never saw it"}
        report["reference_attacks_swapped"] = _swapped_figures(logits, y, swapped,
                                                               swapped_refs)
    write_json(json_path, report)
    write_exposure_csv(exposure_path(json_path), exposure)
    plot_roc(roc_curves(res, f"{model_file.name} on {runtime['name']}"), plot_path,
             f"MIA audit of {model_file.name}", figures["n_nonmembers"])
    return EvalReport(report, json_path, plot_path, res)
