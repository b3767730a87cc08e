"""Reference-model attacks (SPEC §8), offline: LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh
et al. 2024) score a target model's outputs against the outputs of K reference models trained
like it on random halves of the attacker's auxiliary data (the KNOWN members and non-members).
The samples the audit scores (the UNKNOWN parts) are out of every reference, so only the offline
variants apply; an auxiliary sample is scored from the references that did not train on it.

Pure NumPy on signals: the same code scores the PyTorch model in ``compress`` and an exported
file in ``evaluate``. Written here because neither ML Privacy Meter nor LeakPro is a library one
can call on arrays of outputs (both drive their own training and data loaders).
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax

from safeexport.attacks.base import AttackResult, Signals, is_member_of
from safeexport.attacks.threshold import best_threshold
from safeexport.data.splits import Splits
from safeexport.errors import ConfigError, DataError
from safeexport.metrics import RESAMPLES, mia_metrics, roc_auc
from safeexport.rundir import RunDir

PER_EXAMPLE_VARIANCE_AT = 64  # LiRA: from this many references, a variance per sample
A_GRID = np.round(np.linspace(0.0, 1.0, 11), 2)  # RMIA's offline factor a, tuned on this grid
# a = 1 makes p(x) the references' mean (no prior): used when a cannot be tuned (K < 3)
UNTUNED_A = 1.0


def margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """φ = z_y − logsumexp_{j≠y} z_j of each row of ``logits`` (..., N, C), float64."""
    z = np.asarray(logits, dtype=np.float64)
    flat = z.reshape(-1, len(labels), z.shape[-1])
    out = np.stack([Signals.from_logits(m, labels).margin for m in flat])
    return out.reshape(z.shape[:-1])


def true_probs(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of the true label of each row of ``logits`` (..., N, C), float64."""
    lp = log_softmax(np.asarray(logits, dtype=np.float64), axis=-1)
    return np.exp(np.take_along_axis(lp, np.broadcast_to(
        labels[:, None], (*lp.shape[:-1], 1)), axis=-1)[..., 0])


def _out_mean(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Mean over references (axis 0) of ``values`` where ``out``; NaN where no reference is
    out."""
    n = out.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (values * out).sum(axis=0) / n, np.nan)


def lira_statistics(ref_phi: np.ndarray, trained: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                        str]:
    """LiRA offline's out-distribution of each sample: μ_out(x), the mean φ of the references
    that did not train on x (NaN where none is out), and σ, one global std of every out-score
    below 64 references, per sample from 64 on; and which variance was used."""
    out = ~trained
    mu = _out_mean(ref_phi, out)
    if ref_phi.shape[0] >= PER_EXAMPLE_VARIANCE_AT:
        var = _out_mean((ref_phi - mu) ** 2, out) * out.sum(0) / np.maximum(out.sum(0) - 1, 1)
        return mu, np.sqrt(var), "per-example"
    return mu, np.full(mu.shape, np.std(ref_phi[out])), "fixed"


def lira_scores(target_phi: np.ndarray, ref_phi: np.ndarray, trained: np.ndarray) -> tuple[
        np.ndarray, str]:
    """LiRA offline: z = (φ_target(x) − μ_out(x)) / σ (``lira_statistics``). Returns z and
    which variance was used. SPEC §8's score is Φ(z), the same order; z is kept because Φ
    rounds to exactly 1 in float64 beyond z ≈ 8.3, where a well-fitted target puts many
    members, and ties there erase the low-FPR figures."""
    mu, sigma, kind = lira_statistics(ref_phi, trained)
    return (target_phi - mu) / np.maximum(sigma, 1e-30), kind


def rmia_ratio(target_p: np.ndarray, ref_p: np.ndarray, trained: np.ndarray,
               a: float) -> np.ndarray:
    """p(x|θ) / p(x), p(x) = ½((1 + a)·p_out(x) + (1 − a)) from the references out of x."""
    p_x = 0.5 * ((1 + a) * _out_mean(ref_p, ~trained) + (1 - a))
    return target_p / p_x


def rmia_scores(ratio: np.ndarray, population_ratio: np.ndarray, gamma: float = 1.0
                ) -> np.ndarray:
    """Fraction of the population z with ratio(x) / ratio(z) > γ."""
    z = np.sort(population_ratio)
    scores = np.searchsorted(z, ratio / gamma, side="left") / len(z)
    return np.where(np.isnan(ratio), np.nan, scores)


def tune_a(ref_p: np.ndarray, trained: np.ndarray) -> float | None:
    """RMIA's offline a: each reference in turn is the target, attacked with the others on the
    auxiliary samples (its own training half as members); the a of the highest mean AUC.
    (The score is monotone in the ratio for a fixed population, so the ratio's AUC is the
    attack's.)"""
    k = ref_p.shape[0]
    aucs = np.zeros(len(A_GRID))
    for r in range(k):
        others = np.arange(k) != r
        usable = (~trained[others]).any(axis=0)
        member = trained[r, usable]
        if member.all() or not member.any():
            continue
        for i, a in enumerate(A_GRID):
            ratio = rmia_ratio(ref_p[r, usable], ref_p[others][:, usable],
                               trained[others][:, usable], a)
            aucs[i] += roc_auc(ratio, member)
    if not aucs.any():  # under 3 references no reference can be attacked with the others
        return None
    return float(A_GRID[int(np.argmax(aucs))])


def fit_threshold(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """``best_threshold`` on the scores that exist (a known sample every reference trained on
    has none)."""
    m, n = members[~np.isnan(members)], nonmembers[~np.isnan(nonmembers)]
    return best_threshold(m, n) if len(m) and len(n) else 0.5


class LiraScore:
    """LiRA's per-sample z against references trained once, as an in-loop ``Attack`` of
    SafeCompress (``--score lira``): the out-distribution of each known sample is computed
    once from the references' outputs (``refs``, on the known members and non-members), so
    each candidate costs one z per sample; ``fit`` picks the threshold on z (``epochs`` is
    ignored), ``score`` is sigmoid(z − threshold). Reads signals that carry their samples'
    dataset indices. Deterministic: no training noise."""

    trains = False

    def __init__(self, refs: "References", labels: np.ndarray) -> None:
        if not (~refs.trained).any(axis=0).all():
            raise ValueError("a known sample that every reference trained on has no LiRA "
                             "score; use an even number of references")
        self._row = {int(i): k for k, i in enumerate(refs.index)}
        self.mu, self.sigma, self.variance = lira_statistics(
            margins(refs.logits, labels[refs.index]), refs.trained)
        self.threshold = 0.0
        self.last_fit: dict = {}

    def z(self, signals: Signals) -> np.ndarray:
        if signals.index is None:
            raise ValueError("LiRA's in-loop score needs the samples' indices")
        rows = np.array([self._row[int(i)] for i in signals.index], dtype=np.int64)
        return (signals.margin - self.mu[rows]) / np.maximum(self.sigma[rows], 1e-30)

    def fit(self, members: Signals, nonmembers: Signals, epochs: int,
            generator: object) -> None:
        self.threshold = best_threshold(self.z(members), self.z(nonmembers))
        self.last_fit = {"threshold": self.threshold, "variance": self.variance}

    def score(self, signals: Signals) -> np.ndarray:
        return np.exp(-np.logaddexp(0.0, self.threshold - self.z(signals)))  # sigmoid

    def clone(self) -> "LiraScore":
        return copy.copy(self)  # the statistics are shared and read-only; the threshold is not

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"threshold": torch.tensor([self.threshold], dtype=torch.float64)}


@dataclass
class References:
    """K reference models' logits on the samples ``index`` (dataset indices) and which of them
    each reference trained on; ``models`` says what produced the logits ("pytorch", or the
    export format), ``method`` how the references were trained."""

    index: np.ndarray  # (N,)
    logits: np.ndarray  # (K, N, C) float64
    trained: np.ndarray  # (K, N) bool
    method: str
    models: str = "pytorch"

    def rows(self, idx: np.ndarray) -> np.ndarray:
        pos = {int(i): k for k, i in enumerate(self.index)}
        missing = [int(i) for i in idx if int(i) not in pos]
        if missing:
            raise ValueError(f"the references have no outputs for samples {missing[:5]}")
        return np.array([pos[int(i)] for i in idx], dtype=np.int64)

    def __len__(self) -> int:
        return self.logits.shape[0]


def reference_attacks(target: list[Signals], parts: list[np.ndarray], refs: References,
                      resamples: int = RESAMPLES) -> tuple[dict[str, AttackResult], dict]:
    """LiRA and RMIA on the four parts (known members, known non-members, evaluated members,
    evaluated non-members: ``target`` the target's signals on them, ``parts`` their dataset
    indices). Thresholds (for accuracy) are fitted on the known parts; the figures are measured
    on the evaluated parts, which no reference trained on. Also returns what was used (a, the
    variance, K)."""
    if len(refs) < 2:
        raise ValueError("reference attacks need at least 2 references")
    idx = np.concatenate(parts)
    rows = refs.rows(idx)
    labels = np.concatenate([s.labels.numpy() for s in target])
    logits = np.concatenate([s.logits.numpy() for s in target])
    trained = refs.trained[:, rows]
    ref_logits = refs.logits[:, rows]
    n_known = len(parts[0]) + len(parts[1])
    wrong = trained[:, n_known:].sum(axis=1)
    if wrong.any():  # the references are ref-0, ref-1, ... in this order (reference_outputs)
        i = int(np.flatnonzero(wrong)[0])
        raise ConfigError(f"reference ref-{i} trained on {int(wrong[i])} of the evaluated "
                          "samples (its splits.npz is not a half of this run's known data): "
                          f"remove the run's references/ref-{i} and run again with --references "
                          "to rebuild it")
    cut = np.cumsum([len(p) for p in parts])[:-1]

    lira, variance = lira_scores(margins(logits, labels), margins(ref_logits, labels), trained)
    aux = np.arange(n_known)
    tuned = tune_a(true_probs(ref_logits[:, aux], labels[aux]), trained[:, aux])
    a = UNTUNED_A if tuned is None else tuned
    ratio = rmia_ratio(true_probs(logits, labels), true_probs(ref_logits, labels), trained, a)
    population = np.split(ratio, cut)[1]
    rmia = rmia_scores(ratio, population[~np.isnan(population)])

    out = {}
    is_member = is_member_of(parts[2], parts[3])
    for name, scores in (("lira", lira), ("rmia", rmia)):
        km, kn, em, en = np.split(scores, cut)
        s, t = np.r_[em, en], fit_threshold(km, kn)
        out[name] = AttackResult(mia_metrics(s, is_member, t, resamples), s, t, (km, kn))
    info = {"references": len(refs), "method": refs.method, "models": refs.models,
            "rmia_a": a, "rmia_a_tuned": tuned is not None, "rmia_gamma": 1.0,
            "rmia_population": int(len(parts[1])),
            "lira_variance": variance}
    return out, info


def reference_outputs(run: RunDir, index: np.ndarray, k: int | None = None,
                      data_dir: Path | None = None, files: list[Path] | None = None,
                      references: list[RunDir] | None = None):
    """``References`` (attacks/reference.py) of ``run``: each reference's logits on the
    samples ``index`` and which of them it trained on; None with fewer than 2. The logits
    are the references' PyTorch models', or with ``files`` (one export per reference, in
    its exports/) those files' in their host runtime. Each reference reads the data through
    its own run (a text reference has its own tokenizer) and must have been split on the
    run's data. ``references``: the run's first ``k`` references, opened already (a command
    that reads their outputs twice opens them once)."""
    from safeexport.runio import inputs_of, load_data, references_of
    from safeexport.runtimes import open_runtime

    refs = references if references is not None else references_of(run, k)
    if len(refs) < 2:
        return None
    if files is not None and [Path(f).parent.parent.resolve() for f in files] != [
            r.path.resolve() for r in refs]:
        raise ConfigError("the reference files are not one export per reference model")
    fingerprint = Splits.load(run.splits).fingerprint
    logits, trained, methods, loaded = [], [], set(), {}
    for i, ref in enumerate(refs):
        # the references of a run read the same data: it is loaded once (text is encoded with
        # each reference's own tokenizer, so it is read per reference)
        cfg = ref.read_config()["config"]
        key = json.dumps([cfg.get(k) for k in ("dataset", "data_dir", "max_samples", "seed",
                                               "data_seed")])
        if key in loaded:
            ds, splits = loaded[key], Splits.load(ref.splits)
        else:
            ds, splits = load_data(ref, data_dir)
            if ds.kind != "text":
                loaded[key] = ds
        if splits.fingerprint != fingerprint:
            raise DataError(f"{ref.path} was trained on other data than {run.path}")
        with open_runtime(ref.model if files is None else Path(files[i]),
                          "torch" if files is None else "auto") as rt:
            logits.append(rt(inputs_of(ds, index)).astype(np.float64))
        trained.append(np.isin(index, splits.members))
        methods.add(cfg["method"])
    models = "pytorch" if files is None else f"exported ({Path(files[0]).name}, {rt.name})"
    return References(np.asarray(index), np.stack(logits), np.stack(trained),
                      "/".join(sorted(methods)), models)
