"""The membership split of SPEC §4, plus the validation and test splits.

The pool (every sample the dataset has) is cut, class-stratified, into six disjoint parts:

    known_members      target trains on it; the attacker may train on it
    unknown_members    target trains on it; used only by the final MIA evaluation
    known_nonmembers   never trained on; the attacker may train on it
    unknown_nonmembers never trained on; used only by the final MIA evaluation
    validation         never trained on; task test during candidate selection
    test               never trained on; final task accuracy

During selection the attacker trains on the first half of each known part and its accuracy
(the safety test) is measured on the other half, so selection never touches the unknown parts,
the validation of the final report, or the test split. Half, not a fifth: on the digits default
a fifth was 45 + 45 samples (one sample = 1.1 points of MIA accuracy), and rounds were won on
one sample of noise.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from safeexport.data.base import stratified_order
from safeexport.errors import ConfigError, DataError
from safeexport.rundir import atomic_write, regular_file

# Fractions of the pool; members are half of it, as CIFAR's 50k train / 10k test split is close
# to. Non-members are split four ways so the final MIA evaluation is balanced and unseen.
FRACTIONS = {
    "known_members": 0.25,
    "unknown_members": 0.25,
    "known_nonmembers": 0.125,
    "unknown_nonmembers": 0.125,
    "validation": 0.125,
    "test": 0.125,
}
SELECT_FRACTION = 0.5  # share of each known part held out for the in-loop safety test
MIN_PART = 20  # smallest part that still gives a meaningful accuracy


@dataclass
class Splits:
    """Index arrays into the dataset, plus the fingerprint of the data they index."""

    known_members: np.ndarray
    unknown_members: np.ndarray
    known_nonmembers: np.ndarray
    unknown_nonmembers: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    fingerprint: str

    @property
    def members(self) -> np.ndarray:
        """Everything the target trains on."""
        return np.concatenate([self.known_members, self.unknown_members])

    def _select_cut(self, part: np.ndarray) -> int:
        return len(part) - max(1, int(round(len(part) * SELECT_FRACTION)))

    def attack_train(self) -> tuple[np.ndarray, np.ndarray]:
        """(members, non-members) the in-loop attacker trains on."""
        return (self.known_members[: self._select_cut(self.known_members)],
                self.known_nonmembers[: self._select_cut(self.known_nonmembers)])

    def attack_select(self) -> tuple[np.ndarray, np.ndarray]:
        """(members, non-members) of the in-loop safety test."""
        return (self.known_members[self._select_cut(self.known_members):],
                self.known_nonmembers[self._select_cut(self.known_nonmembers):])

    def check(self, n: int) -> None:
        """Refuse a split that cannot index a dataset of ``n`` samples as the method needs:
        an empty part, an index outside [0, n), or a sample in two parts (a member scored as a
        test sample would report training accuracy as test accuracy)."""
        parts = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fingerprint"}
        empty = [k for k, v in parts.items() if v.ndim != 1 or len(v) == 0]
        if empty:
            raise DataError(f"the splits file has empty or malformed parts ({', '.join(empty)})")
        bad = [k for k, v in parts.items() if v.min() < 0 or v.max() >= n]
        if bad:
            raise DataError(f"the splits file indexes samples outside the dataset's {n} "
                            f"({', '.join(bad)})")
        every = np.concatenate(list(parts.values()))
        if len(np.unique(every)) != len(every):
            raise DataError("the splits file puts a sample in two parts (or twice in one)")

    def save(self, path: Path) -> None:
        """Write as npz (no pickles) with the fingerprint as a string array."""
        def write(f):
            np.savez(f, fingerprint=np.array(self.fingerprint),
                     **{f.name: getattr(self, f.name) for f in fields(self)
                        if f.name != "fingerprint"})
        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> "Splits":
        """Read a split written by ``save``."""
        try:
            with np.load(regular_file(path), allow_pickle=False) as f:
                parts = {k.name: f[k.name] for k in fields(cls)}
        except (KeyError, ValueError, OSError, EOFError, TypeError, ConfigError) as e:
            raise DataError(f"{path}: not a valid splits file ({e})") from e
        if any(v.dtype.kind not in "iu" for k, v in parts.items() if k != "fingerprint"):
            raise DataError(f"{path}: not a valid splits file (indices must be integers)")
        try:
            return cls(**{k: (str(v) if k == "fingerprint" else v.astype(np.int64))
                          for k, v in parts.items()})
        except (ValueError, OverflowError) as e:
            raise DataError(f"{path}: not a valid splits file ({e})") from e


def balanced(members: np.ndarray, nonmembers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equal numbers of members and non-members (the first k of each part, which keep the
    stratified order)."""
    k = min(len(members), len(nonmembers))
    return members[:k], nonmembers[:k]


def make_splits(y: np.ndarray, fingerprint: str, seed: int) -> Splits:
    """Cut the pool into the six parts, stratified by class and reproducible from ``seed``."""
    n = len(y)
    sizes = {k: int(np.floor(f * n)) for k, f in FRACTIONS.items()}
    sizes["known_members"] += n - sum(sizes.values())  # leftovers go to training
    small = {k: v for k, v in sizes.items() if v < MIN_PART}
    if small:
        need = int(np.ceil(MIN_PART / min(FRACTIONS.values())))
        raise DataError(f"the dataset has {n} samples, too few for the membership split "
                        f"({', '.join(f'{k}={v}' for k, v in small.items())}; each part needs "
                        f"{MIN_PART}); use at least {need} samples")
    rng = np.random.default_rng(seed)
    order = stratified_order(y, rng)
    # Parts stay in the stratified order, so every prefix or suffix of a part (the attacker's
    # train/selection cut, the balanced evaluation subset) keeps the class mix. Shuffling here
    # made the 80/20 cut give anti-correlated per-class member/non-member ratios, which an
    # attacker that sees the label learns as a prior that inverts on the hold-out (AUC < 0.5).
    parts, start = {}, 0
    for k in FRACTIONS:
        parts[k] = order[start: start + sizes[k]]
        start += sizes[k]
    return Splits(fingerprint=fingerprint, **parts)
