"""``compress(config, out)``: data → membership split → sparse init → SafeCompress loop →
final evaluation (and a dense reference) → run directory."""

import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compressor.config import CompressConfig
from compressor.masking import Masking, init_masks, maskable, nonzero_parameters
from compressor.references import ensure_references
from compressor.regularizers import REGULARIZERS
from compressor.safecompress import mask_update
from compressor.setup import Setup, check_dense_from, check_out, mask_updates, prepare, train_dense
from compressor.train import (
    BatchSampler,
    TrainState,
    cosine,
    learning_rate,
    predict_logits,
    train_steps,
)
from safeexport import names
from safeexport.attacks.evaluate import exposure_for_report, write_exposure_csv
from safeexport.attacks.final import final_membership, model_figures
from safeexport.attacks.reference import References, reference_outputs
from safeexport.data import ArrayDataset
from safeexport.data.splits import Splits, balanced
from safeexport.errors import ConfigError
from safeexport.executors import torch_threads
from safeexport.metrics import accuracy
from safeexport.plots import fmt_figure, fmt_interval, plot_curve, plot_roc, roc_curves
from safeexport.rundir import (
    RunDir,
    load_metadata,
    load_tensors,
    save_tensors,
    write_json,
)
from safeexport.seeding import derive_seed, generator


def _save_checkpoint(run: RunDir, state: TrainState, sampler: BatchSampler, rnd: int, it: int,
                     elapsed: float) -> None:
    tensors = {f"model.{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"mask.{i}": m for i, m in enumerate(state.masking.masks)})
    opt = state.optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{i}.{k}"] = v
    sampler_tensors, pos = sampler.state()
    tensors.update(sampler_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"round": rnd, "iteration": it, "sampler_pos": pos, "elapsed": elapsed,
            "param_groups": opt["param_groups"]}
    save_tensors(run.checkpoint, tensors, meta)


def _load_checkpoint(run: RunDir, state: TrainState, sampler: BatchSampler) -> dict:
    t = load_tensors(run.checkpoint)
    meta = load_metadata(run.checkpoint)
    try:
        for key, kind in (("round", int), ("iteration", int), ("elapsed", float | int)):
            if not isinstance(meta[key], kind):
                raise TypeError(f"{key} is {meta[key]!r}")
        state.model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        masks = [t[f"mask.{i}"] for i in range(len(state.masking.masks))]
        opt_state: dict = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = v
        state.optimizer.load_state_dict({"state": opt_state,
                                         "param_groups": meta["param_groups"]})
        sampler.load_state(t, meta["sampler_pos"])
        torch.set_rng_state(t["rng.torch"])
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise ConfigError(f"{run.checkpoint} is corrupt or from another model ({e}); delete "
                          "it to restart, or start over with --overwrite") from e
    state.masking.masks = [m.to(device=p.device, dtype=torch.bool)
                           for m, p in zip(masks, state.masking.params, strict=True)]
    return meta


def final_evaluation(model: torch.nn.Module, ds: ArrayDataset, splits: Splits,
                     cfg: CompressConfig, device: torch.device, tag: str,
                     references: References | None = None):
    """Task accuracy on the test split; the attacker trained on ALL known members/non-members
    and measured on the BALANCED unknown members/non-members, the threshold attacks (and with
    ``references`` LiRA and RMIA) beside it (SPEC §4-5, §8), every figure with its bootstrap
    interval."""
    res = final_membership(lambda idx: predict_logits(model, ds, idx, device).numpy(), ds.y,
                           splits, ds.num_classes, cfg.attack, cfg.final_attack_epochs,
                           cfg.seed, tag, device, cfg.attack_seeds, references)
    test = splits.test
    train = accuracy(predict_logits(model, ds, splits.members, device).numpy(),
                     ds.y[splits.members])
    metrics = model_figures(res, predict_logits(model, ds, test, device).numpy(), ds.y[test],
                            train, cfg.lam)
    return metrics, res


def _layer_density_check(state: TrainState) -> None:
    """Pruned entries must be exactly zero in what is saved."""
    for name, p, m in zip(state.masking.names, state.masking.params, state.masking.masks,
                          strict=True):
        if bool((p.detach()[~m] != 0).any()):
            raise AssertionError(f"{name}: pruned weights are not zero")


def compress(cfg: CompressConfig, out: Path | str, resume: bool = False, overwrite: bool = False,
             progress: bool | None = None, on_round: Callable[[int], None] | None = None,
             dense_from: Path | str | None = None, splits: Splits | None = None) -> RunDir:
    """Run ``cfg.method`` (SafeCompress by default) with ``cfg`` into the run directory ``out``.

    ``resume`` continues a killed run from its last checkpoint (its config.json wins; methods
    other than SafeCompress keep no checkpoint and start over); ``overwrite`` replaces a
    previous run there. ``progress`` None shows bars on a terminal only. ``on_round(r)`` is
    called after every mask update (after its checkpoint is written). ``dense_from``: a
    finished ``--method dense`` run of the same data, split and training settings, whose model
    the baselines start from instead of training the same dense model again. ``splits``
    replaces the membership split the seed would make (a reference model's half).
    """
    run = RunDir(out)
    check_out(run, resume, overwrite)  # refuse at once, before the folder is made or locked
    # the same seed gives the same run only on the same number of threads (floating-point
    # sums): a new run records the count it runs on, and a resumed run runs on the recorded one
    threads = CompressConfig.from_run_record(run.read_config()).threads if resume \
        else cfg.threads
    # a second process writing this folder is refused
    with run.lock(create=not resume), torch_threads(threads):
        if not resume:
            cfg = replace(cfg, threads=torch.get_num_threads())
        cfg, setup = prepare(cfg, run, resume, overwrite, progress, splits)
        if setup is None:
            return run
        # every method's clock starts here, after the data and the split, as the dense
        # model's counts its training only: the report compares training with training
        t_start = time.time()
        if dense_from is not None:
            setup.dense_from = check_dense_from(RunDir(dense_from), setup)
        if cfg.method == "safecompress":
            state, history, elapsed = _safecompress(setup, resume, on_round, t_start)
            # the winners' fine-tuning counts inside the budget (a last round's may run past it)
            last = history[-1]["iteration"] + cfg.finetune_iters if history else 0
            _finish(setup, state, history, elapsed, steps=max(setup.total, last))
            return run
        from compressor.baselines import METHODS

        result = METHODS.get(cfg.method)(setup)
        if result.spec is not None:
            write_json(setup.run.model_json, result.spec)
        _finish(setup, result.state, [], time.time() - t_start, result.dense, result.extra,
                result.steps)
        return run


def _safecompress(setup: Setup, resume: bool, on_round: Callable[[int], None] | None,
                  t_start: float) -> tuple[TrainState, list[dict], float]:
    """The SafeCompress loop: train, and every ``update_frequency`` iterations a mask update
    that keeps the candidate with the best TM-score (checkpointed after each)."""
    cfg, run, ds, splits, device = setup.cfg, setup.run, setup.ds, setup.splits, setup.device
    lr = setup.lr
    loss_fn = REGULARIZERS.get(cfg.regularizer)
    loss = lambda logits, y: loss_fn(logits, y, cfg.beta)  # noqa: E731
    model = setup.new_model("init")
    weights = [p for _, p in maskable(model)]
    trained = bool(cfg.pretrained or cfg.init_weights)
    masks = init_masks(weights, cfg.sparsity, generator(cfg.seed, "mask"), by_magnitude=trained)
    state = setup.new_state(model, masks)
    state.masking.apply()
    if not trained:
        state.masking.rescale_init()
    sampler = BatchSampler(splits.members, cfg.batch_size, generator(cfg.seed, "sampler"))
    torch.manual_seed(derive_seed(cfg.seed, "train"))

    references = None
    if cfg.score == "lira":  # built (or reused) once, before the loop, read by every round
        references, error, _ = _references(setup)
        if error:
            raise ConfigError(error)
    ipe = sampler.iters_per_epoch()
    total = setup.total
    n_rounds = mask_updates(cfg, total)
    n_cands = len(cfg.prune) * len(cfg.grow)
    it, rnd, elapsed0, history = 0, 0, 0.0, []
    if resume and run.checkpoint.exists():
        meta = _load_checkpoint(run, state, sampler)
        it, rnd, elapsed0 = meta["iteration"], meta["round"], meta["elapsed"]
        history = run.read_history()[:rnd]
    masked = sum(m.numel() for m in state.masking.masks)
    nonzero, params = nonzero_parameters(state.model)
    tqdm.write(f"{setup.model_name} on {cfg.dataset} ({len(ds)} samples, {len(splits.members)} "
               f"members): keeping {100 * state.masking.density():.1f}% of weights "
               f"({sum(state.masking.counts()):,} of {masked:,} in {len(masks)} masked layers; "
               f"{100 * nonzero / params:.1f}% of all {params:,} parameters non-zero); "
               f"{cfg.epochs} epochs = {total} iterations, {n_rounds} mask updates x "
               f"{n_cands} candidates, on {device}")

    # The winner's fine-tuning is training of the model that continues: its iterations count
    # inside the budget, so the final model makes the dense model's number of steps (the
    # other candidates' steps are the method's overhead). Updates stay every
    # ``update_frequency`` iterations.
    extra = n_cands - 1
    bar = tqdm(total=total + n_rounds * extra * cfg.finetune_iters,
               initial=it + rnd * extra * cfg.finetune_iters, unit="it",
               desc="compress", disable=setup.hide_bars())
    step = lambda: bar.update(1)  # noqa: E731
    while it < total:
        bar.set_postfix_str(f"round {rnd}/{n_rounds} training")
        start = it
        losses = train_steps(state, ds, sampler,
                             max(0, min((rnd + 1) * cfg.update_frequency, total) - it), loss,
                             lambda i, s=start: learning_rate(cfg.lr_schedule, lr, s + i, total),
                             device, step)
        it += len(losses)
        if it >= total or rnd >= n_rounds:
            continue
        rnd += 1
        rate = cosine(cfg.prune_rate, it, total)
        step_lr = learning_rate(cfg.lr_schedule, lr, it, total)
        state, row = mask_update(
            cfg, ds, splits, state, rnd, rate, step_lr, loss, device,
            lambda name, r=rnd: bar.set_postfix_str(f"round {r}/{n_rounds} candidate {name}"),
            step, references)
        row.update(iteration=it, epoch=round(it / ipe, 3),
                   train_loss=float(np.mean(losses)) if losses else None,
                   density=state.masking.density(), lr=step_lr)
        it = min(total, it + cfg.finetune_iters)  # (the bar counted them as a candidate's)
        history.append(row)
        run.write_history(history)
        _save_checkpoint(run, state, sampler, rnd, it, elapsed0 + time.time() - t_start)
        win = row["candidates"][row["winner"]]
        tqdm.write(f"round {rnd}/{n_rounds} (epoch {row['epoch']:.1f}, prune rate {rate:.3f}): "
                   f"winner {row['winner_pair']}  task {win['task_acc']:.3f}  "
                   f"MIA {win['mia_acc']:.3f}  TM {win['tm_score']:.3f}")
        if on_round is not None:
            on_round(rnd)
    bar.close()
    return state, history, elapsed0 + time.time() - t_start


def _finish(setup: Setup, state: TrainState, history: list[dict], compress_time: float,
            dense: tuple[TrainState, float] | None = None, extra: dict | None = None,
            steps: int = 0) -> None:
    """Save the model, evaluate it (and the dense reference: ``dense`` when the method trained
    one already, with its wall time), write report and plots. ``steps``: the optimizer steps
    that made the model (``Outcome.steps``)."""
    cfg, run = setup.cfg, setup.run
    if state.masking is None:  # a dense method: all-ones masks keep the report uniform
        state.masking = Masking(state.model, [torch.ones_like(p, dtype=torch.bool)
                                              for _, p in maskable(state.model)])
    state.masking.apply()
    _layer_density_check(state)
    save_tensors(run.model, state.model.state_dict(),
                 {"model": setup.model_name, "density": state.masking.density()})
    # a method that starts from a reused dense model is charged that model's training time
    reused_s = dense[1] if dense is not None and setup.dense_from is not None else 0.0
    refs, ref_error, ref_time = _references(setup)
    t0 = time.time()
    compressed, res = final_evaluation(state.model, setup.ds, setup.splits, cfg, setup.device,
                                       "compressed", refs)
    eval_time = time.time() - t0
    save_tensors(run.attacker, res.attacker.state_dict())
    nonzero, params = nonzero_parameters(state.model)
    compressed.update(density=state.masking.density(),
                      nonzero_weights=sum(state.masking.counts()),
                      masked_weights=sum(m.numel() for m in state.masking.masks),
                      model_density=nonzero / params, nonzero_parameters=nonzero,
                      parameters=params, optimizer_steps=steps,
                      wall_time_s=round(compress_time + reused_s, 1))
    label = method_label(cfg.method)
    exposure = res.exposure(setup.ds.y)
    if cfg.method == "safecompress" and not history:
        compressed["warnings"].append(
            "no mask update was made (the budget is too small): this is plain sparse training, "
            "not SafeCompress's selection")
    report = {"method": cfg.method, "compressed": compressed, **(extra or {}),
              "layers": state.masking.report(),
              "files": run.file_hashes(),
              "rounds": len(history),
              "winners": {p: sum(h["winner_pair"] == p for h in history)
                          for p in sorted({h["winner_pair"] for h in history})},
              # what decided each round (select_winner's rule): how often the score told
              # the candidates apart
              "selection_rules": {r: sum(h["rule"] == r for h in history)
                                  for r in sorted({h["rule"] for h in history})},
              "final_eval_time_s": round(eval_time, 1),
              "training": {"augment": setup.augment, "members": len(setup.splits.members),
                           "iterations": setup.total,
                           "attacks_and_evaluation_read": "un-augmented inputs"},
              "exposure": exposure_for_report(exposure)}
    if cfg.references:
        report["references_time_s"] = round(ref_time, 1)
        if refs is None:
            compressed["warnings"].append(
                f"LiRA and RMIA did not run: fewer than 2 of the {cfg.references} reference "
                "models finished")
        elif cfg.reference_method == "dense" and cfg.method != "dense":
            compressed["warnings"].append(
                "the references are dense models, an approximation of references trained "
                f"with {label}'s own method (--reference-method dense)")
    if setup.dense_from is not None:
        report["dense_reused_from"] = str(setup.dense_from.path.resolve())
    curves = roc_curves(res, f"{label} @{cfg.sparsity:g}")
    if cfg.dense_reference and cfg.method != "dense":
        dense_state, dense_time = dense or train_dense(setup)
        dense_metrics, dres = final_evaluation(dense_state.model, setup.ds, setup.splits, cfg,
                                               setup.device, "dense")
        dense_metrics.update(wall_time_s=round(dense_time, 1), optimizer_steps=setup.total)
        save_tensors(run.dense_model, dense_state.model.state_dict())
        report["dense"] = dense_metrics
        curves.update(roc_curves(dres, "dense", thresholds=False))
    write_exposure_csv(run.exposure_csv, exposure)
    title = f"{setup.model_name} on {cfg.dataset}, keeping {100 * cfg.sparsity:g}% of weights"
    if history:  # a baseline has no mask updates: no learning curve to draw
        plot_curve(history, run.curve_png, title)
    plot_roc(curves, run.roc_png, f"final MIA (unknown members vs non-members)\n{title}",
             res.metrics["n_nonmembers"])
    # the report last: a run killed before it is unfinished (resumed), never complete and
    # missing a file
    write_json(run.report, report)
    shutil.rmtree(run.checkpoint.parent, ignore_errors=True)
    _print_summary(report)
    if ref_error:
        raise ConfigError(ref_error)


def _references(setup: Setup) -> tuple[References | None, str | None, float]:
    """The run's reference models (built or reused) and their outputs on the known and the
    evaluated parts; a failure to build some is returned as its message, to be raised after
    the report of what finished is written."""
    cfg, splits = setup.cfg, setup.splits
    if not cfg.references:
        return None, None, 0.0
    t0, error = time.time(), None
    try:
        ensure_references(setup.run, cfg, splits, setup.ds.y, cfg.references, compress,
                          setup.progress, setup.dense_from)
    except ConfigError as e:
        error = str(e)
    um, un = balanced(splits.unknown_members, splits.unknown_nonmembers)
    index = np.concatenate([splits.known_members, splits.known_nonmembers, um, un])
    refs = reference_outputs(setup.run, index, cfg.references)
    return refs, error, time.time() - t0


def method_label(method: str) -> str:
    """How tables and plots name a method."""
    return "SafeCompress" if method == "safecompress" else method


def _print_summary(report: dict) -> None:
    rows = [(method_label(report["method"]), report["compressed"])]
    if "dense" in report:
        rows.insert(0, ("dense", report["dense"]))
    tqdm.write(f"{'':14}{'task acc':>9}{'MIA acc (95% CI)':>24}{'AUC':>7}{'TPR@1%':>8}"
               f"{'TM':>7}  strongest attack")
    for name, m in rows:
        s = m["strongest"]
        tqdm.write(f"{name:14}{m['task_acc']:9.4f}{fmt_interval(m, 'mia_acc'):>24}"
                   f"{m['auc']:7.3f}{fmt_figure(m['tpr_at_1pct_fpr'], '8.3f')}"
                   f"{m['tm_score']:7.3f}  {s['attack']} {s['mia_acc']:.4f}")
        refs = m.get("reference_attacks")
        if refs:
            st = refs["settings"]
            for attack in names.REFERENCE_ATTACKS:
                f = refs[attack]
                lo, hi = f["ci"]["auc"]
                tqdm.write(f"  {attack.upper():6} AUC {f['auc']:.3f} [{lo:.3f}, {hi:.3f}]  "
                           f"TPR@1% {fmt_figure(f['tpr_at_1pct_fpr'], '.3f')}  TPR@0.1% "
                           f"{fmt_figure(f['tpr_at_0.1pct_fpr'], '.3f')}  ({st['references']} "
                           f"{st['method']} reference models)")
        for w in m["warnings"]:
            tqdm.write(f"  warning ({name}): {w}")
        for note in m["notes"]:
            tqdm.write(f"  note ({name}): {note}")
