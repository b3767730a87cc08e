"""Figures people would rather look at than read: the learning curve and ROC curves (and the
text form of a figure that may be unmeasurable)."""

from pathlib import Path

import numpy as np

from safeexport.rundir import atomic_write


def fmt_figure(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or "n/m" (not measurable) at the same width for None."""
    if value is None:
        width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
        return "n/m".rjust(int(width) if width else 0)
    return format(value, spec)


def fmt_interval(m: dict, key: str, digits: int = 4) -> str:
    """A figure of ``mia_metrics`` with its 95% interval; "degenerate" instead of the
    single-point interval of an attack whose decisions are all the same."""
    value, ci = m[key], m.get("ci", {}).get(key)
    if value is None:
        return "n/m"
    text = f"{value:.{digits}f}"
    if key == "mia_acc" and m.get("degenerate"):
        return f"{text} degenerate"
    return f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else text


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_curve(history: list[dict], path: Path, title: str) -> None:
    """Loss, task accuracy and MIA accuracy across mask updates (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ep = [h["epoch"] for h in history]
    axes[0].plot(ep, [h["train_loss"] for h in history], "o-")
    axes[0].set_title("training loss", fontsize=10)
    for key, ax, label in (("task_acc", axes[1], "task accuracy (validation split)"),
                           ("mia_acc", axes[2], "MIA accuracy (held-out known split)")):
        ax.plot(ep, [h["base"][key] for h in history], "o-", label="M_S before update")
        ax.plot(ep, [h["candidates"][h["winner"]][key] for h in history], "s--",
                label="selected candidate")
        if key == "mia_acc":  # the winner's 95% interval: how much the selection can see
            cis = [h["candidates"][h["winner"]].get("ci", {}).get(key) for h in history]
            if all(cis):
                ax.fill_between(ep, [c[0] for c in cis], [c[1] for c in cis], alpha=0.2,
                                color="C1", label="95% interval (selected)")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    axes[2].axhline(0.5, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.02)
    save_figure(fig, path)


def roc_curves(res, label: str, thresholds: bool = True) -> dict:
    """Curves of ``plot_roc`` from a ``MembershipResult``: its configured attack, and (dashed)
    each threshold attack when ``thresholds``."""
    curves = {label: (*res.roc(), res.metrics["auc"], False)}
    if thresholds:
        for name in res.results:
            if name != res.attack:
                curves[f"{label}, {name} threshold"] = (*res.roc(name),
                                                        res.results[name].metrics["auc"], True)
    return curves


def plot_roc(curves: dict[str, tuple], path: Path, title: str, n_nonmembers: int) -> None:
    """ROC curves on log-log axes (low-FPR behaviour is what matters); ``curves`` maps a label
    to (fpr, tpr, auc, dashed). The FPR axis starts at 1/N non-members: below it a curve has no
    resolution, so nothing is drawn there. The legend sits beside the plot, off the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    floor = 1.0 / n_nonmembers
    for label, (fpr, tpr, auc, dashed) in curves.items():
        keep = fpr >= floor
        # starts at FPR = 1/N with the TPR reached at zero false positives
        x = np.r_[floor, fpr[keep]]
        y = np.r_[tpr[~keep].max() if (~keep).any() else 0.0, tpr[keep]]
        ax.plot(x, np.maximum(y, floor), ls="--" if dashed else "-", lw=0.9 if dashed else 1.6,
                label=f"{label} (AUC {auc:.3f})")
    ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel(f"false positive rate (from 1/{n_nonmembers} non-members)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)
