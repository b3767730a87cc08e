"""Tables (Markdown and CSV) and plots of the study, from rows of figures per seed."""

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from safeexport.metrics import fold
from safeexport.plots import save_figure
from safeexport.rundir import atomic_write


@dataclass
class Row:
    """One line of a table: a label, text columns, figures measured once per seed (NaN where a
    figure is not measurable) and the 95% bootstrap interval of each figure's last seed."""

    label: str
    text: dict[str, str] = field(default_factory=dict)
    figures: dict[str, list[float]] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    seeds: list[tuple[int, dict, dict]] = field(default_factory=list)  # (seed, figures, ci)

    def add(self, figures: dict[str, float | None], intervals: dict | None = None,
            seed: int = 0) -> None:
        """Append one seed's figures (None = not measurable) and their intervals."""
        for k, v in figures.items():
            self.figures.setdefault(k, []).append(np.nan if v is None else float(v))
        self.intervals.update({k: v for k, v in (intervals or {}).items() if v is not None})
        self.seeds.append((seed, figures, intervals or {}))

    def mean(self, key: str) -> float:
        return float(np.mean(self.figures[key]))

    def std(self, key: str) -> float:
        values = self.figures[key]
        return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Column:
    """A figure column: its key in the rows, its header, its format, and which way is better
    (+1 higher, -1 lower, 0 not ranked)."""

    key: str
    header: str
    fmt: str = ".4f"
    better: int = 0
    fold: bool = False  # rank on max(v, 1 - v): a reading below chance is no better than chance


def _cell(row: Row, col: Column) -> str:
    if col.key not in row.figures:
        return "–"
    if np.isnan(row.figures[col.key]).any():
        return "n/m"
    text = format(row.mean(col.key), col.fmt)
    if len(row.figures[col.key]) > 1:
        text += f" ± {format(row.std(col.key), col.fmt)}"
    elif col.key in row.intervals:
        lo, hi = row.intervals[col.key]
        text += f" [{format(lo, col.fmt)}, {format(hi, col.fmt)}]"
    return text


def best_rows(rows: list[Row], col: Column, ranked: list[str]) -> set[str]:
    """Labels of the rows (among ``ranked``) with the best mean of ``col`` (ties all win)."""
    means = {r.label: fold(r.mean(col.key)) if col.fold else r.mean(col.key) for r in rows
             if r.label in ranked and col.key in r.figures and not np.isnan(r.mean(col.key))}
    if not means or col.better == 0:
        return set()
    top = max(means.values()) if col.better > 0 else min(means.values())
    return {label for label, v in means.items() if v == top}


def markdown(rows: list[Row], text_cols: list[str], cols: list[Column],
             ranked: list[str] | None = None) -> str:
    """A Markdown table; the best figure of each ranked column among ``ranked`` rows in bold
    (folded columns rank on max(v, 1 - v)). One seed: each figure with its 95% bootstrap
    interval in brackets; several: mean ± std over seeds. n/m: not measurable."""
    ranked = ranked or []
    head = ["", *text_cols, *(c.header for c in cols)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {c.key: best_rows(rows, c, ranked) for c in cols}
    for r in rows:
        cells = [r.text.get(t, "") for t in text_cols]
        for c in cols:
            cell = _cell(r, c)
            cells.append(f"**{cell}**" if r.label in best[c.key] else cell)
        lines.append("| " + " | ".join([r.label, *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[Row], text_cols: list[str], cols: list[Column]) -> None:
    """One line per row: text columns, then mean, std and n of every figure."""
    def write(f):
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["row", *text_cols,
                    *(f"{c.key}_{s}" for c in cols for s in ("mean", "std", "n"))])
        for r in rows:
            w.writerow([r.label, *(r.text.get(t, "") for t in text_cols),
                        *(v for c in cols for v in (
                            (r.mean(c.key), r.std(c.key), len(r.figures[c.key]))
                            if c.key in r.figures else ("", "", 0)))])
        f.write(buf.getvalue().encode())
    atomic_write(path, write)


def write_seeds_csv(path: Path, rows: list[Row], cols: list[Column]) -> None:
    """One line per row, seed and figure: the value and its 95% interval (empty where the
    figure has none), for what the mean ± std of the table hides."""
    def write(f):
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["row", "seed", "figure", "value", "ci_low", "ci_high"])
        for r in rows:
            for seed, figures, ci in r.seeds:
                for c in cols:
                    if c.key in figures:
                        lo, hi = ci.get(c.key) or ("", "")
                        value = figures[c.key]
                        w.writerow([r.label, seed, c.key, "" if value is None else value, lo, hi])
        f.write(buf.getvalue().encode())
    atomic_write(path, write)


def plot_study(path: Path, rows: list[Row], title: str) -> None:
    """Train and test accuracy (0 to 1) beside MIA accuracy on its own axis, zoomed on the
    readings with the chance line, so a few points of membership risk are not flattened by
    the accuracy scale: the run's attack and the strongest attack of each row. Error bars: the
    std over seeds, or with one seed the 95% bootstrap interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, mia_ax) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 3), 4.2))
    x = np.arange(len(rows))
    labels = [r.label for r in rows]
    keys = [("train_acc", "train acc"), ("task_acc", "test acc")]
    width = 0.8 / len(keys)
    for i, (key, name) in enumerate(keys):
        acc_ax.bar(x + (i - (len(keys) - 1) / 2) * width, _means(rows, key), width,
                   yerr=_errors(rows, key), label=name, capsize=3)
    acc_ax.set_ylim(0, 1.05)
    acc_ax.set_title("task accuracy", fontsize=10)
    acc_ax.legend(fontsize=8)
    shown = []
    for i, (key, name, colour) in enumerate((("mia_acc", "the run's attack", "C3"),
                                             ("strongest_mia_acc", "strongest attack", "C4"))):
        if not any(key in r.figures for r in rows):
            continue
        means, errors = _means(rows, key), _errors(rows, key)
        mia_ax.errorbar(x + (i - 0.5) * 0.2, means, yerr=errors, fmt="o", capsize=4,
                        color=colour, label=name)
        shown += [m + e for m, e in zip(means, errors[1], strict=True)]
        shown += [m - e for m, e in zip(means, errors[0], strict=True)]
    mia_ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="chance")
    finite = [m for m in shown if np.isfinite(m)] or [0.5]
    mia_ax.set_ylim(min(0.48, min(finite) - 0.01), max(finite) + 0.01)
    mia_ax.set_title("membership-inference accuracy (its own scale)", fontsize=10)
    mia_ax.legend(fontsize=8)
    for ax in (acc_ax, mia_ax):
        ax.set_xticks(x, labels, rotation=25, ha="right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def _errors(rows: list[Row], key: str) -> np.ndarray:
    """Error bars (below, above) of each row's ``key``: the std over seeds, or with one seed
    the distance to the ends of the 95% interval (0 where a row has neither)."""
    out = np.zeros((2, len(rows)))
    for i, r in enumerate(rows):
        if key not in r.figures:
            continue
        if len(r.figures[key]) > 1:
            out[:, i] = r.std(key)
        elif key in r.intervals and np.isfinite(r.mean(key)):
            lo, hi = r.intervals[key]
            out[:, i] = max(0.0, r.mean(key) - lo), max(0.0, hi - r.mean(key))
    return out


def _means(rows: list[Row], key: str) -> list[float]:
    return [r.mean(key) if key in r.figures else np.nan for r in rows]


def plot_tradeoff(path: Path, rows: list[Row], title: str) -> None:
    """Task accuracy against MIA accuracy, one point per row (down and right is better). Rows
    are told apart by colour and marker in a legend outside the axes, so labels of close
    points cannot overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^vP*Xhp<>"
    for i, r in enumerate(rows):
        ax.errorbar(r.mean("mia_acc"), r.mean("task_acc"), xerr=r.std("mia_acc"),
                    yerr=r.std("task_acc"), fmt=markers[i % len(markers)], capsize=3,
                    color=f"C{i % 10}", label=r.label)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("MIA accuracy (0.5 = chance)")
    ax.set_ylabel("task accuracy (test)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    save_figure(fig, path)
