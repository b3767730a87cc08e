"""Reading a finished run back: its model, its data and its splits, checked against the run's
own records. The export and evaluation stages start here; nothing is unpickled."""

from pathlib import Path

import numpy as np
import torch

from safeexport.config import fits, type_name
from safeexport.data import ArrayDataset, load_dataset, to_tensor
from safeexport.data.splits import Splits
from safeexport.errors import ConfigError, DataError
from safeexport.models import build_from_spec
from safeexport.rundir import RunDir, load_tensors, regular_file, sha256_file, tensor_shapes

RUNS_ROOT = Path("runs")


def latest_run(root: Path = RUNS_ROOT) -> RunDir:
    """The most recently finished run under ``root`` (the one whose report.json is newest)."""
    done = sorted((p for p in root.glob("*/report.json")), key=lambda p: p.stat().st_mtime)
    if not done:
        raise ConfigError(f"no finished run under {root}/; run `safeexport compress` first or "
                          "pass --run RUN_DIR")
    return RunDir(done[-1].parent)


# What the later stages read from config.json's "config" and the types they need.
CONFIG_KEYS = {"dataset": str, "data_dir": str | None, "max_samples": int | None, "seed": int,
               "data_seed": int | None, "attack": str, "final_attack_epochs": int,
               "lam": float, "max_length": int, "threads": int | None}


def _need(obj: dict, key: str, kind, where: Path) -> object:
    """``obj[key]`` when it is of type ``kind``, checked as a config file's values are
    (``safeexport.config``'s one checker: an int is a float, a bool is not an int)."""
    value = obj.get(key)
    if not fits(value, kind):  # a key a run predates reads None, which a "| None" accepts
        raise ConfigError(f"{where}: {key!r} is missing or not {type_name(kind)}; the file is "
                          "damaged, re-run `safeexport compress` to make the run again")
    return value


def _check_records(run: RunDir) -> None:
    """Every file a later stage reads must match the sha256 the report recorded for it."""
    files = _need(run.read_report(), "files", dict, run.report)
    for path in run.hashed_files():
        recorded = files.get(path.name)
        if not isinstance(recorded, str):
            raise ConfigError(f"{run.report} has no sha256 record of {path.name} (a run made "
                              "by an older safeexport, or an edited report); re-run "
                              "`safeexport compress` to make the run again")
        actual = sha256_file(path)
        if actual != recorded:
            raise ConfigError(f"{path} does not match its record in report.json (sha256 "
                              f"{actual[:12]} vs {recorded[:12]}): the file was changed or "
                              "replaced")


def _check_structure(run: RunDir) -> None:
    """The fields the later stages use, present and of the right type, before any work."""
    rec = run.read_config()
    cfg = _need(rec, "config", dict, run.config)
    for key, kind in CONFIG_KEYS.items():
        _need(cfg, key, kind, run.config)
    if cfg.get("threads") is not None and cfg["threads"] < 1:
        raise ConfigError(f"{run.config}: 'threads' is {cfg['threads']}, not a thread count; "
                          "the file is damaged, re-run `safeexport compress`")
    _need(rec, "dataset_fingerprint", str, run.config)
    n = _need(rec, "num_samples", int, run.config)
    classes = _need(rec, "num_classes", int, run.config)
    layers = _need(run.read_report(), "layers", list, run.report)
    if not all(isinstance(x, dict) and isinstance(x.get("name"), str)
               and isinstance(x.get("size"), int) for x in layers):
        raise ConfigError(f"{run.report}: 'layers' must list objects with a name and a size")
    spec = run.read_json(run.model_json)
    _need(spec, "name", str, run.model_json)
    kwargs = _need(spec, "kwargs", dict, run.model_json)
    if kwargs.get("num_classes", classes) != classes:
        raise ConfigError(f"{run.model_json}: num_classes {kwargs['num_classes']} differs from "
                          f"the run's {classes} classes")
    splits = Splits.load(run.splits)
    splits.check(n)
    if splits.fingerprint != rec["dataset_fingerprint"]:
        raise ConfigError(f"{run.splits} was made for other data than {run.config} records")


def open_run(path: Path | str | None) -> RunDir:
    """A finished, intact run directory: every file a later stage reads is a regular file,
    has the fields that stage needs, and is the one the run recorded (sha256)."""
    run = latest_run() if path is None else RunDir(path)
    if not run.path.is_dir():
        raise ConfigError(f"run directory {run.path} does not exist")
    missing = [p.name for p in (run.config, run.model_json, run.model, run.splits, run.report)
               if not p.exists()]
    if missing:
        raise ConfigError(f"{run.path} is not a finished run (missing {', '.join(missing)}); "
                          "finish it with `safeexport compress --out RUN --resume`")
    for p in (run.config, run.model_json, run.model, run.splits, run.report):
        regular_file(p)
    _check_records(run)
    _check_structure(run)
    return run


def opened(run: RunDir | Path | str | None) -> RunDir:
    """``run`` itself when it is a ``RunDir`` (by convention one that ``open_run`` returned
    to the command, verified already), else ``open_run(run)``: a command verifies its run
    once and passes the ``RunDir`` down."""
    return run if isinstance(run, RunDir) else open_run(run)


def load_model(run: RunDir, weights: Path | None = None) -> torch.nn.Module:
    """The run's architecture with its weights (``weights`` defaults to model.safetensors),
    on CPU in eval mode."""
    spec = run.read_json(run.model_json)
    weights = weights or run.model
    check_fits(weights, spec, str(run.model_json))
    model = build_from_spec(spec)
    model.load_state_dict(load_tensors(weights))
    return model.eval()


def check_fits(weights: Path, spec: dict, described_by: str) -> None:
    """Refuse a safetensors file whose tensor names and shapes are not those of the model
    ``spec`` (a model.json dict) describes. The model is built on the meta device (nothing
    allocated), so a spec asking for a model of absurd size is refused before memory is spent;
    ``described_by`` names where the spec came from."""
    try:
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in build_from_spec(spec).state_dict().items()}
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"{described_by}: cannot build {spec.get('name')!r} from it "
                          f"({e})") from e
    stored = tensor_shapes(weights)
    if stored != shapes:
        diff = sorted(set(stored.items()) ^ set(shapes.items()))[:3]
        raise ConfigError(f"{weights} does not fit the model {described_by} describes "
                          f"(e.g. {diff})")


def load_data(run: RunDir, data_dir: Path | None = None) -> tuple[ArrayDataset, Splits]:
    """The run's dataset (re-read from ``data_dir``, default the one recorded) and its splits;
    refuses data whose fingerprint differs from the one the run was split on. Text is encoded
    with the run's own tokenizer."""
    rec = run.read_config()
    cfg = rec["config"]
    ds = load_dataset(cfg["dataset"], Path(data_dir or cfg["data_dir"] or "data"),
                      False, cfg["max_samples"],
                      cfg["seed"] if cfg.get("data_seed") is None else cfg["data_seed"])
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


REFERENCES = "references"  # RUN/references/ref-i/: the reference models of the audit
REFERENCE_INDEX = "index.json"


def references_of(run: RunDir, k: int | None = None) -> list[RunDir]:
    """The finished references ``run``'s index records (the first ``k`` of them), each an
    intact run; none when the run has no index. Each is verified once per ``run`` object (a
    command passes its run down, so a reference read twice is opened once), again only when
    its report.json was rewritten (rebuilt) since."""
    root = run.path / REFERENCES
    path = root / REFERENCE_INDEX
    if not path.exists():
        return []
    models = run.read_json(path).get("models")
    if not isinstance(models, dict) or not all(
            isinstance(n, str) and n.startswith("ref-") and n[4:].isdigit() for n in models):
        raise ConfigError(f"{path} is damaged; delete it and build the references again")
    names = sorted(models, key=lambda n: int(n[4:]))
    done = [n for n in names if isinstance(models[n], dict)
            and models[n].get("status") != "failed" and (root / n / "report.json").exists()]
    seen = run.__dict__.setdefault("_verified_references", {})
    out = []
    for n in done[:k]:
        stat = (root / n / "report.json").stat()
        key = (n, stat.st_mtime_ns, stat.st_size)
        if key not in seen:
            seen[key] = open_run(root / n)
        out.append(seen[key])
    return out
