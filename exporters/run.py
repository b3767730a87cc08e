"""``export(run, config)``: the run's winner → quantized ONNX/TFLite file → checked in its own
runtime and read back → file + manifest in ``RUN/exports/``.

Nothing partial is left behind: the file is written under a hidden temporary name, checked, and
only then renamed into place, followed by its manifest.
"""

import gzip
import platform
import tempfile
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from tqdm import tqdm

from exporters import onnx_format, qat, tflite_format
from exporters.config import SUPPORTED, ExportConfig
from exporters.quantize import floor_bytes, nonzero_value_bits
from safeexport import names
from safeexport.console import quiet
from safeexport.data.base import ArrayDataset
from safeexport.errors import ConfigError, ExportError, SafeExportError
from safeexport.metrics import logit_parity
from safeexport.registry import Registry
from safeexport.rundir import (
    RunDir,
    check_targets,
    manifest_missing,
    read_json_file,
    sha256_file,
    staged,
    write_json,
)
from safeexport.runio import inputs_of, load_data, load_model, opened, references_of
from safeexport.runtimes import open_runtime, torch_runtime
from safeexport.stored import StoredWeight, width_problems

FORMATS: Registry[ModuleType] = Registry("export format")
FORMATS.register("onnx", onnx_format)
FORMATS.register("tflite", tflite_format)
FORMATS.check(names.FORMATS)

_PACKAGES = ("safeexport", "torch", "onnx", "onnxruntime", "onnxscript", "litert-torch",
             "ai-edge-quantizer", "ai-edge-litert", "numpy")


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


@dataclass
class Source:
    """What every export of one run needs, loaded once: the model, the data, the reference
    logits of the parity sample."""

    run: RunDir
    model: torch.nn.Module
    inputs: np.ndarray  # parity sample (test split)
    labels: np.ndarray
    reference: np.ndarray  # PyTorch logits of the parity sample
    calibration: np.ndarray  # training samples (known members) for static schemes
    layers: list[dict]  # the run's masked layers: name, size, nnz (its weights' non-zeros,
    #                     which can be fewer than the mask's active count: a weight grown at
    #                     the last update may still be exactly zero) and output channels
    params: dict[str, int]  # parameter name -> count
    fingerprint: str  # the dataset's, as the run recorded it
    data: ArrayDataset  # the run's data, and its members (training split): --finetune-epochs
    members: np.ndarray

    @classmethod
    def load(cls, run: RunDir | Path | str | None, parity_samples: int, calibration: int,
             data_dir: Path | None = None) -> "Source":
        """Open and check the run, re-read its data, compute the reference logits."""
        rd = opened(run)
        model = load_model(rd)
        ds, splits = load_data(rd, data_dir)
        test = splits.test[:parity_samples]
        inputs = inputs_of(ds, test)
        reference = torch_runtime(model)(inputs)
        params = dict(model.named_parameters())
        unknown = [x["name"] for x in rd.read_report()["layers"] if x["name"] not in params]
        if unknown:
            raise ConfigError(f"{rd.report} lists layers the model does not have "
                              f"({', '.join(unknown[:3])})")
        layers = [{"name": layer["name"], "size": layer["size"],
                   "nnz": int(torch.count_nonzero(params[layer["name"]])),
                   "channels": int(params[layer["name"]].shape[0])}
                  for layer in rd.read_report()["layers"]]
        return cls(rd, model, inputs, ds.y[test], reference,
                   inputs_of(ds, splits.known_members[:calibration]), layers,
                   {n: p.numel() for n, p in params.items()},
                   rd.read_config()["dataset_fingerprint"], ds, splits.members)


@dataclass
class ExportedModel:
    """An exported file and its manifest."""

    path: Path
    manifest_path: Path
    manifest: dict


def _out_path(src: Source, cfg: ExportConfig, out: Path | None) -> Path:
    suffix = FORMATS.get(cfg.format).SUFFIX
    path = Path(out) if out else src.run.path / "exports" / f"{cfg.name()}{suffix}"
    if path.suffix != suffix:
        raise ConfigError(f"--out {path}: a {cfg.format} file must end in {suffix}")
    return path


def is_manifest(path: Path) -> bool:
    """True when ``path`` is a complete export manifest (``manifest_missing``)."""
    try:
        return not manifest_missing(read_json_file(path))
    except ConfigError:
        return False


def _check_targets(path: Path, manifest_path: Path, overwrite: bool) -> None:
    """Refuse to write over anything that is not an earlier export: the manifest goes to
    ``--out`` with .json, which may name a run's report.json or any user file."""
    if manifest_path.exists() and not is_manifest(manifest_path):
        raise ConfigError(f"the manifest of --out {path.name} would be written to "
                          f"{manifest_path}, which exists and is not an export manifest; "
                          "choose another --out")
    check_targets([path, manifest_path], overwrite, "--out", "the export")


def _check_keep(src: Source, keep: list[str]) -> set[str]:
    known = [layer["name"].removesuffix(".weight") for layer in src.layers]
    unknown = [k for k in keep if k not in known]
    if unknown:
        raise ConfigError(f"--keep-float {', '.join(unknown)}: no such layer; the run's layers "
                          f"are {', '.join(known)}")
    return set(keep)


def _asymmetric(cfg: ExportConfig) -> bool:
    return cfg.levels == "asymmetric"


def _floor(src: Source, bits: int, asymmetric: bool = False) -> float:
    """Information-theoretic size of the run's model at ``bits``: positions and values of the
    masked layers' non-zeros, below 16 bits their float32 scale per output channel (the
    weight's first dimension, as both exporters quantize), plus the dense parameters at float
    width."""
    masked = {layer["name"] for layer in src.layers}
    scale_bytes = 4 if bits <= 8 else 0
    total = sum(floor_bytes(layer["size"], layer["nnz"], nonzero_value_bits(bits, asymmetric))
                + scale_bytes * layer["channels"] for layer in src.layers)
    dense_bits = 16 if bits == 16 else 32
    return total + sum(n for k, n in src.params.items() if k not in masked) * dense_bits / 8


def check_weights(stored: list[StoredWeight], layers: list[dict], cfg: ExportConfig,
                  keep: set[str]) -> list[str]:
    """Everything wrong with the weights as stored: bit widths above the request, zero scales,
    nothing quantized at all, kept layers not in float, and densities that differ from the run's
    (equal for float32; quantization may only round small weights to zero, never revive one)."""
    problems = width_problems(stored, cfg.bits)
    problems += [f"{w.module} has {w.zero_scales} channels with scale 0" for w in stored
                 if w.zero_scales]
    problems += [f"{w.module} was to stay float but is stored as {w.storage}"
                 for w in stored if w.storage.startswith("int") and w.module in keep]
    by_size: dict[int, tuple[list[int], list[int]]] = {}
    for layer in layers:
        by_size.setdefault(layer["size"], ([], []))[0].append(layer["nnz"])
    for w in stored:
        if w.numel in by_size:
            by_size[w.numel][1].append(w.nnz)
    for size, (run_nnz, file_nnz) in by_size.items():
        if len(file_nnz) != len(run_nnz):
            problems.append(f"the run has {len(run_nnz)} weight tensors of {size} entries, "
                            f"the file {len(file_nnz)}")
            continue
        for a, b in zip(sorted(run_nnz), sorted(file_nnz), strict=True):
            if b > a or (cfg.bits == 32 and b != a):
                problems.append(f"a weight tensor of {size} entries has {b} non-zeros in the "
                                f"file, {a} in the run")
    return problems


def _beyond_float_tolerance(parity: dict, cfg: ExportConfig, what: str) -> list[str]:
    """``what`` differ from the logits they should equal by more than the float tolerance
    (relative to max(1, max |logit|)): one problem line, or none."""
    limit = cfg.float_tolerance * max(1.0, parity["max_abs_logit"])
    if parity["max_abs_diff"] > limit:
        return [f"{what} by {parity['max_abs_diff']:.3g} (tolerance {limit:.3g})"]
    return []


def _parity_problems(parity: dict, cfg: ExportConfig) -> list[str]:
    if cfg.bits == 32 and cfg.scheme == "weight-only":
        return _beyond_float_tolerance(parity, cfg, "float32 logits differ from PyTorch")
    if parity["agreement"] < cfg.min_agreement:
        return [f"top-1 agreement with PyTorch is {parity['agreement']:.3f}, below the floor "
                f"{cfg.min_agreement} (accuracy {parity['acc_before']:.3f} -> "
                f"{parity['acc_after']:.3f}); " + _recovery(cfg)
                + "--min-agreement lowers the floor, --warn-only keeps the file"]
    return []


def _recovery(cfg: ExportConfig) -> str:
    """What may win the agreement back at ``cfg``'s width, where this export did not try it."""
    tries = []
    if cfg.own_levels and cfg.bits <= 3 and cfg.levels == "symmetric":
        tries.append("--levels asymmetric (all 2^k codes)")
    if cfg.own_levels and cfg.bits <= 4 and not cfg.finetune_epochs:
        tries.append(f"--finetune-epochs {10 if cfg.bits == 2 else 3} (quantization-aware "
                     "fine-tuning)")
    return f"{' and '.join(tries)} may recover it; " if tries else ""


def _convert(fmt: ModuleType, model: torch.nn.Module, sample: np.ndarray, cfg: ExportConfig,
             keep: set[str], calibration: np.ndarray | None) -> bytes:
    """``fmt``'s file of ``model`` with ``cfg``'s width, scheme, levels and storage."""
    return fmt.convert(model, sample, cfg.bits, cfg.scheme, keep, calibration, _asymmetric(cfg),
                       cfg.sparse_storage)


def _left_float(fmt: ModuleType, model: torch.nn.Module, sample: np.ndarray, cfg: ExportConfig,
                keep: set[str], calibration: np.ndarray | None) -> set[str]:
    """The modules a conversion of ``model`` stores in float (``keep``, and the converter's
    own choices: ai-edge-quantizer leaves a depthwise first convolution in float), found by
    converting it once (dense: how the weights are stored does not change which are float):
    fine-tuning must quantize exactly what the file will."""
    data = _convert(fmt, model, sample, replace(cfg, sparse_storage=False), keep, calibration)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"probe{fmt.SUFFIX}"
        path.write_bytes(data)
        return {w.module for w in fmt.inspect(path) if not w.storage.startswith("int")}


def _finetuned(src: Source, cfg: ExportConfig, keep: set[str]) -> qat.FineTuned:
    """The run's model fine-tuned against ``cfg``'s stored weights (``qat.finetune``) on its
    members, with the run's batch size and seed."""
    rc = src.run.read_config()["config"]
    return qat.finetune(src.model, lambda idx: inputs_of(src.data, idx),
                        src.members, src.inputs, cfg.bits, cfg.finetune_epochs, cfg.finetune_lr,
                        rc["batch_size"], rc["seed"], keep, _asymmetric(cfg))


def _weight_quantizer(cfg: ExportConfig) -> str | None:
    """Who chose the stored integer weights."""
    if cfg.bits > 8:
        return None
    if cfg.scheme == "static":
        return f"{'onnxruntime' if cfg.format == 'onnx' else 'ai-edge-quantizer'} min/max"
    return f"safeexport per-channel MSE scale, {cfg.levels} levels"


def export(cfg: ExportConfig, run: RunDir | Path | str | None = None, out: Path | None = None,
           overwrite: bool = False, data_dir: Path | None = None,
           source: Source | None = None) -> ExportedModel:
    """Export the run's model with ``cfg`` into ``out`` (default RUN/exports/<name>.<suffix>)
    and its manifest beside it. ``source`` reuses a loaded run (as ``export_all`` does). The
    run folder is held under a shared lock, so it cannot be overwritten meanwhile."""
    src = source or Source.load(run, cfg.parity_samples, cfg.calibration, data_dir)
    with src.run.lock(shared=True):
        return _export(cfg, src, out, overwrite)


def _export(cfg: ExportConfig, src: Source, out: Path | None, overwrite: bool) -> ExportedModel:
    keep = _check_keep(src, cfg.keep_float)
    path = _out_path(src, cfg, out)
    manifest_path = path.with_suffix(".json")
    _check_targets(path, manifest_path, overwrite)
    fmt = FORMATS.get(cfg.format)
    batch = cfg.batch_size if cfg.format == "tflite" else 2
    sample = np.repeat(src.inputs[:1], batch, axis=0)
    calibration = src.calibration if cfg.scheme == "static" else None
    tuned = None
    if cfg.finetune_epochs:
        with quiet():
            floats = _left_float(fmt, src.model, sample, cfg, keep, calibration)
        tuned = _finetuned(src, cfg, keep | floats)
    with quiet():
        data = _convert(fmt, tuned.model if tuned else src.model, sample, cfg, keep,
                        calibration)

    with staged(path) as tmp:
        tmp.write_bytes(data)
        with quiet():
            runtime = open_runtime(tmp)
            logits = runtime(src.inputs)
        parity = logit_parity(src.reference, logits, src.labels)
        stored = fmt.inspect(tmp)
        problems = check_weights(stored, src.layers, cfg, keep)
        low = _parity_problems(parity, cfg)
        if tuned:
            tuned.record["parity_with_finetuned"] = exact = logit_parity(
                tuned.quantized_logits, logits, src.labels)
            if cfg.scheme == "weight-only":
                problems += _beyond_float_tolerance(
                    exact, cfg, "the file's logits differ from the fine-tuned model's with the "
                    "same weight levels")
        if problems or (low and not cfg.warn_only):
            raise ExportError(f"{cfg.name()}: " + "; ".join(problems + low))
        manifest = {
            "format": cfg.format, "bits": cfg.bits, "scheme": cfg.scheme,
            "container_bits": max((w.container_bits for w in stored
                                   if w.storage.startswith("int")), default=cfg.bits),
            "effective_bits": max((w.effective_bits for w in stored
                                   if w.storage.startswith("int")), default=cfg.bits),
            "weight_quantizer": _weight_quantizer(cfg),
            "finetune": tuned.record if tuned else None,
            "sparse_storage": {"on": cfg.sparse_storage,
                               "tensors": [w.name for w in stored if w.sparse]},
            "file": path.name, "sha256": sha256_file(tmp),
            "source": {"run": str(src.run.path.resolve()), "model": src.run.model.name,
                       "model_sha256": sha256_file(src.run.model),
                       "dataset_fingerprint": src.fingerprint},
            "input": {"shape": [batch if cfg.format == "tflite" else None,
                                *src.inputs.shape[1:]], "dtype": str(src.inputs.dtype)},
            "sizes": {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9)),
                      "floor_bytes": round(_floor(src, cfg.bits, _asymmetric(cfg))),
                      "torch_fp32_bytes": 4 * sum(src.params.values())},
            "parity": {**parity, "split": "test", "runtime": runtime.name,
                       "runtime_version": runtime.version, "threads": runtime.threads},
            "warnings": low,
            "calibration": ({"split": "known_members", "samples": len(calibration)}
                            if calibration is not None else None),
            "keep_float": sorted(keep),
            "float_weights": [w.module for w in stored if not w.storage.startswith("int")]
            if cfg.bits <= 8 else [],
            "tensors": [w.to_dict() for w in stored],
            "config": cfg.to_dict(), "versions": _versions(),
        }
    try:
        write_json(manifest_path, manifest)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return ExportedModel(path, manifest_path, manifest)


def export_all(base: ExportConfig, run: Path | str | None = None, overwrite: bool = False,
               data_dir: Path | None = None, progress: bool | None = None) -> list[dict]:
    """Every format × bit width with ``base``'s other settings (the weight-only scheme; float
    widths are not fine-tuned); a variant that fails is a row with its reason, the rest still
    export."""
    src = Source.load(run, base.parity_samples, base.calibration, data_dir)
    rows = []
    variants = [(f, b) for (f, s), bits in SUPPORTED.items() if s == "weight-only" for b in bits]
    for fmt, bits in tqdm(variants, desc="export", unit="file",
                          disable=None if progress is None else not progress):
        cfg = replace(base, format=fmt, bits=bits, scheme="weight-only",
                      finetune_epochs=base.finetune_epochs if bits <= 8 else 0)
        try:
            res = export(cfg, out=None, overwrite=overwrite, source=src)
            rows.append({"name": cfg.name(), "status": "ok", "path": str(res.path),
                         **summary(res.manifest)})
        except SafeExportError as e:
            rows.append({"name": cfg.name(), "status": "FAILED", "reason": str(e),
                         "format": fmt, "bits": bits, "scheme": "weight-only"})
    return rows


def summary(manifest: dict) -> dict:
    """The figures of one export that a table shows."""
    s, p = manifest["sizes"], manifest["parity"]
    return {"format": manifest["format"], "bits": manifest["bits"], "scheme": manifest["scheme"],
            "bytes": s["bytes"], "gzip_bytes": s["gzip_bytes"], "floor_bytes": s["floor_bytes"],
            "acc_before": p["acc_before"], "acc_after": p["acc_after"],
            "agreement": p["agreement"], "snr_db": p["snr_db"],
            "max_abs_diff": p["max_abs_diff"]}


def export_references(run: RunDir, config: dict, k: int | None = None,
                      data_dir: Path | None = None) -> list[Path]:
    """The reference models of ``run`` (a run ``open_run`` verified) exported with ``config``
    (an export manifest's ExportConfig: the evaluated file's own format, bits and scheme), so
    the references mimic the deployed pipeline; an export made earlier with the same settings
    from the same model is reused."""
    cfg = ExportConfig.from_dict(config)
    files = []
    for ref in references_of(run, k):
        path = ref.path / "exports" / f"{cfg.name()}{FORMATS.get(cfg.format).SUFFIX}"
        manifest = path.with_suffix(".json")
        if path.exists() and is_manifest(manifest):
            m = read_json_file(manifest)
            # references_of verified each reference's model against its recorded hash
            if (m.get("config") == cfg.to_dict() and m.get("sha256") == sha256_file(path)
                    and m["source"].get("model_sha256")
                    == ref.read_report()["files"][ref.model.name]):
                files.append(path)
                continue
        files.append(export(cfg, ref, overwrite=True, data_dir=data_dir).path)
    return files
