"""Tabular membership-inference benchmarks in their standard files (Shokri et al. 2017), and a
seeded stand-in of their kind for tests and benchmarks (``make_purchase_like``)."""

from pathlib import Path

import numpy as np

from safeexport.data.base import ArrayDataset
from safeexport.data.images import find_file
from safeexport.errors import ConfigError, DataError
from safeexport.rundir import regular_file

HINT = ("these files are not redistributable here; get them from the authors of 'Membership "
        "Inference Attacks against Machine Learning Models' and place them in --data-dir")


def _read_matrix(path: Path, what: str) -> np.ndarray:
    try:
        return np.loadtxt(regular_file(path), delimiter=",", dtype=np.float64, ndmin=2)
    except (ValueError, OSError, ConfigError) as e:  # invalid UTF-8 is a ValueError too
        raise DataError(f"{path}: not a comma-separated numeric {what} file ({e})") from e


def _labels(column: np.ndarray, path: Path) -> np.ndarray:
    """Class numbers 1..100 as indices 0..99; a fractional label is refused, not truncated."""
    if not np.all(np.isfinite(column)) or not np.all(column == np.round(column)):
        raise DataError(f"{path}: labels must be whole class numbers 1..100")
    return column.astype(np.int64) - 1


def load_purchase100(data_dir: Path) -> ArrayDataset:
    """``dataset_purchase``: one row per customer, label (1..100) then 600 binary features."""
    path = find_file([data_dir / "dataset_purchase", data_dir / "purchase" / "dataset_purchase"],
                     "purchase100 file dataset_purchase", HINT)
    m = _read_matrix(path, "purchase")
    if m.shape[1] != 601:
        raise DataError(f"{path}: expected 601 columns (label + 600 features), got {m.shape[1]}")
    return ArrayDataset("purchase100", "tabular", _float32(m[:, 1:], path), _labels(m[:, 0], path),
                        100)


def load_texas100(data_dir: Path) -> ArrayDataset:
    """``texas/100/feats`` (6,169 binary features) and ``texas/100/labels`` (1..100)."""
    roots = [data_dir / "texas" / "100", data_dir]
    feats = find_file([r / "feats" for r in roots], "texas100 file feats", HINT)
    labels = find_file([r / "labels" for r in roots], "texas100 file labels", HINT)
    x = _float32(_read_matrix(feats, "texas features"), feats)
    y = _labels(_read_matrix(labels, "texas labels").ravel(), labels)
    return ArrayDataset("texas100", "tabular", x, y, 100)


def _float32(x: np.ndarray, path: Path) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = x.astype(np.float32)
    if np.isfinite(x).all() and not np.isfinite(out).all():
        raise DataError(f"{path}: values too large for float32 (|x| > 3.4e38); rescale them")
    return out


def make_purchase_like(n: int = 5000, num_classes: int = 40, features: int = 600,
                       seed: int = 0, taste: float = 0.65) -> ArrayDataset:
    """A Purchase-like table: ``n`` customers of ``num_classes`` classes, each a row of
    ``features`` binary "bought it" flags. Items have a popularity p_j ~ Beta(0.6, 6) (about
    one item in ten bought, most rarely); class c buys item j with probability
    sigmoid(logit(p_j) + taste * z_cj), z ~ N(0, 1). Few records per class over many noisy
    features: an MLP memorises its members (train accuracy 1.0, test far below) and leaks
    membership as the real tables do, where a table of separated prototypes would not."""
    rng = np.random.default_rng(seed)
    popularity = rng.beta(0.6, 6.0, features)
    logit = np.log(popularity / (1 - popularity)) + taste * rng.standard_normal(
        (num_classes, features))
    bought = 1 / (1 + np.exp(-logit))
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    x = (rng.random((n, features)) < bought[y]).astype(np.float32)
    return ArrayDataset("purchase-like", "tabular", x, y, num_classes,
                        [f"class{i}" for i in range(num_classes)])
