"""Text classification CSVs: AG News (class, title, description) and Yelp-5 (class, text)."""

import csv
from pathlib import Path

import numpy as np

from safeexport.data.base import ArrayDataset
from safeexport.errors import ConfigError, DataError
from safeexport.rundir import regular_file

AGNEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]


def read_class_csv(paths: list[Path], num_classes: int, name: str) -> tuple[list[str], list[int]]:
    """Rows ``label(1..K), field, field...``; the text is the fields joined by a space."""
    texts, labels = [], []
    for path in paths:
        lineno = 0
        try:
            with open(regular_file(path), newline="", encoding="utf-8") as f:
                for lineno, row in enumerate(csv.reader(f), 1):
                    try:
                        label = int(row[0]) - 1
                    except (ValueError, IndexError):
                        raise DataError(f"{path}:{lineno}: first column must be a class "
                                        "number") from None
                    if not 0 <= label < num_classes or len(row) < 2:
                        raise DataError(f"{path}:{lineno}: expected class 1..{num_classes} "
                                        "and text")
                    texts.append(" ".join(s.replace("\\n", " ").strip() for s in row[1:]))
                    labels.append(label)
        except (UnicodeDecodeError, csv.Error, OSError, ConfigError) as e:
            raise DataError(f"{path}:{lineno + 1}: not a readable UTF-8 CSV file ({e})") from e
    if not texts:
        raise DataError(f"{name}: no rows in {', '.join(map(str, paths))}")
    return texts, labels


def load_text_csv(name: str, data_dir: Path, folders: list[str], num_classes: int,
                  class_names: list[str], hint: str) -> ArrayDataset:
    """``train.csv`` and/or ``test.csv`` found in ``data_dir/<folder>`` or ``data_dir``.

    Both files are pooled: the membership split draws members and non-members from the pool.
    """
    for root in [data_dir / f for f in folders] + [data_dir]:
        paths = [root / f for f in ("train.csv", "test.csv") if (root / f).exists()]
        if paths:
            texts, labels = read_class_csv(paths, num_classes, name)
            return ArrayDataset(name, "text", np.array(texts), np.array(labels), num_classes,
                                class_names)
    raise DataError(f"{name} not found: expected train.csv and/or test.csv in "
                    f"{' or '.join(str(data_dir / f) for f in folders)} or {data_dir}; {hint}")
