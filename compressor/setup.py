"""What every method starts from: the config validated against the data and the model, the run
folder's first files (config.json, splits.npz, model.json), and ``Setup``, which builds, trains
and seeds models the same way for SafeCompress and every baseline. The loop (run.py) and the
baselines both import it; it imports neither."""

import math
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compressor.config import DENSE_KEYS, CompressConfig
from compressor.masking import Masking
from compressor.regularizers import REGULARIZERS
from compressor.train import (
    BatchSampler,
    TrainState,
    iters_per_epoch,
    learning_rate,
    make_optimizer,
    model_loss,
    resolve_device,
    resolve_optimizer,
    train_batches,
)
from safeexport.data import ArrayDataset, load_dataset
from safeexport.data.augment import crop_flip, resolve_augment
from safeexport.data.splits import Splits, make_splits
from safeexport.errors import ConfigError, DataError
from safeexport.models import (
    DEFAULT_MODEL,
    build_model,
    check_compatible,
    image_kwargs,
    weight_shapes,
)
from safeexport.plugins import user_code
from safeexport.rundir import (
    LOCK,
    RunDir,
    atomic_write,
    load_tensors,
    make_dir,
    sha256_file,
    write_json,
)
from safeexport.runio import check_fits, open_run
from safeexport.seeding import derive_seed, generator, seeded


def _versions() -> dict:
    import transformers

    return {"safeexport": version("safeexport"), "torch": torch.__version__,
            "numpy": np.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def check_out(run: RunDir, resume: bool, overwrite: bool) -> None:
    """Refuse to mix runs or to touch a folder that is not provably a run; nothing is deleted
    here (``--overwrite`` clears only after the new run's inputs have been validated)."""
    if run.path.exists() and not run.path.is_dir():
        raise ConfigError(f"--out {run.path} is a file, not a folder; choose another --out")
    if resume:
        if not run.is_run():
            raise ConfigError(f"--resume: {run.path} holds no run to resume (no safeexport "
                              "config.json)")
        return
    if run.is_run() and not overwrite:
        cfg = run.read_config()["config"]
        raise ConfigError(
            f"{run.path} already holds a run ({cfg.get('model')} on {cfg.get('dataset')}, "
            f"sparsity {cfg.get('sparsity')}); pass --resume to continue it, --overwrite to "
            "replace it, or choose another --out")
    if not run.is_run():
        # not provably a run: anything in it is the user's, even a file named like a run's
        # own (a config.json of theirs would otherwise be replaced by --overwrite)
        held = (sorted(p.name for p in run.path.iterdir() if p.name != LOCK)
                if run.path.is_dir() else [])
        if held:
            raise ConfigError(f"{run.path} exists, is not empty and is not a run directory "
                              f"(it holds {', '.join(held[:3])}); choose another --out")
        return
    foreign = run.foreign()
    if foreign:
        raise ConfigError(f"{run.path} holds a run and files that are not the run's own "
                          f"({', '.join(foreign[:3])}); --overwrite replaces only a run's own "
                          "files, so move them or choose another --out")


def _check_init_weights(path: Path, model_name: str, model_kwargs: dict) -> None:
    """``--init-weights`` must fit the model and hold usable values: finite, and no negative
    BatchNorm running variance (its square root is NaN, so every prediction would be NaN)."""
    check_fits(path, {"name": model_name, "kwargs": model_kwargs}, f"--model {model_name}")
    tensors = load_tensors(path)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ConfigError(f"--init-weights {path}: non-finite values in {', '.join(bad[:3])}")
    bad = [k for k, v in tensors.items() if k.endswith("running_var") and (v < 0).any()]
    if bad:
        raise ConfigError(f"--init-weights {path}: negative BatchNorm running variance in "
                          f"{', '.join(bad[:3])}; a variance is at least 0, so the file is "
                          "damaged or not a trained model's state_dict")


def _check_budget(cfg: CompressConfig, model_name: str, model_kwargs: dict,
                  ds: ArrayDataset) -> None:
    """Refuse, before anything is written, a model that cannot take the data's images or
    features (too small for its pooling, say) and a sparsity that keeps less than one weight
    per layer. Checked on the meta device: nothing is allocated. (Text inputs are token ids
    of the run's own length, which every text model takes.)"""
    if ds.kind != "text":
        with torch.device("meta"):
            model = build_model(model_name, model_kwargs).eval()
            try:
                with user_code(f"model {model_name}'s forward"):
                    out = model(torch.zeros((2, *ds.input_shape())))
            except TypeError as e:  # forward's signature: the one call every stage makes
                raise ConfigError(f"model {model_name} cannot be called as model(x) ({e}); "
                                  "safeexport passes one batch of inputs, so forward must "
                                  "take x alone (give other arguments defaults)") from e
            except (RuntimeError, ValueError) as e:
                raise ConfigError(f"model {model_name} cannot take inputs of shape "
                                  f"{list(ds.input_shape())} ({str(e).splitlines()[0]}); use "
                                  "larger inputs or another --model (mlp takes any size)") from e
            if not (isinstance(out, torch.Tensor) and tuple(out.shape) == (2, ds.num_classes)):
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ConfigError(f"model {model_name} must return logits of shape (batch, "
                                  f"{ds.num_classes}), got {got} for a batch of 2")
    shapes = weight_shapes(model_name, model_kwargs)
    if not shapes:
        raise ConfigError(f"model {model_name} has no Conv or Linear layer: there are no "
                          "weights to prune")
    if cfg.init_weights:
        _check_init_weights(Path(cfg.init_weights), model_name, model_kwargs)
    if cfg.method == "dense" or cfg.sparsity >= 1:
        return
    total = sum(math.prod(s) for s in shapes)
    if round(cfg.sparsity * total) < len(shapes):
        raise ConfigError(
            f"--sparsity {cfg.sparsity:g} keeps round({cfg.sparsity:g} x {total:,}) = "
            f"{round(cfg.sparsity * total)} of {model_name}'s weights, fewer than one per layer "
            f"({len(shapes)} layers); the smallest --sparsity that keeps one per layer is "
            f"{len(shapes) / total:.2g}")


def _prepare_text(cfg: CompressConfig, model_name: str, ds: ArrayDataset, splits: Splits,
                  run: RunDir, resume: bool) -> tuple[ArrayDataset, dict, bytes]:
    """Tokenize text with the pretrained folder's tokenizer, or one trained on the members
    (the run's own on resume); also returns the tokenizer file's bytes, to be written once the
    run's inputs are all valid."""
    from tokenizers import Tokenizer

    from safeexport.models.text import (
        encode,
        pad_id_of,
        pretrained_tokenizer,
        text_config,
        train_tokenizer,
    )

    if resume:
        tok = Tokenizer.from_file(str(run.tokenizer))
    elif cfg.pretrained:
        tok = pretrained_tokenizer(cfg.pretrained)
    else:
        tok = train_tokenizer(model_name, list(ds.x[splits.members]), cfg.vocab_size)
    ids = encode(tok, ds.x, cfg.max_length)
    pad = pad_id_of(tok)
    kwargs = {"config": text_config(model_name, tok.get_vocab_size(), ds.num_classes,
                                    cfg.max_length, pad, cfg.pretrained), "pad_id": pad}
    return (ArrayDataset(ds.name, "text", ids, ds.y, ds.num_classes, ds.class_names), kwargs,
            tok.to_str().encode())


@dataclass
class Setup:
    """What every method starts from, all fixed by the config and seed: the run directory, the
    data and its membership split, the architecture and the optimizer. Every method of one seed
    sees the same members, non-members and test samples."""

    cfg: CompressConfig
    run: RunDir
    ds: ArrayDataset
    splits: Splits
    device: torch.device
    model_name: str
    model_kwargs: dict
    opt_name: str
    lr: float
    progress: bool | None
    dense_from: RunDir | None = None  # a finished --method dense run of this config to reuse
    augment: str = "none"  # the training augmentation --augment resolved to

    @property
    def total(self) -> int:
        """The training budget in iterations (epochs over the members)."""
        return self.cfg.epochs * iters_per_epoch(len(self.splits.members),
                                                 self.cfg.batch_size)

    def new_model(self, seed_tag: str, kwargs: dict | None = None) -> torch.nn.Module:
        """A freshly initialised model (from the pretrained folder or --init-weights when
        given), on the device; ``kwargs`` replaces the run's model kwargs (a narrower student,
        which starts fresh)."""
        with seeded(derive_seed(self.cfg.seed, seed_tag), self.device):
            model = build_model(self.model_name, kwargs or self.model_kwargs)
        if self.cfg.pretrained:
            model.load_pretrained(self.cfg.pretrained)
        if self.cfg.init_weights and kwargs is None:
            model.load_state_dict(load_tensors(Path(self.cfg.init_weights)))
        return model.to(self.device)

    def new_state(self, model: torch.nn.Module,
                  masks: list[torch.Tensor] | None = None) -> TrainState:
        optimizer = make_optimizer(model, self.opt_name, self.lr, self.cfg.momentum,
                                   self.cfg.weight_decay)
        return TrainState(model, optimizer, Masking(model, masks) if masks is not None else None)

    def train(self, state: TrainState, tag: str, iters: int, lr: float, desc: str,
              loss: Callable[[np.ndarray], torch.Tensor] | None = None,
              data: np.ndarray | None = None) -> list[float]:
        """``iters`` steps on shuffled batches of ``data`` (default: the members), the rate
        scheduled from ``lr`` by ``--lr-schedule``; ``loss(indices)`` defaults to cross-entropy
        on the labels. ``tag`` seeds the batch order and dropout."""
        data = self.splits.members if data is None else data
        sampler = BatchSampler(data, self.cfg.batch_size,
                               generator(self.cfg.seed, f"{tag}-sampler"))
        if loss is None:
            plain = REGULARIZERS.get("none")
            loss = model_loss(state.model, self.ds, self.device,
                              lambda logits, y, _: plain(logits, y, 0.0))
        return self.run_batches(state, tag, (sampler.next() for _ in range(iters)), iters, lr,
                                desc, loss)

    def run_batches(self, state: TrainState, tag: str, batches: Iterable[np.ndarray],
                    iters: int, lr: float, desc: str,
                    loss: Callable[[np.ndarray], torch.Tensor]) -> list[float]:
        """Train on ``batches`` (``iters`` of them, for the schedule and the bar), seeded by
        ``tag``."""
        with seeded(derive_seed(self.cfg.seed, f"{tag}-train"), self.device), \
                tqdm(total=iters, desc=desc, unit="it", disable=self.hide_bars()) as bar:
            schedule = self.cfg.lr_schedule
            return train_batches(state, batches, loss,
                                 lambda i: learning_rate(schedule, lr, i, iters),
                                 lambda: bar.update(1))

    def hide_bars(self) -> bool | None:
        """tqdm's ``disable``: None shows bars on a terminal only."""
        return None if self.progress is None else not self.progress


def mask_updates(cfg: CompressConfig, total: int) -> int:
    """How many mask updates SafeCompress makes in a budget of ``total`` iterations: one every
    ``update_frequency`` iterations, none after the last stretch of training."""
    return 0 if cfg.sparsity >= 1 else max(0, math.ceil(total / cfg.update_frequency) - 1)


def _check_updates(cfg: CompressConfig, n_members: int) -> None:
    """Refuse a SafeCompress budget that makes no mask update (it would be plain sparse
    training under SafeCompress's name), naming the smallest budget that makes one."""
    ipe = iters_per_epoch(n_members, cfg.batch_size)
    total = cfg.epochs * ipe
    if cfg.method != "safecompress" or cfg.allow_no_updates or mask_updates(cfg, total) > 0:
        return
    if cfg.sparsity >= 1:
        raise ConfigError("SafeCompress keeping 100% of the weights makes no mask update; use "
                          "--method dense, a --sparsity below 1, or --allow-no-updates")
    raise ConfigError(
        f"this budget makes no SafeCompress mask update: {cfg.epochs} epochs x {ipe} "
        f"iterations = {total} iterations, and --update-frequency is {cfg.update_frequency}; "
        f"the smallest budget with one update is --epochs {cfg.update_frequency // ipe + 1} "
        f"or --update-frequency {max(1, total - 1)} (or pass --allow-no-updates to train a "
        "plain sparse model)")


def prepare(cfg: CompressConfig, run: RunDir, resume: bool, overwrite: bool,
            progress: bool | None, splits: Splits | None = None
            ) -> tuple[CompressConfig, Setup | None]:
    """Validate, load the data, split it (or take ``splits``: a reference model's half) and
    write config.json, splits.npz and model.json (nothing is written or cleared before every
    input is valid); None when ``resume`` finds the run already complete. The caller holds the
    run folder's lock."""
    check_out(run, resume, overwrite)
    if resume:
        cfg = CompressConfig.from_run_record(run.read_config())
        if run.report.exists():
            open_run(run.path)  # a damaged finished run is refused, not called complete
            run.read_history()
            tqdm.write(f"{run.path} is already complete; nothing to resume")
            return cfg, None
    if cfg.references:
        cfg.check_executor(run.path)  # the references run on it, after the training below
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.dataset, Path(cfg.data_dir) if cfg.data_dir else None, cfg.download,
                      cfg.max_samples, cfg.seed if cfg.data_seed is None else cfg.data_seed)
    fingerprint = ds.fingerprint()
    if resume:
        splits = Splits.load(run.splits)
        if splits.fingerprint != fingerprint:
            raise DataError(f"the data found for {cfg.dataset} differs from the data this run "
                            f"was split on (fingerprint {fingerprint[:12]} vs "
                            f"{splits.fingerprint[:12]}); point --data-dir at the original files")
    else:
        if splits is None:
            splits = make_splits(ds.y, fingerprint, cfg.seed)
        elif splits.fingerprint != fingerprint:
            raise DataError(f"the split given for {run.path} was made on other data")
        splits.check(len(ds))
        _check_updates(cfg, len(splits.members))
    model_name = DEFAULT_MODEL[ds.kind] if cfg.model == "auto" else cfg.model
    check_compatible(model_name, ds.kind, cfg.dataset)
    augment = resolve_augment(cfg.augment, cfg.dataset, ds.kind)
    if cfg.pretrained and model_name not in ("bert", "roberta"):
        raise ConfigError(f"--pretrained works with bert and roberta, not {model_name}")
    if cfg.pretrained and cfg.init_weights:
        raise ConfigError("--pretrained and --init-weights both give starting weights; pass one")
    opt_name, lr = resolve_optimizer(cfg.optimizer, model_name, cfg.lr, bool(cfg.pretrained))

    tokenizer = None
    if ds.kind == "text":
        ds, model_kwargs, tokenizer = _prepare_text(cfg, model_name, ds, splits, run, resume)
    else:
        model_kwargs = image_kwargs(model_name, ds, splits.members)
    _check_budget(cfg, model_name, model_kwargs, ds)
    ds.augment = crop_flip if augment == "crop-flip" else None
    if not resume:
        if run.is_run():  # --overwrite, and the new run's inputs are valid: clear the old one
            run.clear()
        make_dir(run.path)
        if tokenizer is not None:
            atomic_write(run.tokenizer, lambda f: f.write(tokenizer))
        write_json(run.config, {"config": cfg.to_dict(), "model": model_name,
                                "dataset_fingerprint": fingerprint, "num_samples": len(ds),
                                "num_classes": ds.num_classes, "input_shape": ds.input_shape(),
                                "optimizer": {"name": opt_name, "lr": lr},
                                "augment": augment,
                                "init_weights_sha256": (sha256_file(Path(cfg.init_weights))
                                                        if cfg.init_weights else None),
                                "versions": _versions(), "device": str(device),
                                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        splits.save(run.splits)
        write_json(run.model_json, {"name": model_name, "kwargs": model_kwargs})
    return cfg, Setup(cfg, run, ds, splits, device, model_name, model_kwargs, opt_name, lr,
                      progress, augment=augment)


def check_dense_from(dense: RunDir, setup: Setup) -> RunDir:
    """``dense`` if it is a finished dense run that trained the model this run would."""
    recorded = (CompressConfig.from_run_record(dense.read_config()).to_dict()
                if dense.is_run() else {})
    if not dense.report.exists() or recorded.get("method") != "dense":
        raise ConfigError(f"{dense.path} is not a finished `--method dense` run")
    own = setup.cfg.to_dict()
    diff = [k for k in DENSE_KEYS if recorded.get(k) != own.get(k)]
    # compared as resolved (auto is none on digits); runs from before it trained on none
    if dense.read_config().get("augment", "none") != setup.augment:
        diff.append("augment")
    if diff:
        raise ConfigError(f"{dense.path} trained its dense model with other settings "
                          f"({', '.join(diff)}); it cannot stand in for this run's")
    if Splits.load(dense.splits).fingerprint != setup.splits.fingerprint:
        raise ConfigError(f"{dense.path} was trained on other data than this run")
    return dense


def train_dense(setup: Setup) -> tuple[TrainState, float]:
    """The dense model on the whole budget, and the seconds it took (the reference row of
    every table; the two-step baselines start from this same model). With
    ``setup.dense_from``, that run's model and its recorded training time instead."""
    t0 = time.time()
    model = setup.new_model("dense-init")
    if setup.dense_from is not None:
        model.load_state_dict(load_tensors(setup.dense_from.model))
        secs = setup.dense_from.read_report()["compressed"]["wall_time_s"]
        return setup.new_state(model), secs
    state = setup.new_state(model)
    setup.train(state, "dense", setup.total, setup.lr, "dense reference")
    return state, time.time() - t0


