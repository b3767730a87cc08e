"""Image datasets: digits (embedded), synthetic, MNIST/Fashion-MNIST, CIFAR, Tiny-ImageNet,
and a user's own image folder."""

import gzip
import io
import pickle
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from safeexport.data.base import ArrayDataset, stratified_sample
from safeexport.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_digits_dataset() -> ArrayDataset:
    """scikit-learn's bundled handwritten digits: 1,797 real 8×8 images, no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ArrayDataset("digits", "image", x, d.target, 10, [str(i) for i in range(10)])


def make_synthetic(n: int = 600, num_classes: int = 4, size: int = 8, channels: int = 1,
                   seed: int = 0, noise: float = 0.35) -> ArrayDataset:
    """Class prototypes plus pixel noise: learnable, and small enough to overfit (tests)."""
    rng = np.random.default_rng(seed)
    protos = rng.random((num_classes, channels, size, size))
    y = np.arange(n) % num_classes
    rng.shuffle(y)
    x = protos[y] + noise * rng.standard_normal((n, channels, size, size))
    x = np.clip(x, 0.0, 1.0)
    return ArrayDataset("synthetic", "image", np.round(x * 255).astype(np.uint8), y,
                        num_classes, [f"class{i}" for i in range(num_classes)])


# ---------------------------------------------------------------- idx files (MNIST family)

def read_idx(path: Path) -> np.ndarray:
    """Read an idx-ubyte file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read idx file ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {tuple(dims)} but holds {body.size} bytes")
    return body.reshape(dims)


def find_file(candidates: Iterable[Path], what: str, hint: str) -> Path:
    """The first existing path among ``candidates`` or a DataError naming where it was expected."""
    candidates = list(candidates)
    for p in candidates:
        if p.exists():
            return p
    shown = " or ".join(str(p) for p in candidates[:4])
    raise DataError(f"{what} not found: expected {shown}; {hint}")


def load_idx_dataset(name: str, folder: str, data_dir: Path, class_names: list[str],
                     hint: str) -> ArrayDataset:
    """MNIST-layout idx files in ``data_dir/<folder>/raw`` (torchvision's layout) or
    ``data_dir``."""
    roots = [data_dir / folder / "raw", data_dir / folder, data_dir]
    xs, ys = [], []
    for split in ("train", "t10k"):
        arrays = []
        for part in ("images-idx3", "labels-idx1"):
            stem = f"{split}-{part}-ubyte"
            cands = [r / f"{stem}{ext}" for r in roots for ext in (".gz", "")]
            arrays.append(read_idx(find_file(cands, f"{name} file {stem}", hint)))
        images, labels = arrays
        if len(images) != len(labels):
            raise DataError(f"{name} {split}: {len(images)} images but {len(labels)} labels")
        xs.append(images[:, None])
        ys.append(labels)
    return ArrayDataset(name, "image", np.concatenate(xs), np.concatenate(ys), 10, class_names)


# ---------------------------------------------------------------- CIFAR

class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing else.

    CIFAR's python version is a pickle; a general unpickler would run any code a tampered file
    names, so only numpy's array reconstruction is allowed.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def read_cifar_batch(path: Path, required: str = "data") -> dict:
    """One CIFAR python file (a batch, or the meta file) as a dict holding ``required``."""
    try:
        with open(path, "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR python batch ({e})") from e
    if not isinstance(d, dict) or required not in d:
        raise DataError(f"{path}: not a CIFAR python file (no {required!r} entry)")
    return d


def load_cifar_pickles(name: str, root: Path, files: list[str], label_key: str,
                       meta_file: str, names_key: str) -> ArrayDataset:
    xs, ys = [], []
    for fname in files:
        d = read_cifar_batch(root / fname)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    meta = read_cifar_batch(root / meta_file, names_key) if (root / meta_file).exists() else {}
    names = list(meta.get(names_key, []))
    num_classes = int(max(int(y.max()) for y in ys) + 1) if not names else len(names)
    return ArrayDataset(name, "image", np.concatenate(xs), np.concatenate(ys), num_classes, names)


def load_cifar(name: str, data_dir: Path, max_samples: int | None, seed: int) -> ArrayDataset:
    """CIFAR-10/100 from the python batches, an image-folder tree, or the image-folder tar."""
    if name == "cifar10":
        folder, files = "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)]
        files += ["test_batch"]
        label_key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        folder, files = "cifar-100-python", ["train", "test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    for root in (data_dir / folder, data_dir):
        if all((root / f).exists() for f in files):
            return load_cifar_pickles(name, root, files, label_key, meta_file, names_key)
    for root in (data_dir / f"{name}-jpg", data_dir / name, data_dir):
        if (root / "train").is_dir():
            return load_image_folder(root, name, max_samples, seed)
    tar = data_dir / f"{name}-jpg.tar"
    if tar.exists():
        return load_image_tar(tar, name, max_samples, seed)
    raise DataError(
        f"{name} not found in {data_dir}: expected {folder}/ (the python batches), "
        f"train/<class>/ and test/<class>/ image folders, or {name}-jpg.tar; "
        f"pass --data-dir DIR or --download"
    )


# ---------------------------------------------------------------- image folders

def _decode(data: bytes, mode: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert(mode)
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_all(items: list[tuple[object, int]], read: Callable[[object], bytes],
                name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode (source, label) pairs to uint8 N×C×H×W; the first image fixes mode and size."""
    if not items:
        raise DataError(f"{name}: no images found")
    try:
        with Image.open(io.BytesIO(read(items[0][0]))) as first:
            mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
            size = first.size
        x = np.stack([_decode(read(src), mode, size) for src, _ in items])
    except (OSError, ValueError) as e:
        raise DataError(f"{name}: cannot decode an image ({e})") from e
    y = np.array([label for _, label in items], dtype=np.int64)
    return x, y


def _limit(items: list, max_samples: int | None, seed: int) -> list:
    if max_samples is None or max_samples >= len(items):
        return items
    labels = np.array([label for _, label in items])
    return [items[i] for i in stratified_sample(labels, max_samples, seed)]


def load_image_folder(root: Path, name: str, max_samples: int | None = None,
                      seed: int = 0) -> ArrayDataset:
    """``root/<class>/*`` or ``root/{train,test}/<class>/*``; classes in alphabetical order.

    Every image is converted to the first image's mode (grayscale or RGB) and size.
    """
    if not root.is_dir():
        raise DataError(f"{name}: folder {root} does not exist")
    split_roots = [root / s for s in ("train", "test") if (root / s).is_dir()] or [root]
    classes = sorted({p.name for r in split_roots for p in r.iterdir() if p.is_dir()})
    if not classes:
        raise DataError(f"{name}: no class folders in {root} (expected {root}/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    items = [
        (p, index[c.name])
        for r in split_roots for c in sorted(r.iterdir()) if c.is_dir()
        for p in sorted(c.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    x, y = _decode_all(_limit(items, max_samples, seed), Path.read_bytes, name)
    return ArrayDataset(name, "image", x, y, len(classes), classes)


def load_image_tar(path: Path, name: str, max_samples: int | None = None,
                   seed: int = 0) -> ArrayDataset:
    """An image-folder tree inside an (uncompressed or gzip) tar, read without extracting."""
    try:
        tar = tarfile.open(path)
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from e
    with tar:
        members = [m for m in tar.getmembers()
                   if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES]
        parts = [Path(m.name).parts for m in members]
        # The class is the folder right above the image: .../<split>/<class>/<image>.
        classes = sorted({p[-2] for p in parts if len(p) >= 2})
        if not classes:
            raise DataError(f"{path}: no <class>/<image> entries inside")
        index = {c: i for i, c in enumerate(classes)}
        items = sorted(((m.name, index[p[-2]]) for m, p in zip(members, parts, strict=True)
                        if len(p) >= 2), key=lambda t: t[0])
        items = _limit(items, max_samples, seed)
        x, y = _decode_all(items, lambda n: tar.extractfile(n).read(), name)
    return ArrayDataset(name, "image", x, y, len(classes), classes)


def load_tinyimagenet(data_dir: Path, max_samples: int | None, seed: int) -> ArrayDataset:
    """Tiny-ImageNet's own layout: train/<wnid>/images/*.JPEG and val/val_annotations.txt."""
    root = data_dir / "tiny-imagenet-200" if (data_dir / "tiny-imagenet-200").is_dir() else data_dir
    wnids_file = root / "wnids.txt"
    if not wnids_file.exists() or not (root / "train").is_dir():
        raise DataError(f"tinyimagenet not found: expected {root}/wnids.txt and {root}/train/; "
                        "get tiny-imagenet-200.zip from the CS231n site, unzip it into "
                        "--data-dir, or pass --download")
    wnids = wnids_file.read_text().split()
    index = {w: i for i, w in enumerate(wnids)}
    items = [(p, index[w]) for w in wnids
             for p in sorted((root / "train" / w / "images").glob("*.JPEG"))]
    ann = root / "val" / "val_annotations.txt"
    if ann.exists():
        for line in ann.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[1] in index:
                items.append((root / "val" / "images" / fields[0], index[fields[1]]))
    x, y = _decode_all(_limit(items, max_samples, seed), Path.read_bytes, "tinyimagenet")
    return ArrayDataset("tinyimagenet", "image", x, y, len(wnids), wnids)


def load_npz(path: Path) -> ArrayDataset:
    """A user's arrays ``x`` and ``y`` (no pickles). Images: N×H×W, N×C×H×W or N×H×W×C with
    C in {1, 3}, uint8 or float in [0, 1]; any other 2-D array is tabular."""
    if not path.exists():
        raise DataError(f"npz file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path}: needs arrays named 'x' and 'y', found {list(f.keys())}")
            x, y = f["x"], f["y"]
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read as npz without pickles ({e})") from e
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{path}: y must be a 1-D integer array, got {y.dtype} {y.shape}")
    if x.ndim == 2:
        return ArrayDataset(f"npz:{path}", "tabular", x.astype(np.float32), y,
                            int(y.max()) + 1)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"{path}: x must be N×D, N×H×W or N×C×H×W, got shape {x.shape}")
    if x.dtype != np.uint8:
        if x.dtype.kind != "f" or x.min() < 0 or x.max() > 1:
            raise DataError(f"{path}: float images must lie in [0, 1]; use uint8 for 0..255")
        x = np.round(x * 255).astype(np.uint8)
    return ArrayDataset(f"npz:{path}", "image", np.ascontiguousarray(x), y, int(y.max()) + 1)
