"""Reading a finished run back: its model, its data and its splits, checked against the run's
own records. The export and evaluation stages start here; nothing is unpickled."""

from pathlib import Path

import numpy as np
import torch

from safeexport.data import ArrayDataset, load_dataset, to_tensor
from safeexport.data.splits import Splits
from safeexport.errors import ConfigError, DataError
from safeexport.models import build_from_spec
from safeexport.rundir import RunDir, load_tensors, sha256_file

RUNS_ROOT = Path("runs")


def latest_run(root: Path = RUNS_ROOT) -> RunDir:
    """The most recently finished run under ``root`` (the one whose report.json is newest)."""
    done = sorted((p for p in root.glob("*/report.json")), key=lambda p: p.stat().st_mtime)
    if not done:
        raise ConfigError(f"no finished run under {root}/; run `safeexport compress` first or "
                          "pass --run RUN_DIR")
    return RunDir(done[-1].parent)


def open_run(path: Path | str | None) -> RunDir:
    """A finished, intact run directory: every file a later stage reads is present, and the
    model file is the one the run recorded (sha256)."""
    run = latest_run() if path is None else RunDir(path)
    if not run.path.is_dir():
        raise ConfigError(f"run directory {run.path} does not exist")
    missing = [p.name for p in (run.config, run.model_json, run.model, run.splits, run.report)
               if not p.exists()]
    if missing:
        raise ConfigError(f"{run.path} is not a finished run (missing {', '.join(missing)}); "
                          "finish it with `safeexport compress --out RUN --resume`")
    recorded = run.read_report().get("files", {}).get(run.model.name)
    if recorded is None:
        raise ConfigError(f"{run.report} has no sha256 record of {run.model.name}")
    actual = sha256_file(run.model)
    if actual != recorded:
        raise ConfigError(f"{run.model} does not match its record in report.json (sha256 "
                          f"{actual[:12]} vs {recorded[:12]}): the file was changed or replaced")
    return run


def load_model(run: RunDir, weights: Path | None = None) -> torch.nn.Module:
    """The run's architecture with its weights (``weights`` defaults to model.safetensors),
    on CPU in eval mode."""
    spec = run.read_json(run.model_json)
    model = build_from_spec(spec)
    state = load_tensors(weights or run.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{weights or run.model} does not fit {spec['name']} ({e})") from e
    return model.eval()


def load_data(run: RunDir, data_dir: Path | None = None) -> tuple[ArrayDataset, Splits]:
    """The run's dataset (re-read from ``data_dir``, default the one recorded) and its splits;
    refuses data whose fingerprint differs from the one the run was split on. Text is encoded
    with the run's own tokenizer."""
    rec = run.read_config()
    cfg = rec["config"]
    ds = load_dataset(cfg["dataset"], Path(data_dir or cfg["data_dir"] or "data"),
                      False, cfg["max_samples"], cfg["seed"])
    splits = Splits.load(run.splits)
    fingerprint = ds.fingerprint()
    if fingerprint != splits.fingerprint:
        raise DataError(f"the data found for {cfg['dataset']} differs from the data {run.path} "
                        f"was split on (fingerprint {fingerprint[:12]} vs "
                        f"{splits.fingerprint[:12]}); point --data-dir at the original files")
    if ds.kind == "text":
        from tokenizers import Tokenizer

        from safeexport.models.text import encode

        tok = Tokenizer.from_file(str(run.tokenizer))
        ds = ArrayDataset(ds.name, "text", encode(tok, ds.x, cfg["max_length"]), ds.y,
                          ds.num_classes, ds.class_names)
    return ds, splits


def inputs_of(ds: ArrayDataset, idx: np.ndarray) -> np.ndarray:
    """Model inputs for samples ``idx`` as the numpy array an exported file takes."""
    return to_tensor(ds.x[idx]).numpy()
