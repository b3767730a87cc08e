"""The run directory: the one contract between stages.

Every file is written atomically (temporary file, fsync, rename), so a crash never leaves a half
file that looks whole. Nothing here unpickles: weights are safetensors, the rest JSON or npz.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
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


# The errors with which a file system refuses a write.
FS_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
             errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP,
             errno.ENOENT, errno.EIO}


def cannot_write(path: Path, e: OSError) -> ConfigError:
    """The one-line error for a file or folder the file system refuses to let us write."""
    return ConfigError(f"cannot write {path}: {e.strerror or e} (a read-only or full disk, "
                       "or a path through a file?); choose another output location")


def make_dir(path: Path) -> None:
    """``mkdir -p path``, refused with one line when the file system says no."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(path, e) from e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_leftovers(path: Path) -> None:
    """Temporary files of ``path`` left by a process that was killed while staging it (their
    names carry the writer's pid; a live writer's are left alone)."""
    for p in path.parent.glob(f".{path.name}.*"):
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (hidden, same suffix) for the caller to write and
    check; when the block ends without error it is fsynced, given the run's file mode and
    renamed over ``path``, otherwise removed, so ``path`` is never a half-written file. A file
    system error (read-only, full) raises ConfigError naming ``path``; leftovers of a writer
    killed while staging the same path are removed first."""
    path = Path(path)
    make_dir(path.parent)
    try:
        _remove_leftovers(path)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                    suffix=path.suffix)
        os.close(fd)
    except OSError as e:
        raise cannot_write(path, e) from e
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a run is meant to be shared
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in FS_ERRNOS:  # other errors (a download's) pass unchanged
            raise cannot_write(path, e) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a staged temporary file (``staged``) that replaces ``path`` only
    when complete."""
    with staged(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON. NaN and infinity are refused (they are not
    JSON, and in a report they mean a figure went wrong upstream)."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    except ValueError as e:
        raise ConfigError(f"refusing to write {path}: it would hold a NaN or infinite value "
                          f"({e}); the run's numbers went wrong upstream") from e
    data = (text + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def regular_file(path: Path) -> Path:
    """``path`` if it is a regular file (a symlink to one is fine); a folder, FIFO, device or
    socket raises ConfigError instead of being read (a FIFO would block forever)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror})") from e
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        raise ConfigError(f"{path} is {kind}, not a regular file")
    return Path(path)


def check_targets(paths: list[Path], overwrite: bool, option: str, what: str) -> None:
    """Refuse to write over ``paths`` (the files one output consists of) when one is not a
    file, or exists and ``overwrite`` is off; ``option`` names the flag that chose them and
    ``what`` the output, in the message."""
    for p in paths:  # no output lands on a file of a run's contract, --overwrite or not
        if p.name in RUN_FILES and RunDir(p.parent).is_run():
            raise ConfigError(f"{p} is a file of the run in {p.parent}, not {what}'s to "
                              f"replace; choose another {option}")
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    for p in existing:
        if not p.is_file():
            raise ConfigError(f"{p} exists and is not a file; choose another {option}")
    if existing and not overwrite:
        raise ConfigError(f"{' and '.join(map(str, existing))} already "
                          f"{'exist' if len(existing) > 1 else 'exists'}; pass --overwrite to "
                          f"replace {what} or choose another {option}")


def read_json_file(path: Path) -> dict:
    """A JSON object from a regular file; anything else (invalid UTF-8 or JSON, a list, a FIFO)
    raises ConfigError naming the file."""
    try:
        obj = json.loads(regular_file(path).read_bytes().decode("utf-8"))
    # UnicodeDecodeError and JSONDecodeError are ValueErrors; a deeply nested file is a
    # RecursionError from the decoder, raised before it allocates much
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, found a {type(obj).__name__}")
    return obj


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
        with safe_open(str(regular_file(path)), "pt") as f:
            return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is damaged or not a safetensors file ({e})") from e


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, read from its header only."""
    try:
        with safe_open(str(regular_file(path)), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is damaged or not a safetensors file ({e})") from e


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a damaged one raises ConfigError naming it."""
    try:
        return load_file(str(regular_file(path)))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is damaged or not a safetensors file ({e})") from e


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(regular_file(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# What every export manifest (the JSON `safeexport export` writes beside a file) holds, with
# its type: the one definition the exporter (which overwrites nothing but a manifest) and
# evaluate (which trusts a file only through a complete one) share.
MANIFEST_FIELDS = {"file": str, "sha256": str, "format": str, "bits": int, "scheme": str,
                   "source.run": str, "source.model_sha256": str, "input.shape": list,
                   "input.dtype": str, "parity": dict}


def manifest_missing(manifest: object) -> list[str]:
    """The ``MANIFEST_FIELDS`` that ``manifest`` lacks or holds with another type (empty: it is
    a complete export manifest)."""
    def field(key: str) -> object:
        value = manifest
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    return [k for k, kind in MANIFEST_FIELDS.items() if not isinstance(field(k), kind)]


# Every name a run directory's own files and folders have; nothing else in the folder is ours.
RUN_FILES = ("config.json", "splits.npz", "model.safetensors", "model.json",
             "attacker.safetensors", "dense.safetensors", "tokenizer.json", "history.jsonl",
             "report.json", "exposure.csv", "curve.png", "roc.png", "report.html")
RUN_FOLDERS = ("checkpoint", "exports", "evals", "references")
# what safeexport writes into the run's folders (references/ holds runs, checked as runs)
FOLDER_SUFFIXES = {"checkpoint": (".safetensors",), "exports": (".onnx", ".tflite", ".json"),
                   "evals": (".json", ".png", ".csv")}
LOCK = ".lock"


def _staging(path: Path) -> bool:
    """A file ``staged`` is writing (``.<target>.<pid>.<random><suffix>``), or a run's lock."""
    return path.name == LOCK or bool(re.fullmatch(r"\..+\.\d+\.[a-z0-9_]+(\.\w+)?", path.name))


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
    exposure_csv = property(lambda self: self.path / "exposure.csv")
    checkpoint = property(lambda self: self.path / "checkpoint" / "state.safetensors")

    lock_file = property(lambda self: self.path / LOCK)

    def is_run(self) -> bool:
        """True when the folder provably holds a safeexport run: its config.json is one that
        ``safeexport compress`` wrote (the resolved config, the data fingerprint and
        safeexport's version), not merely a file of that name."""
        if not self.config.is_file():
            return False
        try:
            rec = read_json_file(self.config)
        except ConfigError:
            return False
        return (isinstance(rec.get("config"), dict)
                and isinstance(rec.get("dataset_fingerprint"), str)
                and isinstance(rec.get("versions"), dict) and "safeexport" in rec["versions"])

    def foreign(self) -> list[str]:
        """Paths in the folder, relative to it, that are not a run's own files (sorted): at
        the top, any other name; in its folders, anything safeexport does not write there
        (a user's notes in exports/, a folder in evals/), and in references/ anything but
        reference runs (checked the same way) and their index."""
        if not self.path.is_dir():
            return []
        own = {*RUN_FILES, *RUN_FOLDERS, LOCK}
        out = [p.name for p in self.path.iterdir() if p.name not in own and not _staging(p)]
        for name, suffixes in FOLDER_SUFFIXES.items():
            folder = self.path / name
            if folder.is_dir() and not folder.is_symlink():
                out += [f"{name}/{p.name}" for p in folder.iterdir() if not _staging(p) and (
                    p.is_symlink() or not p.is_file() or p.suffix not in suffixes)]
        refs = self.path / "references"
        if refs.is_dir() and not refs.is_symlink():
            for p in refs.iterdir():
                if p.name == "index.json" or _staging(p):
                    continue
                if p.is_dir() and not p.is_symlink() and RunDir(p).is_run():
                    out += [f"references/{p.name}/{n}" for n in RunDir(p).foreign()]
                else:
                    out.append(f"references/{p.name}")
        return sorted(out)

    def read_json(self, path: Path) -> dict:
        """One of the run's JSON files as a dict; an unreadable one raises ConfigError."""
        return read_json_file(path)

    def hashed_files(self) -> list[Path]:
        """The files a later stage reads, whose sha256 the report records and ``open_run``
        checks: config, splits, architecture, weights (and a text run's tokenizer)."""
        files = [self.config, self.splits, self.model_json, self.model]
        return files + [self.tokenizer] if self.tokenizer.exists() else files

    def file_hashes(self) -> dict[str, str]:
        """name -> sha256 of every file in ``hashed_files``."""
        return {p.name: sha256_file(p) for p in self.hashed_files()}

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
        try:
            rows = [json.loads(line) for line in
                    regular_file(self.history).read_bytes().decode("utf-8").splitlines() if line]
        except (OSError, ValueError, RecursionError) as e:
            raise ConfigError(f"{self.history} is damaged ({e}); start over with "
                              "--overwrite") from e
        if not all(isinstance(r, dict) for r in rows):
            raise ConfigError(f"{self.history} is damaged (a line is not a JSON object); start "
                              "over with --overwrite")
        return rows

    def write_history(self, rows: list[dict]) -> None:
        """Rewrite history.jsonl atomically with ``rows`` (one JSON object per line)."""
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        atomic_write(self.history, lambda f: f.write(data))

    def clear(self) -> None:
        """Remove a previous run's own files from this folder. Refused unless the folder is
        provably a run and holds nothing else (a folder that also holds someone's files is
        not ours to empty). The lock file stays: the caller holds it."""
        if not self.is_run():
            raise ConfigError(f"{self.path} is not a safeexport run directory; refusing to "
                              "delete it, choose another --out")
        foreign = self.foreign()
        if foreign:
            raise ConfigError(f"{self.path} holds files that are not the run's own "
                              f"({', '.join(foreign[:5])}); refusing to replace it, move "
                              "them or choose another --out")
        try:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
            for name in RUN_FOLDERS:
                p = self.path / name
                if p.is_symlink():
                    p.unlink()
                elif p.is_dir():
                    shutil.rmtree(p)
        except OSError as e:
            raise cannot_write(self.path, e) from e

    @contextlib.contextmanager
    def lock(self, shared: bool = False, create: bool = False) -> Iterator[None]:
        """Hold the run folder's lock: exclusive for a writer (compress), shared for readers
        that add files (export, evaluate). A second writer, or a writer while someone reads,
        is refused at once with one line naming the holder. ``create`` makes the folder
        (and removes it again on failure while nothing in it can be resumed). A
        reader of a folder it cannot write (a read-only share) proceeds without the lock."""
        created = create and not self.path.exists()
        if create:
            if self.path.exists() and not self.path.is_dir():
                raise ConfigError(f"{self.path} is a file, not a folder; choose another --out")
            make_dir(self.path)
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            if shared:
                yield
                return
            raise cannot_write(self.path, e) from e
        try:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
                raise ConfigError(
                    f"{self.path} is in use by another safeexport process "
                    f"({holder or 'a reader: an export or evaluation'}); wait for it to end or "
                    "choose another --out") from None
            os.ftruncate(fd, 0)  # a holder killed by SIGKILL may have left its line behind
            if not shared:
                info = f"pid {os.getpid()} on {socket.gethostname()}, since " + time.strftime(
                    "%H:%M:%S")
                os.pwrite(fd, info.encode(), 0)
            try:
                yield
            except BaseException:
                # a folder this call made goes again when nothing in it can be resumed (no
                # checkpoint, no report) and nothing in it is anyone else's
                if created and not (self.checkpoint.exists() or self.report.exists()
                                    or self.foreign()):
                    with contextlib.suppress(OSError):
                        for p in self.path.iterdir():
                            if p.is_dir() and not p.is_symlink():
                                shutil.rmtree(p)
                            else:
                                p.unlink()
                        self.path.rmdir()
                raise
            finally:
                if not shared:
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)
