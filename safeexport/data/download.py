"""Fetching public datasets with checksum verification (``--download``)."""

import hashlib
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from safeexport.errors import DataError
from safeexport.rundir import atomic_write


@dataclass(frozen=True)
class Resource:
    """One file to fetch: where from, its name on disk, and its published md5."""

    url: str
    filename: str
    md5: str
    extract: bool = False


def file_md5(path: Path) -> str:
    """md5 of a file, read in chunks (md5 because that is what the dataset authors publish)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(resource: Resource, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``resource`` into ``dest`` unless a verified copy is there; extract archives.

    The bytes go to a temporary file that is renamed only once their md5 matches, so an
    interrupted or tampered download never leaves a file that looks valid.
    """
    target = dest / resource.filename

    def download(out) -> None:
        h = hashlib.md5(usedforsecurity=False)
        with urllib.request.urlopen(resource.url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=resource.filename,
                      disable=None) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
        if h.hexdigest() != resource.md5:
            raise DataError(
                f"checksum mismatch for {resource.url}: md5 {h.hexdigest()}, expected "
                f"{resource.md5}; the download is corrupt or was altered, nothing was kept")

    if not (target.exists() and file_md5(target) == resource.md5):
        try:
            atomic_write(target, download)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(f"could not download {resource.url}: {e}; check the network or "
                            f"place {resource.filename} in {dest} by hand") from e
    if resource.extract:
        with tarfile.open(target) as tar:
            tar.extractall(dest, filter="data")
    return target

