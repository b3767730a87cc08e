"""``study``: one dense model → pruned (no retraining) → retrained → quantized to each bit
width, each measured for train/test accuracy and membership-inference risk; ``compare``:
several methods at one sparsity, the paper's table.

Every method of a seed runs into ``OUT/seed-<s>/<method>/`` (the study's pruned-only row into
``prune-no-retrain/``), a normal run directory, on the same split and seeds; the dense model is
trained once per seed (``dense/``) and the other runs start from it. A run already finished
with the same settings is reused, so a stopped study resumes by running the same command again.
"""

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from compressor import compress
from compressor.config import EXECUTION_KEYS, CompressConfig
from compressor.run import method_label
from safeexport import names
from safeexport.config import parse_setting
from safeexport.errors import ConfigError
from safeexport.executors import Task, run_tasks
from safeexport.models import resolved_model
from safeexport.rundir import RunDir, atomic_write
from safeexport.runio import REFERENCE_INDEX, REFERENCES
from study.tables import (
    Column,
    Row,
    markdown,
    plot_study,
    plot_tradeoff,
    write_csv,
    write_seeds_csv,
)

PRIVACY_COLUMNS = [Column("mia_acc", "MIA Acc", better=-1, fold=True),
                   Column("auc", "AUC", ".3f", -1, fold=True),
                   Column("tpr_at_1pct_fpr", "TPR@1%FPR", ".3f", -1),
                   Column("strongest_mia_acc", "Strongest attack MIA Acc", better=-1, fold=True)]
STUDY_COLUMNS = [Column("train_acc", "Train Acc"), Column("task_acc", "Test Acc"),
                 *PRIVACY_COLUMNS]
COMPARE_COLUMNS = [Column("task_acc", "Task Acc", better=1), PRIVACY_COLUMNS[0],
                   Column("tm_score", "TM-score", ".3f", 1), *PRIVACY_COLUMNS[1:],
                   Column("optimizer_steps", "Steps", ".0f"),
                   Column("wall_time_s", "Wall time (s)", ".0f")]
REFERENCE_COLUMNS = [Column("lira_auc", "LiRA AUC", ".3f", -1, fold=True),
                     Column("lira_tpr_at_1pct_fpr", "LiRA TPR@1%FPR", ".3f", -1),
                     Column("rmia_auc", "RMIA AUC", ".3f", -1, fold=True),
                     Column("rmia_tpr_at_1pct_fpr", "RMIA TPR@1%FPR", ".3f", -1)]


# a row's size: the masked layers' non-zero weights, and every parameter's (biases, norms,
# embeddings: most of a transformer's parameters stay dense)
SIZE_COLUMNS = ["Weights", "Non-zero params"]


def _sizes(m: dict) -> dict[str, str]:
    """The SIZE_COLUMNS texts of a run's figures (a dash where a run predates the whole-model
    count)."""
    whole = ("–" if "nonzero_parameters" not in m else
             f"{m['nonzero_parameters']:,} ({100 * m['model_density']:.1f}%)")
    return {"Weights": f"{m['nonzero_weights']:,}", "Non-zero params": whole}


def row_figures(m: dict, columns: list[Column]) -> tuple[dict, dict]:
    """(figures, intervals) of ``columns`` from one model's report entry, with the strongest
    attack's MIA accuracy (the configured attack or a threshold attack, whichever reads
    highest) as ``strongest_mia_acc``."""
    m = {**m, "strongest_mia_acc": m["strongest"]["mia_acc"]}
    ci = {**m.get("ci", {}), "task_acc": m.get("task_acc_ci"),
          "strongest_mia_acc": m["strongest"].get("ci", {}).get("mia_acc")}
    for attack in names.REFERENCE_ATTACKS:  # the reference attacks, when the run has references
        f = m.get("reference_attacks", {}).get(attack)
        for key in ("auc", "tpr_at_1pct_fpr") if f else ():
            m[f"{attack}_{key}"], ci[f"{attack}_{key}"] = f[key], f.get("ci", {}).get(key)
    return ({c.key: m[c.key] for c in columns if c.key in m},
            {c.key: ci.get(c.key) for c in columns})


@dataclass
class StudyResult:
    """The table's rows and the files written."""

    rows: list[Row]
    markdown: str
    files: list[Path]


def seeds_of(cfg: CompressConfig, n: int) -> list[int]:
    """``n`` consecutive seeds from the config's."""
    if n < 1:
        raise ConfigError(f"--seeds must be at least 1, got {n}")
    return [cfg.seed + i for i in range(n)]


def run_method(cfg: CompressConfig, path: Path, progress: bool | None,
               dense_from: Path | None = None) -> dict:
    """The report of ``cfg`` run into ``path``: reused when finished there with the same
    settings, continued when unfinished, started otherwise."""
    run = RunDir(path)
    if run.is_run():
        recorded = CompressConfig.from_run_record(run.read_config()).to_dict()
        own = cfg.to_dict()
        diff = sorted(k for k in own if recorded.get(k) != own[k] and k not in EXECUTION_KEYS)
        if diff:
            pinned = ("; it trained with --optimizer "
                      f"{recorded['optimizer']} --lr {recorded['lr']}, what --optimizer auto "
                      "meant for its model then: pass those to continue this study"
                      if set(diff) <= {"optimizer", "lr"} and own["optimizer"] == "auto"
                      else "")
            raise ConfigError(f"{path} holds a run with other settings ({', '.join(diff)})"
                              f"{pinned}; remove it or choose another --out for this study")
        compress(cfg, path, resume=True, progress=progress, dense_from=dense_from)
    else:
        compress(cfg, path, progress=progress, dense_from=dense_from)
    return run.read_report()


def references_used(run: Path, dense: Path) -> str:
    """Which reference models ``run`` read: the first 8 hex digits of the hash of their
    settings keys (references/index.json), and whether they are the seed's ``dense`` run's
    (the same keys: the same models, trained once) or its own."""
    def keys(path: Path) -> list[str]:
        index = path / REFERENCES / REFERENCE_INDEX
        return ([m["settings_sha256"] for m in json.loads(index.read_text())["models"].values()]
                if index.is_file() else [])

    own = keys(run)
    if not own:
        return "none"
    name = hashlib.sha256("".join(own).encode()).hexdigest()[:8]
    if run == dense:
        return f"{name} (trained here)"
    return f"{name} ({'the dense run' if own == keys(dense) else 'its own'})"


def _base(cfg: CompressConfig, seed: int) -> CompressConfig:
    # every row has its own run; the dense row is the dense run itself
    return replace(cfg, seed=seed, dense_reference=False)


# What a study folder holds: one folder per seed and the tables and plots of both commands.
STUDY_FILES = {*(f"{name}.{ext}" for name in ("study", "compare") for ext in ("md", "csv", "png")),
               "compare-seeds.csv"}


def _check_out(out: Path) -> None:
    """A study writes (and rewrites) its tables into ``out``: refuse a run directory and a
    folder holding anything a study does not write, so nobody's files are replaced."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder; choose another --out")
    if RunDir(out).is_run():
        raise ConfigError(f"{out} is a run directory; a study writes its runs into a folder "
                          "of its own, choose another --out")
    foreign = sorted(p.name for p in out.iterdir()
                     if not (p.name in STUDY_FILES or p.name.startswith(".")
                             or (p.is_dir() and p.name.startswith("seed-")))) \
        if out.is_dir() else []
    if foreign:
        raise ConfigError(f"{out} holds files a study does not write ({', '.join(foreign[:3])});"
                          " a study writes into a folder of its own, choose another --out")


def _describe(cfg: CompressConfig, seeds: list[int]) -> str:
    return (f"{resolved_model(cfg.model, cfg.dataset)} on {cfg.dataset}"
            + (f" ({cfg.max_samples} samples)" if cfg.max_samples else "")
            + f", keeping {100 * cfg.sparsity:g}% of weights, {cfg.epochs} epochs, "
            + (f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"))


def _write(out: Path, name: str, rows: list[Row], text_cols: list[str], cols: list[Column],
           ranked: list[str], title: str, note: str,
           plot: Callable[[Path, list[Row], str], None]) -> StudyResult:
    table = markdown(rows, text_cols, cols, ranked)
    md = out / f"{name}.md"
    atomic_write(md, lambda f: f.write(f"# {title}\n\n{table}\n{note}\n".encode()))
    csv_path = out / f"{name}.csv"
    write_csv(csv_path, rows, text_cols, cols)
    png = out / f"{name}.png"
    plot(png, rows, title)
    return StudyResult(rows, table, [md, csv_path, png])


def study(cfg: CompressConfig, out: Path | str, bits: list[int], fmt: str = "tflite",
          seeds: int = 1, progress: bool | None = None,
          finetune_epochs: int = 0) -> StudyResult:
    """Original → pruned without retraining → retrained → quantized (``fmt``, each of
    ``bits``, weight-only), measured on every row with the run's final attack; quantized rows
    on the exported files in their runtime (device_eval), the others in PyTorch. With
    ``finetune_epochs``, each width also gets a row exported after that many epochs of
    quantization-aware fine-tuning (``export --finetune-epochs``)."""
    from exporters.config import SUPPORTED

    out = Path(out).absolute()  # Ray tasks may start in another working directory
    _check_out(out)
    allowed = SUPPORTED[(fmt, "weight-only")] if (fmt, "weight-only") in SUPPORTED else ()
    bad = [b for b in bits if b not in allowed or b > 8]
    if bad or not bits:
        raise ConfigError(f"--bits must list widths {fmt} can store below float "
                          f"({', '.join(str(b) for b in allowed if b <= 8)}), got "
                          f"{','.join(map(str, bits)) or 'none'}")
    if finetune_epochs < 0:
        raise ConfigError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    cfg.check_executor(out)
    seed_list = seeds_of(cfg, seeds)
    # (bits, fine-tuning epochs) of each quantized row, in the table's order
    quantized = [(b, e) for b in bits for e in dict.fromkeys((0, finetune_epochs))]
    labels = ["original (dense)", "pruned, no retraining", "pruned + retrained",
              *(f"{fmt} {b}-bit" + (f" + fine-tuned ({e} ep)" if e else "")
                for b, e in quantized)]
    rows = {label: Row(label) for label in labels}
    # through the executor seam, in three waves of independent tasks (every seed's dense
    # model, then both pruned models that start from it, then every export and its
    # evaluation); a task that fails is reported, the others go on
    inner = progress if cfg.executor == "local" else False
    sdir = {seed: out / f"seed-{seed}" for seed in seed_list}
    failed = []

    def wave(tasks: list[Task]) -> list:
        outcomes = run_tasks(tasks, cfg.executor, progress, **cfg.executor_options())
        failed.extend(o for o in outcomes if not o.ok)
        return outcomes

    dense = wave([Task(f"seed {seed} dense", run_method,
                       (replace(_base(cfg, seed), method="dense"), sdir[seed] / "dense", inner))
                  for seed in seed_list])
    trained = [seed for seed, o in zip(seed_list, dense, strict=True) if o.ok]
    # the same folder `--compare prune` uses for the retrained one, so both share it
    pruning = [(seed, label, folder, epochs) for seed in trained
               for label, folder, epochs in (
                   (labels[1], "prune-no-retrain", 0), (labels[2], "prune", cfg.retrain_epochs))]
    pruned = wave([Task(f"seed {seed} {folder}", run_method,
                        (replace(_base(cfg, seed), method="prune", retrain_epochs=epochs),
                         sdir[seed] / folder, inner, sdir[seed] / "dense"))
                   for seed, _, folder, epochs in pruning])
    retrained = {}  # seed -> the retrained row's text, which its quantized rows share
    for o in dense:
        if o.ok:
            _pytorch_row(rows[labels[0]], o.value)
    for (seed, label, folder, _), o in zip(pruning, pruned, strict=True):
        if o.ok:
            _pytorch_row(rows[label], o.value)
            if folder == "prune":
                retrained[seed] = rows[label].text
    exports = [(seed, b, e, label) for seed in retrained
               for (b, e), label in zip(quantized, labels[3:], strict=True)]
    evaluated = wave([Task(f"seed {seed} {label}", quantized_row,
                           (sdir[seed] / "prune", fmt, b, e)) for seed, b, e, label in exports])
    for (seed, _, _, label), o in zip(exports, evaluated, strict=True):
        if not o.ok:
            continue
        ev = o.value
        figures, intervals = row_figures(ev["after"], STUDY_COLUMNS)
        rows[label].add(figures | {"agreement": ev["parity"]["agreement"]}, intervals)
        rt = ev["runtime"]
        rows[label].text = {"Measured by": f"{rt['name']} {rt['version']}",
                            **{k: retrained[seed][k] for k in SIZE_COLUMNS},
                            "Strongest": ev["after"]["strongest"]["attack"]}
    title = f"Pruning and quantization study: {_describe(cfg, seed_list)}"
    note = ("Every row is measured by the same final attack (the run's attack, trained on "
            "the known members/non-members, tested on the balanced unknown ones) and by the "
            "threshold attacks; 'Strongest' names the attack with the highest MIA accuracy on "
            "that row. One seed: [95% bootstrap interval]. Quantized "
            f"rows are the retrained model exported to {fmt} (weight-only) and run in that "
            "runtime; 'Agreement' is their top-1 agreement with the PyTorch model."
            + (f" '+ fine-tuned' rows were exported after {finetune_epochs} epochs of "
               "quantization-aware fine-tuning on the members (export --finetune-epochs), "
               "so their training saw the members again." if finetune_epochs else ""))
    cols = [*STUDY_COLUMNS, Column("agreement", "Agreement", ".3f")]
    done = [r for r in rows.values() if r.figures]
    result = _write(out, "study", done, ["Measured by", *SIZE_COLUMNS, "Strongest"], cols, [],
                    title, note, plot_study) if done else None
    if failed:  # after writing what finished
        raise ConfigError("; ".join(f"{o.name} failed: {o.error}" for o in failed)
                          + f" (the finished runs are in {out}; the same command resumes)")
    return result


def _pytorch_row(row: Row, report: dict) -> None:
    """A row measured on a run's PyTorch model: its own final evaluation."""
    c = report["compressed"]
    row.add(*row_figures(c, STUDY_COLUMNS))
    row.text = {"Measured by": "PyTorch", **_sizes(c), "Strongest": c["strongest"]["attack"]}


def quantized_row(run: Path, fmt: str, bits: int, finetune_epochs: int) -> dict:
    """The evaluation report of the run's model exported to ``fmt`` at ``bits`` (weight-only,
    kept below the agreement floor: the study measures it), after ``finetune_epochs`` of
    quantization-aware fine-tuning."""
    from device_eval import evaluate
    from device_eval.config import EvalConfig
    from exporters import export
    from exporters.config import ExportConfig

    exp = export(ExportConfig(format=fmt, bits=bits, warn_only=True,
                              finetune_epochs=finetune_epochs), run, overwrite=True)
    return evaluate(exp.path, EvalConfig()).report


# what every row of a comparison shares: a variant may not change them
SHARED_KEYS = ("method", "dataset", "data_dir", "download", "max_samples", "data_seed", "seed",
               "sparsity", *EXECUTION_KEYS)


@dataclass(frozen=True)
class Variant:
    """One row of a comparison: a method, and the settings it runs with other than the
    comparison's (``safecompress/select=random``: SafeCompress with random selection)."""

    spec: str
    method: str
    settings: tuple[tuple[str, object], ...] = ()

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.settings)
        return method_label(self.method) + (f" ({extra})" if extra else "")

    @property
    def folder(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "-", self.spec.replace("/", "."))

    def config(self, base: CompressConfig) -> CompressConfig:
        return CompressConfig.from_dict({**base.to_dict(), "method": self.method,
                                         **dict(self.settings)})


def parse_variant(spec: str, base: CompressConfig) -> Variant:
    """``METHOD`` or ``METHOD/KEY=VALUE[/KEY=VALUE...]`` (``parse_setting``), checked against
    the config's keys and types on top of ``base`` (the comparison's config) at once."""
    method, *pairs = spec.strip().split("/")
    if method not in names.METHODS:
        raise ConfigError(f"--compare: unknown method {method!r} in {spec!r}; known: "
                          f"{', '.join(names.METHODS)}")
    settings = []
    for pair in pairs:
        try:
            key, value = parse_setting(pair)
        except ConfigError as e:
            raise ConfigError(f"--compare: {e} in {spec!r}") from e
        if key in SHARED_KEYS:
            raise ConfigError(f"--compare: {key} is shared by every row of a comparison and "
                              f"cannot change in {spec!r}; set it for the whole comparison")
        settings.append((key, value))
    variant = Variant(spec.strip(), method, tuple(settings))
    variant.config(base)  # unknown keys and wrong types refused before anything runs
    return variant


def compare(cfg: CompressConfig, out: Path | str, methods: list[str], seeds: int = 1,
            progress: bool | None = None) -> StudyResult:
    """Every method of ``methods`` at the config's sparsity, on the same split and seeds: the
    paper's table (Task Acc, MIA Acc, TM-score, AUC, TPR at 1% FPR, wall time), the best
    compressed method's figure in bold. A method may carry its own settings
    (``parse_variant``: ``safecompress/select=random``), so ablations share the table."""
    out = Path(out).absolute()  # Ray tasks may start in another working directory
    _check_out(out)
    if not methods:
        raise ConfigError(f"--compare: no method given; known: {', '.join(names.METHODS)}")
    variants = {v.spec: v for v in (parse_variant(m, cfg) for m in methods)}
    folders = [v.folder for v in variants.values()]
    if len(set(folders)) < len(folders):
        raise ConfigError("--compare: two methods would share one run folder; name each once")
    cfg.check_executor(out)
    methods = list(variants)
    seed_list = seeds_of(cfg, seeds)
    rows = {m: Row(variants[m].label) for m in methods}
    flagged: dict[str, list[str]] = {}
    columns = COMPARE_COLUMNS + (REFERENCE_COLUMNS if cfg.references else [])
    # through the executor seam: every seed's dense model first (the baselines start from
    # it), then every (seed, method) run; one that fails is reported, the others go on
    inner = progress if cfg.executor == "local" else False
    sdir = {seed: out / f"seed-{seed}" for seed in seed_list}
    failed = [o for o in run_tasks(
        [Task(f"seed {seed} dense", run_method, (replace(_base(cfg, seed), method="dense"),
                                                 sdir[seed] / "dense", inner))
         for seed in seed_list], cfg.executor, progress, **cfg.executor_options()) if not o.ok]
    pairs = [(seed, m) for seed in seed_list for m in methods]
    outcomes = run_tasks(
        [Task(f"seed {seed} {m}", run_method,
              (variants[m].config(_base(cfg, seed)), sdir[seed] / variants[m].folder, inner,
               None if m == "dense" else sdir[seed] / "dense")) for seed, m in pairs],
        cfg.executor, progress, **cfg.executor_options())
    for (seed, m), o in zip(pairs, outcomes, strict=True):
        if not o.ok:
            failed.append(o)
            continue
        rep = o.value
        c = rep["compressed"]
        figures, intervals = row_figures(c, columns)
        if "dp" in rep:
            figures["epsilon"] = rep["dp"]["epsilon"]
        if rep.get("rounds"):
            figures["tm_decided"] = rep["selection_rules"].get("tm", 0) / rep["rounds"]
        rows[m].add(figures, intervals, seed)
        rows[m].text = {**_sizes(c), "Strongest": c["strongest"]["attack"]}
        if cfg.references:
            rows[m].text["References"] = references_used(sdir[seed] / variants[m].folder,
                                                         sdir[seed] / "dense")
        for w in c["warnings"]:
            flagged.setdefault(m, []).append(f"seed {seed}: {w}")
            tqdm.write(f"seed {seed} {m}: warning: {w}")
        tqdm.write(f"seed {seed} {m}: task {c['task_acc']:.4f} MIA {c['mia_acc']:.4f} "
                   f"TM {c['tm_score']:.3f} ({c['wall_time_s']:.0f} s)")
    for m in flagged:
        rows[m].label += " (!)"
    ranked = [rows[m].label for m in methods if m != "dense" and m not in flagged]
    title = f"Methods compared: {_describe(cfg, seed_list)}"
    note = ("Bold: the best compressed method per column (dense, the uncompressed reference, "
            "is not ranked; MIA Acc and AUC rank folded, max(v, 1 - v)); a bold figure whose "
            "interval overlaps another row's is not a measured difference. MIA: the run's "
            f"attack ({cfg.attack}) trained on the known members/non-members, tested on the "
            "balanced unknown ones; 'Strongest' names the attack (it, a threshold attack, or "
            "LiRA/RMIA when references ran) with the highest MIA accuracy. One seed: [95% "
            "bootstrap interval]. TM-score = "
            f"Task Acc^λ / fold(MIA Acc of the strongest attack) (λ = {cfg.lam:g}). "
            "Steps: the optimizer steps that made the row's model from its initialisation (a "
            "pruned model's include the dense model's). Wall time: the whole method's "
            "training, including the dense model a two-step baseline starts from. ε: DP-SGD's "
            "(ε, δ) for its private phase. Rounds decided by TM: the share of SafeCompress's "
            "mask updates whose winner led by more than the paired standard error (the others "
            "went to the tie rule). (!): a warning below; such a row is not ranked.")
    if cfg.references:
        note += (f" LiRA and RMIA (offline): {cfg.references} reference models per run, "
                 f"trained with {'each row' if cfg.reference_method == 'same' else 'a dense'}"
                 "'s method on halves of the known members and non-members; AUC and TPR at "
                 "1% FPR on the same balanced unknown samples. References: the set a row's "
                 "LiRA and RMIA read (of its last seed), named by the hash of its models' "
                 "settings: rows with one name read the same models, trained once in the "
                 "seed's dense run and copied (its own: trained for that row).")
    note += "".join(f"\n\n(!) {rows[m].label}: {w}" for m, ws in flagged.items() for w in ws)
    cols = [*columns, Column("epsilon", "DP ε", ".2f"),
            Column("tm_decided", "Rounds decided by TM", ".2f")]
    done = [r for r in rows.values() if r.figures]
    text_cols = [*SIZE_COLUMNS, "Strongest", *(["References"] if cfg.references else [])]
    result = _write(out, "compare", done, text_cols, cols, ranked, title, note,
                    plot_tradeoff) if done else None
    if result is not None:  # every seed's figures with their intervals
        write_seeds_csv(out / "compare-seeds.csv", done, cols)
        result.files.append(out / "compare-seeds.csv")
    if failed:  # after writing what finished
        raise ConfigError("; ".join(f"{o.name} failed: {o.error}" for o in failed)
                          + f" (the finished runs are in {out}; the same command resumes)")
    return result
