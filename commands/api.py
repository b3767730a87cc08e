"""The public Python API: one function per command, with the command's options as keyword
arguments (``--update-frequency`` is ``update_frequency=``; ``--json`` is ``json_out=``, ``--all``
is ``all_variants=``, ``study --compare`` is ``compare=``). The command line calls these
functions, so both take the same path and give the same errors: a ``SafeExportError``
(``ConfigError``, ``DataError``, ...) whose message is the command's one line, or ``TypeError``
for an option that does not exist.

    from safeexport import compress, export, evaluate

    run = compress("runs/digits", dataset="digits", sparsity=0.05, epochs=40)
    exported = export(run.path, format="tflite", bits=8)
    report = evaluate(exported.path)
    print(report.outcome, report.report["verdict"]["reasons"])  # PASS, FAIL or INCONCLUSIVE
"""

import re
import time
from dataclasses import replace
from pathlib import Path

from compressor.config import CompressConfig
from device_eval.config import EvalConfig
from exporters.config import ExportConfig
from safeexport.errors import ConfigError

# the figures logged to MLflow for each measured model
FIGURES = ("task_acc", "train_acc", "mia_acc", "auc", "tpr_at_1pct_fpr", "tm_score")


def _trust(cfg: dict | CompressConfig) -> None:
    """Allow importing the model and Dataset factories ``cfg`` names."""
    from safeexport.plugins import is_ref, trust

    get = cfg.get if isinstance(cfg, dict) else lambda k: getattr(cfg, k)
    model, dataset = str(get("model")), str(get("dataset"))
    if is_ref(model):
        trust(model)
    if dataset.startswith("torch:"):
        trust(dataset[len("torch:"):])


def _trust_run(run: Path | str | None, trust_code: bool) -> None:
    """With ``trust_code``, allow importing the factories the run's config.json names."""
    if trust_code:
        from safeexport.runio import open_run

        _trust(open_run(run).read_config()["config"])


def default_out(dataset: str, model: str, sparsity: float) -> Path:
    """``runs/<dataset>-<model>-s<sparsity>-<time>`` (``auto`` resolved to the model the data
    gets), with characters a folder name should not carry (a path's slashes, a factory's
    colon) replaced."""
    from safeexport.models import resolved_model

    model = resolved_model(model, dataset)
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(dataset.split(":", 1)[-1]).name or dataset)
    model = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
    return Path("runs") / f"{tag}-{model}-s{sparsity:g}-{time.strftime('%Y%m%d-%H%M%S')}"


def compress(out: Path | str | None = None, *, resume: bool = False, overwrite: bool = False,
             progress: bool | None = None, mlflow: str | None = None,
             trust_code: bool = False, **options):
    """``safeexport compress``: SafeCompress (or ``method=`` a baseline) into the run directory
    ``out`` (default ``runs/<dataset>-<model>-s<sparsity>-<time>``); ``options`` are
    CompressConfig's fields. ``resume=True`` continues the run in ``out`` with its recorded
    config (no options then; ``trust_code`` allows importing the factories it names).
    ``mlflow``: a tracking URI to log the run to. Returns the ``RunDir``."""
    from compressor.run import compress as run_compress

    _check_tracking(mlflow)
    if resume:
        if out is None:
            raise ConfigError("resume needs the run directory (out, --out RUN_DIR)")
        if options:
            raise ConfigError(f"resume takes the configuration from {out}/config.json; drop "
                              + ", ".join(f"{k} (--{k.replace('_', '-')})"
                                          for k in sorted(options)))
        if trust_code:
            from safeexport.rundir import RunDir

            _trust(RunDir(out).read_config()["config"])
        run = run_compress(CompressConfig(), out, resume=True, progress=progress)
    else:
        cfg = CompressConfig(**options)
        _trust(cfg)  # the caller named them
        run = run_compress(cfg, out or default_out(cfg.dataset, cfg.model, cfg.sparsity),
                           overwrite=overwrite, progress=progress)
    if mlflow:
        _log_compress(mlflow, run)
    return run


def _check_tracking(uri: str | None) -> None:
    if uri:
        from commands.tracking import check

        check(uri)


def _log_compress(uri: str, run) -> None:
    from commands.tracking import log_run

    config, report = run.read_config(), run.read_report()
    metrics = {key: {k: report[key].get(k) for k in FIGURES} | {
        "strongest_mia_acc": report[key]["strongest"]["mia_acc"]}
        for key in ("compressed", "dense") if key in report}
    log_run(uri, f"compress {run.path.name}", {"config": config["config"],
                                                "model": config["model"],
                                                "versions": config["versions"]},
            metrics, [run.config, run.report, run.model_json, run.roc_png, run.curve_png])


def replay(config_file: Path | str, out: Path | str | None = None, *, overwrite: bool = False,
           progress: bool | None = None, mlflow: str | None = None, trust_code: bool = False):
    """``safeexport run``: compress again with a run's recorded config.json, or a YAML/JSON file
    of the same keys, into ``out`` (``trust_code`` allows importing the factories the file
    names). Returns the new ``RunDir``."""
    from compressor.run import compress as run_compress

    cfg = CompressConfig.from_file(Path(config_file))
    if trust_code:
        _trust(cfg)
    _check_tracking(mlflow)
    run = run_compress(cfg, out or default_out(cfg.dataset, cfg.model, cfg.sparsity),
                       overwrite=overwrite, progress=progress)
    if mlflow:
        _log_compress(mlflow, run)
    return run


def export(run: Path | str | None = None, *, out: Path | str | None = None,
           all_variants: bool = False, overwrite: bool = False,
           data_dir: Path | str | None = None, progress: bool | None = None,
           mlflow: str | None = None, trust_code: bool = False, **options):
    """``safeexport export``: quantize and convert the run's model (default: the newest
    finished run under runs/); ``options`` are ExportConfig's fields (``format``, ``bits``,
    ``scheme``...). Returns the ``ExportedModel`` (file, manifest), or with
    ``all_variants=True`` one row per format x bit width (failed ones carry their reason)."""
    from exporters.run import export as run_export
    from exporters.run import export_all

    cfg = ExportConfig(**options)
    _check_tracking(mlflow)
    _trust_run(run, trust_code)
    data = Path(data_dir) if data_dir is not None else None
    if all_variants:
        if out is not None:
            raise ConfigError("all_variants (--all) writes into RUN/exports/; drop out "
                              "(--out)")
        if mlflow:
            raise ConfigError("--mlflow logs one export; drop --all or --mlflow")
        return export_all(cfg, run, overwrite, data, progress)
    res = run_export(cfg, run, Path(out) if out is not None else None, overwrite, data)
    if mlflow:
        from commands.tracking import log_run

        m = res.manifest
        log_run(mlflow, f"export {res.path.name}",
                {k: m[k] for k in ("format", "bits", "scheme", "source", "versions")},
                {"sizes": m["sizes"], "parity": m["parity"]}, [res.manifest_path, res.path])
    return res


def _export_settings(target) -> dict:
    """The ExportConfig recorded in an export's (checked) manifest: --references-export
    exports the references the same way."""
    config = target.manifest.get("config") if target.manifest else None
    if not isinstance(config, dict):
        raise ConfigError(f"--references-export needs an exported .onnx/.tflite file with its "
                          f"manifest; {target.file.name} has none (without the flag the "
                          "references are PyTorch models)")
    return config


def evaluate(model_file: Path | str, *more: Path | str, run: Path | str | None = None,
             json_out: Path | str | None = None, data_dir: Path | str | None = None,
             overwrite: bool = False, members: Path | str | None = None,
             nonmembers: Path | str | None = None, test: Path | str | None = None,
             mlflow: str | None = None, trust_code: bool = False, model: str | None = None,
             train_config: Path | str | None = None, **options):
    """``safeexport evaluate``: task accuracy and membership attacks on ``model_file`` in its
    runtime, beside the run's PyTorch model, and the verdict; ``options`` are EvalConfig's
    fields. With ``members`` (and ``nonmembers``, or a ``member`` array in the members npz),
    an audit of a file safeexport did not make: its figures, no verdict; with ``model`` (the
    file's architecture, e.g. ``package.module:factory``), ``references=K`` and optionally
    ``train_config`` (a YAML/JSON of compress keys saying how it was trained; default a
    dense model), LiRA and RMIA on the file with K reference models. Returns the
    ``EvalReport`` (``.outcome``: PASS, FAIL or INCONCLUSIVE; ``.passed``, ``.report``,
    ``.json_path``). With ``more`` files (other variants of the same run's model): each is
    evaluated, then attacked jointly with the others; returns the ``JointReport``
    (``.reports``, ``.joint``, ``.json_path``)."""
    cfg = EvalConfig(**options)
    variants = [model_file, *more]
    _check_tracking(mlflow)
    out = Path(json_out) if json_out is not None else None
    if members is not None:
        from device_eval.audit import audit

        if run is not None or data_dir is not None or more:
            raise ConfigError("--members audits one file on your data; drop --run/--data-dir "
                              "and name one file")
        train = _audit_training(model, train_config, trust_code, cfg.references)
        build = None
        if train is not None:
            from compressor.references import ensure_audit_references
            from compressor.run import compress as run_compress

            def build(folder, ds, splits):
                return ensure_audit_references(folder, ds, splits, train, cfg.references,
                                               run_compress)
        res = audit(model_file, members, nonmembers, test, cfg, out, overwrite,
                    build_references=build)
        metrics = {"figures": {k: res.report["figures"].get(k) for k in FIGURES}}
    else:
        if nonmembers is not None or test is not None or model is not None \
                or train_config is not None:
            raise ConfigError("--nonmembers, --test, --model and --train-config go with "
                              "--members (an audit of a file safeexport did not make); a "
                              "run's file is attacked with the run's own references")
        from device_eval.run import evaluate as run_evaluate
        from device_eval.run import open_targets

        # each file's manifest and its run are read and verified once, here, and passed down
        targets = open_targets(variants, run)
        if trust_code:  # the manifest names the run, whose config names the factories
            _trust(targets[0].run.read_config()["config"])
        data = Path(data_dir) if data_dir is not None else None
        if cfg.references:
            from compressor.references import ensure_run_references
            from compressor.run import compress as run_compress

            ensure_run_references(targets[0].run, cfg.references, run_compress, data)
        ref_files = None
        if cfg.references_export:
            from exporters.run import export_references

            ref_files = {t.file: export_references(t.run, _export_settings(t),
                                                   cfg.references, data) for t in targets}
        if len(targets) > 1:
            from device_eval.run import evaluate_variants

            res = evaluate_variants(targets, cfg, run, out, data, overwrite, ref_files)
            metrics = {"joint": {k: res.joint["strongest_joint"].get(k) for k in FIGURES},
                       "single": {k: res.joint["strongest_single"].get(k) for k in FIGURES}}
        else:
            res = run_evaluate(targets[0], cfg, run, out, data, overwrite,
                               ref_files[targets[0].file] if ref_files else None)
            metrics = {key: {k: res.report[key].get(k) for k in FIGURES}
                       for key in ("before", "after")}
        metrics["passed"] = int(res.passed)
        metrics["inconclusive"] = int(res.outcome == "INCONCLUSIVE")
    if mlflow:
        from commands.tracking import log_run

        if more:
            log_run(mlflow, f"evaluate {len(variants)} variants jointly",
                    {"model_files": res.joint["files"], "config": cfg.to_dict()}, metrics,
                    [res.json_path, *(r.json_path for r in res.reports)])
        else:
            r = res.report
            log_run(mlflow, f"evaluate {Path(model_file).name}",
                    {"model_file": r["model_file"], "sha256": r["sha256"],
                     "runtime": r["runtime"], "attack": r["attack"], "config": r["config"]},
                    metrics, [res.json_path, res.plot_path])
    return res


def _audit_training(model: str | None, train_config: Path | str | None, trust_code: bool,
                    references: int | None) -> CompressConfig | None:
    """How the audited file's model was trained, for its reference models: ``train_config``
    (compress keys; default a dense model) with ``model`` as the architecture. None when no
    references are asked for."""
    if not references:
        if model is not None or train_config is not None:
            raise ConfigError("--model and --train-config describe the reference models of "
                              "an audit; add --references K (at least 2)")
        return None
    cfg = (CompressConfig.from_file(Path(train_config)) if train_config is not None
           else CompressConfig(method="dense"))
    if trust_code:
        _trust(cfg)
    if model is not None:
        _trust({"model": model, "dataset": ""})  # the caller named it
        cfg = replace(cfg, model=model)
    if cfg.model == "auto":
        raise ConfigError("--references in an audit needs --model (or model in "
                          "--train-config): the file's architecture, e.g. cnn or "
                          "package.module:factory, to train reference models like it")
    return cfg


def study(out: Path | str, *, compare: list[str] | None = None,
          bits: list[int] = (8, 4, 3, 2), format: str = "tflite", seeds: int = 1,
          finetune_epochs: int = 0, progress: bool | None = None, **options):
    """``safeexport study``: the prune → retrain → quantize study (``bits`` in ``format``;
    with ``finetune_epochs``, each width also fine-tuned before export), or with
    ``compare=[methods]`` the methods side by side, ``seeds`` seeds each, into ``out``;
    ``options`` are the training fields of CompressConfig. Returns the ``StudyResult``
    (``rows``, ``markdown``, ``files``)."""
    from study import compare as run_compare
    from study import study as run_study

    cfg = CompressConfig(**options)
    _trust(cfg)  # the caller named them
    if compare is not None:
        if finetune_epochs:
            raise ConfigError("--finetune-epochs adds rows to the pruning/quantization study; "
                              "--compare exports nothing (drop one of them)")
        return run_compare(cfg, out, list(compare), seeds, progress)
    return run_study(cfg, out, list(bits), format, seeds, progress, finetune_epochs)


def report(run: Path | str | None = None, *, out: Path | str | None = None,
           overwrite: bool = False, data_dir: Path | str | None = None,
           trust_code: bool = False) -> Path:
    """``safeexport report``: the run's one-page HTML report (verdicts, figures with intervals,
    plots, most exposed records, exports, hashes) at ``out`` (default RUN/report.html).
    Returns its path."""
    from safeexport.html_report import write_report

    _trust_run(run, trust_code)
    return write_report(run, Path(out) if out is not None else None, overwrite,
                        Path(data_dir) if data_dir is not None else None)
