"""Figures people would rather look at than read: the learning curve and ROC curves."""

from pathlib import Path

import numpy as np

from safeexport.rundir import atomic_write


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
    if not history:
        for ax in axes:
            ax.text(0.5, 0.5, "no mask update in this run", ha="center", va="center")
    else:
        ep = [h["epoch"] for h in history]
        axes[0].plot(ep, [h["train_loss"] for h in history], "o-")
        axes[0].set_title("training loss", fontsize=10)
        for key, ax, label in (("task_acc", axes[1], "task accuracy (validation split)"),
                               ("mia_acc", axes[2], "MIA accuracy (held-out known split)")):
            ax.plot(ep, [h["base"][key] for h in history], "o-", label="M_S before update")
            ax.plot(ep, [h["candidates"][h["winner"]][key] for h in history], "s--",
                    label="selected candidate")
            ax.set_title(label, fontsize=10)
            ax.legend(fontsize=8)
        axes[2].axhline(0.5, color="grey", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title, y=1.02)
    save_figure(fig, path)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path: Path,
             title: str) -> None:
    """ROC curves on log-log axes (low-FPR behaviour is what matters); ``curves`` maps a label
    to (fpr, tpr, auc)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    floor = 1e-4
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"{label} (AUC {auc:.3f})")
    ax.plot([floor, 1], [floor, 1], color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title, fontsize=10)
    save_figure(fig, path)
