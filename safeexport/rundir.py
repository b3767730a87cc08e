"""The run directory: the one contract between stages.

Every file is written atomically (temporary file, fsync, rename), so a crash never leaves a half
file that looks whole. Nothing here unpickles: weights are safetensors, the rest JSON or npz.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from safeexport.errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a run is meant to be shared
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


METADATA_KEY = "safeexport"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor],
                 metadata: dict | None = None) -> None:
    """Atomically write tensors (made contiguous, on CPU) as safetensors, with ``metadata`` as
    one sorted JSON string: safetensors writes a metadata map in hash order, so several keys
    would make the same content different bytes (and a different sha256) from run to run."""
    meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True)} if metadata else None
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, meta)
    atomic_write(path, lambda f: f.write(data))


def load_metadata(path: Path) -> dict:
    """The metadata ``save_tensors`` wrote ({} when there is none)."""
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is damaged or not a safetensors file ({e})") from e


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a damaged one raises ConfigError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is damaged or not a safetensors file ({e})") from e


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunDir:
    """Paths and readers/writers of one run directory ``runs/<name>/``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    splits = property(lambda self: self.path / "splits.npz")
    model = property(lambda self: self.path / "model.safetensors")
    model_json = property(lambda self: self.path / "model.json")
    attacker = property(lambda self: self.path / "attacker.safetensors")
    dense_model = property(lambda self: self.path / "dense.safetensors")
    tokenizer = property(lambda self: self.path / "tokenizer.json")
    history = property(lambda self: self.path / "history.jsonl")
    report = property(lambda self: self.path / "report.json")
    curve_png = property(lambda self: self.path / "curve.png")
    roc_png = property(lambda self: self.path / "roc.png")
    checkpoint = property(lambda self: self.path / "checkpoint" / "state.safetensors")

    def is_run(self) -> bool:
        """True when the folder holds a safeexport run (it has a config.json)."""
        return self.config.exists()

    def read_json(self, path: Path) -> dict:
        """One of the run's JSON files as a dict; an unreadable one raises ConfigError."""
        try:
            return json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read it ({e})") from e

    def read_config(self) -> dict:
        """The run's config.json as a dict."""
        return self.read_json(self.config)

    def read_report(self) -> dict:
        """The run's report.json as a dict."""
        return self.read_json(self.report)

    def read_history(self) -> list[dict]:
        """Every line of history.jsonl (empty when there is none yet)."""
        if not self.history.exists():
            return []
        return [json.loads(line) for line in self.history.read_text().splitlines() if line]

    def write_history(self, rows: list[dict]) -> None:
        """Rewrite history.jsonl atomically with ``rows`` (one JSON object per line)."""
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(self.history, lambda f: f.write(data))

    def clear(self) -> None:
        """Remove a previous run from this folder (only if it is a run directory)."""
        if not self.is_run():
            raise ConfigError(f"{self.path} is not a safeexport run directory; refusing to "
                              "delete it, choose another --out")
        shutil.rmtree(self.path)
