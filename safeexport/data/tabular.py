"""Tabular membership-inference benchmarks in their standard files (Shokri et al. 2017)."""

from pathlib import Path

import numpy as np

from safeexport.data.base import ArrayDataset
from safeexport.data.images import find_file
from safeexport.errors import DataError

HINT = ("these files are not redistributable here; get them from the authors of 'Membership "
        "Inference Attacks against Machine Learning Models' and place them in --data-dir")


def _read_matrix(path: Path, what: str) -> np.ndarray:
    try:
        return np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as e:
        raise DataError(f"{path}: not a comma-separated numeric {what} file ({e})") from e


def load_purchase100(data_dir: Path) -> ArrayDataset:
    """``dataset_purchase``: one row per customer, label (1..100) then 600 binary features."""
    path = find_file([data_dir / "dataset_purchase", data_dir / "purchase" / "dataset_purchase"],
                     "purchase100 file dataset_purchase", HINT)
    m = _read_matrix(path, "purchase")
    if m.shape[1] != 601:
        raise DataError(f"{path}: expected 601 columns (label + 600 features), got {m.shape[1]}")
    return ArrayDataset("purchase100", "tabular", m[:, 1:], m[:, 0].astype(np.int64) - 1, 100)


def load_texas100(data_dir: Path) -> ArrayDataset:
    """``texas/100/feats`` (6,169 binary features) and ``texas/100/labels`` (1..100)."""
    roots = [data_dir / "texas" / "100", data_dir]
    feats = find_file([r / "feats" for r in roots], "texas100 file feats", HINT)
    labels = find_file([r / "labels" for r in roots], "texas100 file labels", HINT)
    x = _read_matrix(feats, "texas features")
    y = _read_matrix(labels, "texas labels").ravel().astype(np.int64) - 1
    return ArrayDataset("texas100", "tabular", x, y, 100)
