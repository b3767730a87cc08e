"""Pure metrics on arrays: task accuracy, membership-inference figures with bootstrap
intervals, paired before/after differences, TM-score.

Shared by the compressor's safety test and every later stage, so figures before and after
export come from the same code. ROC and AUC come from scikit-learn; the resampling from
``scipy.stats.bootstrap`` (percentile intervals). Members and non-members are resampled
separately (a stratified bootstrap), so every resample keeps the evaluated balance.
"""

from typing import NamedTuple

import numpy as np

RESAMPLES = 1000  # bootstrap resamples behind every interval of a final figure
LEVEL = 0.95
# MIA figures at the FPR targets of Carlini et al.; the key suffix names the target
FPR_TARGETS = {"1pct": 0.01, "0.1pct": 0.001}
FIGURES = ("mia_acc", "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr")


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy."""
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean())


def fold(value: float | None) -> float | None:
    """max(v, 1 − v): a reading below chance (0.5) is as informative as its mirror above it, so
    accuracy and AUC are folded wherever they rank or score models (the raw value stays in the
    JSON). None stays None."""
    return None if value is None else max(float(value), 1.0 - float(value))


def roc_curve(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1); higher score = member."""
    from sklearn.metrics import roc_curve as sk_roc

    is_member = np.asarray(is_member, dtype=bool)
    if is_member.all() or not is_member.any():
        raise ValueError("ROC needs both members and non-members")
    fpr, tpr, _ = sk_roc(is_member, np.asarray(scores, dtype=np.float64),
                         drop_intermediate=False)
    return fpr, tpr


def roc_auc(scores: np.ndarray, is_member: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(is_member, dtype=bool),
                               np.asarray(scores, dtype=np.float64)))


def flagged_fpr(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> np.ndarray:
    """Per member, the false-positive rate of the threshold that just flags it: the fraction
    of non-members scoring at least as high (higher score = member). 0 means it outscores
    every non-member. (A sort and a search; scikit-learn has no per-sample form of this.)"""
    ranked = np.sort(np.asarray(nonmember_scores, dtype=np.float64))
    below = np.searchsorted(ranked, np.asarray(member_scores, dtype=np.float64), side="left")
    return (len(ranked) - below) / len(ranked)


def measurable(target: float, n_nonmembers: int) -> bool:
    """Whether an FPR target can be read with ``n_nonmembers``: the smallest non-zero FPR is
    1/N, so a target below it would report the TPR at zero false positives under its name."""
    return target * n_nonmembers >= 1


def tpr_at_fpr(scores: np.ndarray, is_member: np.ndarray,
               target: float) -> tuple[float | None, float | None]:
    """(highest TPR with FPR ≤ target, the FPR actually achieved there), or (None, None) when
    the target is below 1/N non-members (not measurable)."""
    is_member = np.asarray(is_member, dtype=bool)
    if not measurable(target, int((~is_member).sum())):
        return None, None
    fpr, tpr = roc_curve(scores, is_member)
    return _tpr_at(fpr, tpr, target)


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float) -> tuple[float, float]:
    ok = fpr <= target + 1e-12
    i = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[i]), float(fpr[i])


def _figures(scores: np.ndarray, is_member: np.ndarray, threshold: float,
             n_nonmembers: int) -> np.ndarray:
    """[accuracy at ``threshold``, AUC, TPR at each FPR target (NaN when not measurable)]
    along the first axis, for every row of ``scores`` (..., samples; ``is_member`` marks the
    same columns in each): the statistic of the bootstrap, all resamples in one call. The same
    figures as scikit-learn's ROC gives (tests/test_attack_metrics.py checks it on tied
    scores) from one sort in NumPy: scikit-learn's per-call input validation made a run's
    final evaluation 24 of 33 s on the test config, and a call per resample (scipy's
    ``vectorized=False``) half of a study's time in the fast tests."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    sm, sn = scores[..., is_member], scores[..., ~is_member]
    n_m, n_n = sm.shape[-1], sn.shape[-1]
    ranks = rankdata(scores, axis=-1)  # average ranks: a tie counts one half, as in the AUC
    auc = (ranks[..., is_member].sum(-1) - n_m * (n_m + 1) / 2) / (n_m * n_n)
    out = [((scores > threshold) == is_member).mean(-1), auc]
    desc = np.flip(np.sort(sn, axis=-1), axis=-1)
    for target in FPR_TARGETS.values():
        if not measurable(target, n_nonmembers):
            out.append(np.full(auc.shape, np.nan))
            continue
        # the best threshold flags at most k non-members: every member above the (k+1)-th
        # highest non-member score (all of them when k covers every non-member)
        k = int(np.floor(target * n_n + 1e-9))
        out.append(np.ones(auc.shape) if k >= n_n else (sm > desc[..., k:k + 1]).mean(-1))
    return np.stack(out)


class Bootstrap(NamedTuple):
    """Percentile interval bounds of each entry of a statistic, and its resampled values
    (entries × resamples)."""

    lo: np.ndarray
    hi: np.ndarray
    replicates: np.ndarray


BOOTSTRAP_CELLS = 4_000_000  # resampled scores held at once per sample set (32 MB of float64)


def _bootstrap(statistic, n_members: int, n_nonmembers: int, resamples: int,
               seed: int) -> Bootstrap:
    """Percentile interval of a vector ``statistic(member_idx, nonmember_idx)`` over stratified
    resamples of the evaluated members and non-members; NaN where the statistic is NaN (a TPR
    that is not measurable), which is left out of the resampling. The statistic takes index
    arrays of shape (..., count) and gives (entries, ...): scipy draws the resamples in
    batches of at most ``BOOTSTRAP_CELLS`` indices and passes each batch whole."""
    from scipy.stats import bootstrap

    full = np.arange(n_members), np.arange(n_nonmembers)
    defined = ~np.isnan(statistic(*full))
    batch = max(1, BOOTSTRAP_CELLS // (n_members + n_nonmembers))
    res = bootstrap(full, lambda i, j, axis=-1: statistic(i, j)[defined],
                    n_resamples=resamples, confidence_level=LEVEL, method="percentile",
                    vectorized=True, batch=None if batch >= resamples else batch,
                    random_state=np.random.default_rng(seed))
    lo, hi = np.full(len(defined), np.nan), np.full(len(defined), np.nan)
    lo[defined], hi[defined] = res.confidence_interval.low, res.confidence_interval.high
    replicates = np.full((len(defined), resamples), np.nan)
    replicates[defined] = np.reshape(res.bootstrap_distribution, (int(defined.sum()), -1))
    return Bootstrap(lo, hi, replicates)


def _joined(members: np.ndarray, nonmembers: np.ndarray, i: np.ndarray,
            j: np.ndarray) -> np.ndarray:
    """The scores of resampled members ``i`` then non-members ``j`` (..., count each)."""
    return np.concatenate([members[i], nonmembers[j]], axis=-1)


def simultaneous_lower(point: np.ndarray, replicates: np.ndarray) -> np.ndarray:
    """Lower bounds that hold for every entry of ``point`` AT ONCE with 95% confidence
    (max-t over the same resamples; Romano & Wolf 2005): each entry's bootstrap standard error
    s, and c the 95th percentile over resamples of the largest standardized overshoot
    max_e (replicate_e − point_e) / s_e, give point − c·s. Looking at 15 attacks × 3 figures,
    a one-at-a-time 95% bound excludes zero for some entry at chance far more often than 5%;
    this bound does so about 5% of the time. An entry that never varies is its own bound;
    NaN entries stay NaN. (Written here: Bonferroni, as statsmodels' multipletests gives it,
    holds too but ignores that these 45 figures move together and would need 45 times the
    resamples; no maintained library computes max-t bounds from given replicates.)"""
    point = np.asarray(point, dtype=np.float64)
    se = np.full(point.shape, np.nan)
    defined = ~np.isnan(point)
    se[defined] = np.std(replicates[defined], axis=1)
    varies = defined & (se > 0)
    lower = point.copy()
    if varies.any():
        overshoot = (replicates[varies] - point[varies, None]) / se[varies, None]
        c = float(np.quantile(overshoot.max(axis=0), LEVEL))
        lower[varies] = point[varies] - c * se[varies]
    return lower


def _split(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    is_member = np.asarray(is_member, dtype=bool)
    if is_member.all() or not is_member.any():
        raise ValueError("membership figures need both members and non-members")
    return scores[is_member], scores[~is_member]


def _labels(n_m: int, n_n: int) -> np.ndarray:
    return np.r_[np.ones(n_m, bool), np.zeros(n_n, bool)]


def _interval(lo: float, hi: float) -> list[float] | None:
    return None if np.isnan(lo) or np.isnan(hi) else [float(lo), float(hi)]


def mia_metrics(scores: np.ndarray, is_member: np.ndarray, threshold: float = 0.5,
                resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """MIA accuracy at ``threshold`` (0.5 = chance on a balanced set), ROC AUC, TPR at 1% and
    0.1% FPR with the achieved FPRs (None, and listed in ``not_measurable``, when the target is
    below 1/N non-members), the sample counts they rest on, ``degenerate`` (every sample on
    the same side of the threshold: the accuracy is 0.5 in every resample, and its interval a
    single point that says nothing) and ``ci``: a 95% bootstrap interval of each figure
    (``resamples`` = 0 skips them)."""
    sm, sn = _split(scores, is_member)
    n_m, n_n = len(sm), len(sn)
    s, y = np.r_[sm, sn], _labels(n_m, n_n)
    out = {"mia_acc": float(((s > threshold) == y).mean()), "auc": roc_auc(s, y)}
    not_measurable = []
    for key, target in FPR_TARGETS.items():
        out[f"tpr_at_{key}_fpr"], out[f"achieved_fpr_{key}"] = tpr_at_fpr(s, y, target)
        if out[f"tpr_at_{key}_fpr"] is None:
            not_measurable.append(f"TPR at {100 * target:g}% FPR is not measurable with "
                                  f"{n_n} non-members (needs {int(np.ceil(1 / target))})")
    decisions = s > threshold
    out.update(n_members=n_m, n_nonmembers=n_n, not_measurable=not_measurable,
               degenerate=bool(decisions.all() or not decisions.any()))
    if resamples:
        lo, hi, _ = _bootstrap(lambda i, j: _figures(_joined(sm, sn, i, j), y, threshold, n_n),
                               n_m, n_n, resamples, seed)
        out["ci"] = {k: _interval(a, b) for k, a, b in zip(FIGURES, lo, hi, strict=True)}
    return out


def paired_difference(before: np.ndarray, after: np.ndarray, is_member: np.ndarray,
                      thresholds: tuple[float, float] = (0.5, 0.5), resamples: int = RESAMPLES,
                      seed: int = 0) -> dict:
    """after − before of every figure of ``mia_metrics`` for two models scored on the SAME
    samples, with a paired bootstrap interval: each resample draws the same members and
    non-members for both, so the noise the two share cancels."""
    bm, bn = _split(before, is_member)
    am, an = _split(after, is_member)
    y = _labels(len(bm), len(bn))
    n_n = len(bn)

    def diff(i, j):
        return (_figures(_joined(am, an, i, j), y, thresholds[1], n_n)
                - _figures(_joined(bm, bn, i, j), y, thresholds[0], n_n))

    point = diff(np.arange(len(bm)), np.arange(n_n))
    lo, hi, _ = _bootstrap(diff, len(bm), n_n, resamples, seed)
    return {k: {"delta": None if np.isnan(p) else float(p), "ci": _interval(a, b)}
            for k, p, a, b in zip(FIGURES, point, lo, hi, strict=True)}


VERDICT_FIGURES = ("mia_acc", "auc", "tpr_at_1pct_fpr")  # what a release verdict compares
MIN_FPR_COUNT = 10  # non-members above a low-FPR threshold for the TPR there to decide anything


def not_decidable(figure: str, n_nonmembers: int) -> str | None:
    """Why ``figure`` cannot decide a verdict on this many evaluated non-members, or None.
    TPR at 1% FPR is read at the threshold the top 1% of non-members set: with fewer than
    MIN_FPR_COUNT of them it is one of a handful of samples, and the figure a draw (on digits
    the third-highest of 224 non-members sets it, and one member is 0.45 points of TPR)."""
    if figure != "tpr_at_1pct_fpr":
        return None
    above = int(n_nonmembers * FPR_TARGETS["1pct"])
    if above >= MIN_FPR_COUNT:
        return None
    return (f"TPR at 1% FPR is not decidable at this sample size: {n_nonmembers} evaluated "
            f"non-members put {above} above its threshold, it needs {MIN_FPR_COUNT} "
            f"({int(MIN_FPR_COUNT / FPR_TARGETS['1pct'])} non-members)")


def paired_rises(before: dict[str, tuple[np.ndarray, float]],
                 after: dict[str, tuple[np.ndarray, float]], is_member: np.ndarray,
                 resamples: int = RESAMPLES, seed: int = 0,
                 figures: tuple[str, ...] = VERDICT_FIGURES,
                 ranking_only: frozenset[str] = frozenset()) -> dict:
    """after − before of every attack's folded MIA accuracy, folded AUC and TPR at 1% FPR
    (``figures``, some of ``VERDICT_FIGURES``), two models scored on the SAME samples
    (``before`` and ``after`` map an attack's name to its scores and threshold), and of the
    largest rise over the attacks, each with a paired bootstrap interval. One resample draws
    the same members and non-members for every attack and both models, so the interval of the
    maximum accounts for looking at many attacks: its upper bound below a tolerance shows that
    no attack rose by that much (a non-inferiority test over all of them at once). Each
    attack's rise also gets ``lower_all``, a lower bound that holds for every attack and
    figure at once (``simultaneous_lower``): a rise is proven only when it clears that bound.
    Rises are rounded to 1e-12, far below one sample's 1/N, so folding's (1 − v) residue is
    no rise. The attacks named in ``ranking_only`` are compared on the figures that need no decision
    threshold (AUC, TPR): their MIA accuracy is left out (None)."""
    names = list(before)
    is_member = np.asarray(is_member, dtype=bool)
    split = {k: (_split(before[k][0], is_member), _split(after[k][0], is_member))
             for k in names}
    y = _labels(int(is_member.sum()), int((~is_member).sum()))
    n_n = int((~is_member).sum())
    keep = [FIGURES.index(f) for f in figures]
    fold_at = [k for k, f in enumerate(figures) if f in ("mia_acc", "auc")]
    unranked = [a for a, k in enumerate(names) if k in ranking_only]
    acc_at = figures.index("mia_acc") if "mia_acc" in figures else None

    def folded(f: np.ndarray) -> np.ndarray:
        f = f[keep]
        f[fold_at] = np.maximum(f[fold_at], 1 - f[fold_at])  # below chance: folded
        return f

    def rises(i, j):
        # (attacks, figures, ...resamples)
        d = np.array([folded(_figures(_joined(am, an, i, j), y, after[k][1], n_n))
                      - folded(_figures(_joined(bm, bn, i, j), y, before[k][1], n_n))
                      for k, ((bm, bn), (am, an)) in split.items()]).round(12)
        if acc_at is not None:
            d[unranked, acc_at] = np.nan
        missing = np.isnan(d)  # a figure no attack measures stays NaN in the maximum
        worst = np.where(missing.all(0), np.nan, np.where(missing, -np.inf, d).max(0))
        return np.concatenate([d.reshape(-1, *d.shape[2:]), worst])

    point = rises(np.arange(len(y) - n_n), np.arange(n_n))
    lo, hi, replicates = _bootstrap(rises, len(y) - n_n, n_n, resamples, seed)
    width = len(figures)
    each = len(names) * width  # the per-attack entries; the maxima over attacks follow
    lower = simultaneous_lower(point[:each], replicates[:each])

    def entry(at: int) -> dict:
        return {"delta": None if np.isnan(point[at]) else float(point[at]),
                "ci": _interval(lo[at], hi[at])}

    per = {k: {f: {**entry(a * width + b), "lower_all": None if np.isnan(
        lower[a * width + b]) else float(lower[a * width + b])}
        for b, f in enumerate(figures)} for a, k in enumerate(names)}
    worst = {}
    for b, f in enumerate(figures):
        values = {k: per[k][f]["delta"] for k in names if per[k][f]["delta"] is not None}
        worst[f] = {**entry(len(names) * width + b),
                    "attack": max(values, key=values.get) if values else None}
    return {"attacks": per, "max": worst}


def detectable_rise(n_members: int, n_nonmembers: int, power: float = 0.8) -> float:
    """The smallest rise of MIA accuracy (from 0.5) that a comparison of two independent
    measurements on this many members and non-members detects at α = 0.05 (two-sided) with
    ``power``: (z_0.975 + z_power)·√(2·0.25/n), n the evaluated samples (accuracy near 0.5).
    The paired comparison is at least this sensitive, so it is a conservative floor."""
    from scipy.stats import norm

    n = n_members + n_nonmembers
    return float((norm.ppf(0.975) + norm.ppf(power)) * np.sqrt(2 * 0.25 / n))


def accuracy_interval(correct: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = 0) -> list[float]:
    """95% bootstrap interval of the mean of a boolean vector (task accuracy)."""
    from scipy.stats import bootstrap

    correct = np.asarray(correct, dtype=np.float64)
    if len(correct) < 2:
        return [float(correct.mean()), float(correct.mean())]
    res = bootstrap((correct,), np.mean, n_resamples=resamples, confidence_level=LEVEL,
                    method="percentile", random_state=np.random.default_rng(seed))
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def chance_accuracy(labels: np.ndarray) -> float:
    """The accuracy of always predicting the most common class of ``labels``."""
    return float(np.bincount(np.asarray(labels)).max() / len(labels))


def figure_warnings(task_acc_ci: list[float], chance: float, attack: str,
                    attack_metrics: dict) -> list[str]:
    """What makes a row's figures unfit to rank on: a model whose task accuracy cannot be told
    from always guessing the commonest class, and an attack that reads below chance by more
    than its 95% interval allows."""
    out = []
    if attack_metrics.get("degenerate"):
        out.append(f"the {attack} attack's decisions are constant (every evaluated sample on "
                   "one side of its threshold): degenerate, its MIA accuracy of 0.5 and its "
                   "interval say nothing")
    if task_acc_ci[0] <= chance:
        out.append(f"task accuracy (95% interval {task_acc_ci[0]:.4f}-{task_acc_ci[1]:.4f}) "
                   f"cannot be told from chance ({chance:.4f}, the commonest class): its "
                   "privacy figures say nothing about a useful model")
    ci = attack_metrics.get("ci", {})
    low = [f"{name} {attack_metrics[key]:.4f}, 95% interval up to {ci[key][1]:.4f}"
           for key, name in (("mia_acc", "MIA accuracy"), ("auc", "AUC"))
           if ci.get(key) and ci[key][1] < 0.5]
    if low:
        out.append(f"the {attack} attack reads below chance beyond the noise ({'; '.join(low)}):"
                   " the known and unknown parts differ or the attacker overfits; scores and "
                   "rankings use the folded value max(v, 1 - v)")
    return out


def tm_score(task_acc: float, mia_acc: float, lam: float = 1.0) -> float:
    """SafeCompress's trade-off: (task accuracy)^λ / fold(MIA accuracy); higher is better. The
    MIA accuracy is folded, so a reading below chance is not rewarded as better than chance."""
    return float(task_acc ** lam / fold(mia_acc))


def logit_parity(reference: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict:
    """How closely an exported model's logits follow the reference model's on the same inputs:
    largest |difference|, top-1 agreement, accuracy of both, and the signal-to-noise ratio of
    the logits in dB (10·log10 of reference power over difference power; None when identical)."""
    reference, logits = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    if reference.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {logits.shape}")
    noise = float(((logits - reference) ** 2).sum())
    signal = float((reference ** 2).sum())
    return {"samples": int(len(labels)),
            "max_abs_diff": float(np.abs(logits - reference).max()),
            "max_abs_logit": float(np.abs(reference).max()),
            "agreement": float((logits.argmax(1) == reference.argmax(1)).mean()),
            "acc_before": accuracy(reference, labels), "acc_after": accuracy(logits, labels),
            "snr_db": None if noise == 0 else 10 * float(np.log10(signal / noise))}
