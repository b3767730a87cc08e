"""``evaluate(model_file, config)``: the task test and the membership-inference attacks re-run
on an exported file, in its runtime, beside the same figures for the run's PyTorch model, and a
verdict on whether privacy and accuracy survived export.

Both models go through ``final_membership`` with the run's seed, attack and epochs, so the
attacker starts from the same weights and sees the same batches: the figures differ only by
the outputs the two models give.
"""

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import device_eval.adb  # noqa: F401 - registers the adb runtime
from device_eval.config import EvalConfig
from safeexport.attacks import ATTACKS, AttackResult, MembershipResult
from safeexport.attacks.evaluate import (
    exposure_for_report,
    joint_attack,
    write_exposure_csv,
)
from safeexport.attacks.final import final_membership, held_pair, holder_start, model_figures
from safeexport.attacks.reference import References, reference_outputs
from safeexport.data.splits import balanced
from safeexport.errors import ConfigError
from safeexport.executors import torch_threads
from safeexport.metrics import (
    VERDICT_FIGURES,
    accuracy,
    detectable_rise,
    logit_parity,
    not_decidable,
    paired_rises,
)
from safeexport.plots import plot_roc, roc_curves
from safeexport.rundir import (
    MANIFEST_FIELDS,
    RunDir,
    check_targets,
    manifest_missing,
    read_json_file,
    regular_file,
    sha256_file,
    write_json,
)
from safeexport.runio import inputs_of, load_data, open_run, references_of
from safeexport.runtimes import Runtime, open_runtime
from safeexport.stored import storage_problems

TAG = "compressed"  # the compressor's tag for its final evaluation of model.safetensors
PASS, FAIL, INCONCLUSIVE = "PASS", "FAIL", "INCONCLUSIVE"  # the verdicts (SPEC §9)
_FIGURE_NAMES = {"mia_acc": "MIA accuracy", "auc": "AUC", "tpr_at_1pct_fpr": "TPR at 1% FPR"}


@dataclass
class EvalReport:
    """The evaluation's figures and verdict, and where they were written."""

    report: dict
    json_path: Path
    plot_path: Path
    result: MembershipResult | None = None  # the file's attacks (for a joint attack)

    @property
    def outcome(self) -> str:
        """PASS, FAIL or INCONCLUSIVE; an audit of a foreign file (no model to compare with)
        has no verdict and passes: its figures are the result."""
        return self.report["verdict"]["outcome"] if "verdict" in self.report else PASS

    @property
    def passed(self) -> bool:
        return self.outcome == PASS


def _manifest(model_file: Path) -> dict | None:
    """The export manifest beside an .onnx/.tflite file, checked against the file."""
    if model_file.suffix == ".safetensors":
        return None
    path = model_file.with_suffix(".json")
    if not path.exists():
        raise ConfigError(f"{model_file} has no manifest ({path.name}) beside it; evaluate "
                          "files written by `safeexport export`")
    manifest = read_json_file(path)
    missing = manifest_missing(manifest)
    if missing:
        raise ConfigError(f"{path} is not a complete export manifest (missing or mistyped: "
                          f"{', '.join(missing)}); export the file again with "
                          "`safeexport export`")
    actual = sha256_file(model_file)
    if actual != manifest.get("sha256"):
        raise ConfigError(f"{model_file} does not match its manifest (sha256 {actual[:12]} vs "
                          f"{str(manifest.get('sha256'))[:12]}): the file was changed or "
                          "replaced after export")
    if manifest.get("file") != model_file.name:
        raise ConfigError(f"{path} describes {manifest.get('file')!r}, not {model_file.name}: "
                          "a manifest belongs to the file it was written beside; give the file "
                          "its exported name again, or set the manifest's \"file\" to its new one")
    return manifest


def _check_storage(model_file: Path, manifest: dict) -> None:
    """The manifest's format and bit width against the weights the file stores (parsed once
    a runtime has loaded and run the file in a child process: a file that crashes a parser
    is reported as the runtime's crash first)."""
    wrong = storage_problems(model_file, manifest["format"], manifest["bits"])
    if wrong:
        raise ConfigError(f"{model_file.with_suffix('.json')} says {manifest['format']}, "
                          f"{manifest['bits']} bits, but {model_file.name} contradicts it "
                          f"({'; '.join(wrong[:3])}): the manifest was edited; export the "
                          "file again with `safeexport export`")


# what ``_manifest`` verified of a manifest before an evaluation trusts it (in the report)
MANIFEST_CHECKED = (*(f"{k} present" for k in MANIFEST_FIELDS), "sha256 equals the file's",
                    "file is the file's name", "format and bits agree with the file's weights",
                    "source.model_sha256 equals the run's model's",
                    "input shape and dtype are the run's data's")


def open_file_runtime(model_file: Path, cfg: EvalConfig, sample: np.ndarray) -> Runtime:
    """``model_file`` in the runtime ``cfg`` names (adb options included), loaded and run on
    ``sample`` in a child process first: the file may come from elsewhere."""
    options = ({"serial": cfg.serial, "adb": cfg.adb, "runner": cfg.runner,
                "runner_path": cfg.runner_path, "runner_binary": cfg.runner_binary,
                "timeout": cfg.timeout} if cfg.runtime == "adb" else {})
    return open_runtime(model_file, cfg.runtime, cfg.threads, probe=sample,
                        probe_timeout=cfg.timeout, **options)


def file_logits(rt: Runtime, inputs: np.ndarray, chunk: int, desc: str) -> np.ndarray:
    """The runtime's logits on ``inputs``, ``chunk`` at a time, with a progress bar."""
    with tqdm(total=len(inputs), desc=desc, unit="sample", disable=None) as bar:
        return rt(inputs, chunk=chunk, progress=bar.update)


def rows_of(logits: np.ndarray, pos: dict) -> Callable[[np.ndarray], np.ndarray]:
    """``logits(dataset indices)``: the rows of ``logits`` that ``pos`` (dataset index -> row)
    maps the indices to."""
    return lambda idx: logits[[pos[i] for i in idx]]


def measure(logits: np.ndarray, pos: dict, y: np.ndarray, splits, num_classes: int,
            attack: str, epochs: int, seed: int, lam: float, attack_seeds: int,
            references: References | None = None, fitted: list | None = None):
    """One model's figures (``model_figures``) and its ``MembershipResult`` from its logits on
    the samples ``pos`` maps (dataset index -> row of ``logits``); LiRA and RMIA too with
    ``references``; ``fitted``: trained attackers to apply instead of training new ones."""
    of = rows_of(logits, pos)
    res = final_membership(of, y, splits, num_classes, attack, epochs, seed, TAG,
                           torch.device("cpu"), attack_seeds, references, fitted)
    figures = model_figures(res, of(splits.test), y[splits.test],
                            accuracy(of(splits.members), y[splits.members]), lam)
    return figures, res


HOLDER_TRAINED = ("class-relative",)  # trained for the file's holder besides --attack


@dataclass
class PyTorchSide:
    """What an evaluation measures on the run's PyTorch model, the same for every file of the
    run under the same settings: its logits on the rows ``pos`` maps, the references'
    outputs, its figures and ``MembershipResult``, and where each holder attacker starts
    (``held_by_file``)."""

    logits: np.ndarray
    refs: References | None
    figures: dict
    result: MembershipResult
    holders: dict[str, object]  # "ATTACK@file" -> the attacker it starts from


def held_by_file(side: PyTorchSide, after_logits: np.ndarray, pos: dict, y: np.ndarray,
                 splits, epochs: int, seed: int) -> dict[str, tuple[AttackResult, AttackResult]]:
    """The trained attackers (``attack`` and ``HOLDER_TRAINED``) as an attacker who holds the
    file fits them to it, each scoring the PyTorch model and the file (``held_pair``), named
    ``ATTACK@file``. Every other attack of the verdict is fitted once, on the PyTorch model,
    and applied to the file: it cannot learn what only the file does (a class arrangement the
    model never had). The threshold attacks are not refitted: the best threshold a holder
    could pick is bounded by the ROC curve, which AUC and TPR measure without one, while a
    threshold refitted on 224 + 224 digits samples moved MIA accuracy by up to 4.5 points for
    an 8-bit file that agrees on every prediction. For the same reason these pairs are
    compared on AUC and TPR only: a trained attacker's threshold is fitted on a fifth of the
    known data (90 + 44 on digits), and the 8-bit file's nasr@file read +1.34 points of MIA
    accuracy [+0.45, +2.46] from it, with AUC +0.05."""
    return {name: held_pair(rows_of(side.logits, pos), rows_of(after_logits, pos), y, splits,
                            start, epochs, seed, TAG)
            for name, start in side.holders.items()}


_SIDES: dict[tuple, PyTorchSide] = {}  # the last few PyTorch sides measured in this process
SIDES_KEPT = 4


def _pytorch_side(key: tuple, make) -> PyTorchSide:
    """``make()``'s ``PyTorchSide``, reused for the next file of the same run under the same
    settings (``key``: everything it depends on): evaluating several exports of one run, as
    ``--all``, a study or a joint attack does, measures the PyTorch model once."""
    if key not in _SIDES:
        while len(_SIDES) >= SIDES_KEPT:
            _SIDES.pop(next(iter(_SIDES)))
        _SIDES[key] = make()
    return _SIDES[key]


def _verdict(before: dict, after: dict, bres, ares, cfg: EvalConfig,
             dataset_size: int | None = None,
             held: dict[str, tuple[AttackResult, AttackResult]] | None = None) -> dict:
    """PASS, FAIL or INCONCLUSIVE (SPEC §9), from the SAME samples scored by every attack on
    both models: the attacks fitted once, on the PyTorch model's known outputs, and applied to
    both, and those of ``held`` (``held_by_file``), fitted to the file and applied to both.

    The burden of proof is on safety: for each of ``VERDICT_FIGURES`` (folded MIA accuracy,
    folded AUC, TPR at 1% FPR), the rise after − before of every attack, and the largest of
    them, get a paired bootstrap interval (``paired_rises``: one resample draws every attack,
    so looking at many does not flatter the result). PASS when the upper bound of the largest
    rise is below ``max_mia_rise`` for every figure, and task accuracy fell by at most
    ``max_task_drop``; FAIL when some attack's rise is above the tolerance with a lower bound
    above zero that holds for all the attacks' figures at once (max-t, so 45 looks do not
    FAIL a file on chance), or accuracy fell by more; otherwise INCONCLUSIVE, with an
    estimate of the evaluated samples that would decide it (flagged when it is more than
    ``dataset_size``, the samples the dataset has). A figure the sample size cannot resolve
    (``not_decidable``: TPR at 1% FPR on fewer than 1,000 non-members) is left out and said
    so. MIA accuracy is read at the PyTorch model's thresholds on both models; AUC and TPR
    need none."""
    shared = [k for k in bres.results if k in ares.results]
    n_m, n_n = int(bres.is_member.sum()), int((~bres.is_member).sum())
    undecidable = {f: why for f in VERDICT_FIGURES if (why := not_decidable(f, n_n))}
    figures = tuple(f for f in VERDICT_FIGURES if f not in undecidable)
    # every attacker is fitted once, on the PyTorch model: its decision threshold too, so a
    # file whose outputs barely moved gets the same decisions (refitted on a few hundred known
    # samples, a threshold jumps, and a float16 file read +3 points on 50 + 50 samples)
    # ``held``: the attacks fitted to the file, applied to both at their own threshold
    pairs = {k: (bres.results[k], ares.results[k], bres.results[k].threshold) for k in shared}
    pairs.update({k: (b, a, a.threshold) for k, (b, a) in (held or {}).items()})
    names = list(pairs)
    rises = paired_rises({k: (b.scores, b.threshold) for k, (b, _, _) in pairs.items()},
                         {k: (a.scores, t) for k, (_, a, t) in pairs.items()},
                         bres.is_member, figures=figures, ranking_only=frozenset(held or {}))
    tol = cfg.max_mia_rise
    task_drop = before["task_acc"] - after["task_acc"]
    reasons, open_ = [], []
    looks = sum(d["delta"] is not None for a in rises["attacks"].values() for d in a.values())
    for name in names:
        for fig, d in rises["attacks"][name].items():
            if d["ci"] and d["delta"] > tol and d["lower_all"] > 0:
                reasons.append(f"{_FIGURE_NAMES[fig]} of the {name} attack rose by "
                               f"{100 * d['delta']:.2f} points (lower bound over all {looks} "
                               f"attack figures at once {100 * d['lower_all']:+.2f}; its own "
                               f"95% interval {100 * d['ci'][0]:+.2f} to "
                               f"{100 * d['ci'][1]:+.2f}; allowed {100 * tol:g})")
    if task_drop > cfg.max_task_drop:
        reasons.append(f"task accuracy fell by {100 * task_drop:.2f} points (allowed "
                       f"{100 * cfg.max_task_drop:g})")
    needed = 0
    for fig, d in rises["max"].items():
        if d["delta"] is None:
            continue  # no attack measures it on this many samples
        upper = d["ci"][1] if d["ci"] else d["delta"]
        if upper < tol:
            continue
        open_.append(f"{_FIGURE_NAMES[fig]}: the largest rise ({d['attack']}) is "
                     f"{100 * d['delta']:+.2f} points, 95% upper bound {100 * upper:+.2f}, "
                     f"tolerance {100 * tol:g}")
        # the interval narrows as 1/sqrt(n): the samples at which its upper bound would fall
        # below the tolerance if the point rise stayed where it is (none when it is above)
        needed = (None if needed is None or d["delta"] >= tol else
                  max(needed, int(np.ceil((n_m + n_n) * ((upper - d["delta"])
                                                         / (tol - d["delta"])) ** 2))))
    outcome = FAIL if reasons else INCONCLUSIVE if open_ else PASS
    needed = needed if outcome == INCONCLUSIVE else None
    return {"outcome": outcome, "passed": outcome == PASS, "reasons": reasons,
            "undecided": open_ if outcome == INCONCLUSIVE else [],
            "not_decidable": list(undecidable.values()), "samples_needed": needed,
            "samples_needed_exceed_data": bool(needed and dataset_size
                                               and needed > dataset_size),
            "rises": rises, "attacks": names, "task_drop": task_drop, "max_mia_rise": tol,
            "max_task_drop": cfg.max_task_drop, "evaluated": n_m + n_n,
            "detectable_rise": detectable_rise(n_m, n_n)}


def check_report_targets(json_path: Path, overwrite: bool, what: str = "the report") -> None:
    """A report path must not replace a file (or the plot or the ranked records beside it)
    unless --overwrite says so, nor share its name with them."""
    targets = [json_path, json_path.with_suffix(".png"), exposure_path(json_path)]
    if len(set(targets)) < len(targets):
        raise ConfigError(f"--json {json_path.name}: the ROC plot goes beside the report as "
                          ".png and the ranked records as -exposure.csv, so the report "
                          "needs a name of its own; use a .json name")
    check_targets(targets, overwrite, "--json", what)


def _check_json_out(json_out: Path | None, overwrite: bool) -> None:
    """A report path the user named (``check_report_targets``); the default path in
    RUN/evals/ is the run's own."""
    if json_out is not None:
        check_report_targets(json_out, overwrite)


def exposure_path(json_path: Path) -> Path:
    """Where the ranked records of an evaluation go, beside its JSON report."""
    return json_path.with_name(f"{json_path.stem}-exposure.csv")


@dataclass(frozen=True)
class Target:
    """A file to evaluate, its manifest (None for a run's model.safetensors) and its run,
    each read and verified once per command (``open_targets``) and passed down."""

    file: Path
    manifest: dict | None
    run: RunDir

    @property
    def sha256(self) -> str:
        """The file's sha256 (its manifest's, checked against the file when it was read)."""
        return self.manifest["sha256"] if self.manifest else sha256_file(self.file)


def open_targets(model_files: list[Path | str], run: Path | str | None = None) -> list[Target]:
    """Each file with its checked manifest and its run (``--run``, else the one its manifest
    records), every distinct run opened and verified once (``open_run``); an export must come
    from the model its run holds."""
    targets, opened = [], {}
    for f in map(Path, model_files):
        if not f.exists():
            raise ConfigError(f"model file {f} does not exist")
        regular_file(f)
        manifest = _manifest(f)
        where = run_of(f, run, manifest).resolve()
        if where not in opened:
            opened[where] = open_run(where)
        rd = opened[where]
        # open_run checked model.safetensors against the hash its report records
        if manifest and manifest["source"]["model_sha256"] != \
                rd.read_report()["files"][rd.model.name]:
            raise ConfigError(f"{f.name} was exported from another model than {rd.model} "
                              "(sha256 differs); pass the --run it came from")
        targets.append(Target(f, manifest, rd))
    return targets


def run_of(model_file: Path, run: Path | str | None, manifest: dict | None = None) -> Path:
    """The run a file is evaluated against: ``run`` when given, else the one its manifest
    records (a run's own model.safetensors: its folder)."""
    if run is not None:
        return Path(run)
    manifest = manifest if manifest is not None else _manifest(model_file)
    return Path(manifest["source"]["run"]) if manifest else model_file.parent


def evaluate(model_file: Path | str | Target, cfg: EvalConfig, run: Path | str | None = None,
             json_out: Path | None = None, data_dir: Path | None = None,
             overwrite: bool = False, reference_files: list[Path] | None = None) -> EvalReport:
    """Evaluate ``model_file`` (an export, or a run's model.safetensors) against its run; the
    report goes to ``json_out`` (refused when it exists, unless ``overwrite``) or
    RUN/evals/. The run folder is held under a shared lock meanwhile. ``reference_files``:
    the run's references exported like this file (else their PyTorch models are used).
    ``model_file`` may be a ``Target`` the command opened already (``run`` is then its)."""
    json_out = Path(json_out) if json_out is not None else None
    _check_json_out(json_out, overwrite)
    target = (model_file if isinstance(model_file, Target)
              else open_targets([model_file], run)[0])
    rd = target.run
    # the attackers are fitted on the thread count the run recorded: floating-point sums
    # differ in their last digits between counts, and the figures would not reproduce
    with rd.lock(shared=True), torch_threads(rd.read_config()["config"].get("threads")):
        return _evaluate(target, cfg, json_out, data_dir, reference_files)


def _evaluate(target: Target, cfg: EvalConfig, json_out: Path | None, data_dir: Path | None,
              reference_files: list[Path] | None) -> EvalReport:
    model_file, manifest, rd = target.file, target.manifest, target.run
    ds, splits = load_data(rd, data_dir)
    rc = rd.read_config()["config"]
    attack = cfg.attack or rc["attack"]
    epochs = cfg.attack_epochs or rc["final_attack_epochs"]
    um, un = balanced(splits.unknown_members, splits.unknown_nonmembers)
    needed = np.unique(np.concatenate([splits.test, splits.members,
                                       splits.known_nonmembers, un]))
    pos = {int(i): k for k, i in enumerate(needed)}
    inputs = inputs_of(ds, needed)
    if manifest:
        want = manifest["input"]["shape"][1:]
        if list(inputs.shape[1:]) != want or str(inputs.dtype) != manifest["input"]["dtype"]:
            raise ConfigError(f"{model_file.name} takes {manifest['input']['dtype']} inputs of "
                              f"shape {want}, the run's data is {inputs.dtype} "
                              f"{list(inputs.shape[1:])}")

    # the file came from elsewhere: a native runtime loads and runs it in a child process first
    with open_file_runtime(model_file, cfg, inputs[:1]) as rt:
        probe = rt(inputs[:1])
        if manifest:
            _check_storage(model_file, manifest)
        if probe.ndim != 2 or probe.shape[1] != ds.num_classes:
            raise ConfigError(f"{model_file.name} outputs shape {list(probe.shape[1:])}, the "
                              f"run has {ds.num_classes} classes")
        after_logits = file_logits(rt, inputs, cfg.chunk, f"{rt.name} {model_file.name}")
        runtime = {"name": rt.name, "version": rt.version, "threads": rt.threads}
    if not np.isfinite(after_logits).all():
        raise ConfigError(f"{model_file.name} produced non-finite logits in {rt.name}")

    # the PyTorch model is attacked with the references' PyTorch models, the file with the
    # references exported like it when they were (--references-export)
    index = np.concatenate([splits.known_members, splits.known_nonmembers, um, un])
    runs = references_of(rd, cfg.references) if cfg.references != 0 else []
    if cfg.references and len(runs) < cfg.references:  # refused before anything is measured
        raise ConfigError(f"{rd.path} has fewer than {cfg.references} finished reference "
                          "models; build them with `safeexport evaluate --references K` "
                          "or `safeexport compress --references K`")
    seeds = cfg.attack_seeds or rc.get("attack_seeds", 1)
    args = (pos, ds.y, splits, ds.num_classes, attack, epochs, rc["seed"], rc["lam"], seeds)

    def measure_pytorch() -> PyTorchSide:
        with open_runtime(rd.model, "torch") as ref:
            logits = file_logits(ref, inputs, cfg.chunk, "torch model.safetensors")
        refs = (reference_outputs(rd, index, cfg.references, data_dir, references=runs)
                if cfg.references != 0 else None)
        figures, res = measure(logits, *args, refs)
        holders = {}
        for name in dict.fromkeys([attack, *HOLDER_TRAINED]):
            if ATTACKS.get(name)(ds.num_classes, "cpu").trains:
                holders[f"{name}@file"] = res.attackers[0] if name == attack else \
                    holder_start(rows_of(logits, pos), ds.y, splits, ds.num_classes, name,
                                 epochs, rc["seed"], TAG, torch.device("cpu"))
        return PyTorchSide(logits, refs, figures, res, holders)

    # everything the PyTorch side depends on: the run's recorded files (model, config,
    # split), the data, the attack settings, the references and the thread count
    key = (str(rd.path.resolve()), json.dumps(rd.read_report()["files"], sort_keys=True),
           str(data_dir), attack, epochs, seeds, cfg.references, cfg.chunk, len(needed),
           tuple((str(r.path), r.report.stat().st_mtime_ns) for r in runs),
           torch.get_num_threads())
    side = _pytorch_side(key, measure_pytorch)
    before_logits, before, bres = side.logits, side.figures, side.result
    refs = side.refs
    if reference_files is not None:
        refs = reference_outputs(rd, index, cfg.references, data_dir, reference_files,
                                 references=runs)
    # the trained attacker is fitted once, on the PyTorch model, and applied to the file: a
    # file whose outputs equal the model's gets identical scores
    after, ares = measure(after_logits, *args, refs, bres.attackers)
    test_rows = [pos[i] for i in splits.test]
    parity = logit_parity(before_logits[test_rows], after_logits[test_rows], ds.y[splits.test])
    held = held_by_file(side, after_logits, pos, ds.y, splits, epochs, rc["seed"])
    verdict = _verdict(before, after, bres, ares, cfg, len(ds), held)
    keys = ("task_acc", "train_acc", "mia_acc", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr",
            "tm_score")

    def delta(k: str) -> float | None:
        return None if after[k] is None or before[k] is None else after[k] - before[k]

    report = {
        "model_file": str(model_file.resolve()), "sha256": target.sha256,
        "export": ({k: manifest[k] for k in ("format", "bits", "scheme")} if manifest
                   else {"format": "pytorch", "bits": 32, "scheme": None}),
        "run": str(rd.path.resolve()), "runtime": runtime,
        "manifest_checked": list(MANIFEST_CHECKED) if manifest else [],
        "attack": {"name": attack, "epochs": epochs, "seed": rc["seed"], "seeds": seeds},
        "samples": {"test": len(splits.test), "known_members": len(splits.known_members),
                    "known_nonmembers": len(splits.known_nonmembers),
                    "eval_members": len(um), "eval_nonmembers": len(un)},
        "before": before, "after": after,
        "delta": {k: delta(k) for k in keys},
        "parity": parity,
        "verdict": verdict,
        "warnings": sorted(set(before["warnings"] + after["warnings"])),
        "config": cfg.to_dict(),
    }
    exposure = ares.exposure(ds.y)
    report["exposure"] = exposure_for_report(exposure)
    if refs is not None and refs.models == "pytorch":
        report["warnings"].append("the reference models are PyTorch models, not files exported "
                                  "like this one")
    stem = f"{model_file.stem}-{rt.name}"
    json_path = Path(json_out) if json_out else rd.path / "evals" / f"{stem}.json"
    plot_path = json_path.with_suffix(".png")
    write_json(json_path, report)
    write_exposure_csv(exposure_path(json_path), exposure)
    plot_roc({**roc_curves(bres, "PyTorch (before export)", thresholds=False),
              **roc_curves(ares, f"{model_file.name} on {rt.name}")},
             plot_path, f"MIA before and after export\n{model_file.name}",
             before["n_nonmembers"])
    return EvalReport(report, json_path, plot_path, ares)


@dataclass
class JointReport:
    """Several variants of one model evaluated each (``reports``) and attacked jointly."""

    reports: list[EvalReport]
    joint: dict
    json_path: Path

    @property
    def outcome(self) -> str:
        """FAIL when a file fails, else INCONCLUSIVE when one is, else PASS."""
        outcomes = {r.outcome for r in self.reports}
        return FAIL if FAIL in outcomes else INCONCLUSIVE if INCONCLUSIVE in outcomes else PASS

    @property
    def passed(self) -> bool:
        return self.outcome == PASS


def evaluate_variants(model_files: list[Path | str] | list[Target], cfg: EvalConfig,
                      run: Path | str | None = None, json_out: Path | None = None,
                      data_dir: Path | None = None, overwrite: bool = False,
                      reference_files: dict[Path, list[Path]] | None = None) -> JointReport:
    """Evaluate each of several exports of ONE run (each report in RUN/evals/; with
    ``reference_files``, each file's references exported like it), then the joint attack of
    an attacker who holds them all (``joint_attack``); its report goes to ``json_out`` or
    RUN/evals/joint-<files>.json."""
    if len({Path(f.file if isinstance(f, Target) else f) for f in model_files}) \
            != len(model_files):
        raise ConfigError("a file is named twice; name each variant once")
    targets = (model_files if all(isinstance(f, Target) for f in model_files)
               else open_targets(model_files, run))
    runs = {t.run.path.resolve() for t in targets}
    if len(runs) > 1:
        raise ConfigError(f"the files come from different runs ({', '.join(map(str, runs))}); "
                          "a joint attack takes variants of one model")
    _check_json_out(json_out, overwrite)
    reports = [evaluate(t, cfg, None, None, data_dir, False,
                        reference_files[t.file] if reference_files else None)
               for t in targets]
    joint = joint_attack([r.result for r in reports])
    joint = {"files": [r.report["model_file"] for r in reports],
             "exports": [r.report["export"] for r in reports],
             "runtimes": [r.report["runtime"]["name"] for r in reports], **joint}
    stems = "+".join(t.file.stem for t in targets)
    if len(stems) > 120:  # a file name stays well under the 255 bytes filesystems allow
        stems = f"{len(targets)}-files-{hashlib.sha256(stems.encode()).hexdigest()[:12]}"
    json_path = json_out or Path(reports[0].report["run"]) / "evals" / f"joint-{stems}.json"
    write_json(json_path, joint)
    return JointReport(reports, joint, json_path)
