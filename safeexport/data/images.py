"""Image datasets: digits (embedded), synthetic, MNIST/Fashion-MNIST, CIFAR, Tiny-ImageNet,
and a user's own image folder."""

import gzip
import io
import os
import pickle
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from safeexport.data.base import ArrayDataset, stratified_sample
from safeexport.errors import ConfigError, DataError
from safeexport.rundir import regular_file

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
        with opener(regular_file(path), "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error, ConfigError) as e:
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
        with open(regular_file(path), "rb") as f:
            d = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    # The file is untrusted: besides the refused classes, numpy's reconstruction can be asked
    # for absurd sizes (MemoryError) or given bad arguments (TypeError, ...). Any failure
    # means "not a CIFAR batch"; nothing it names ever runs.
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a CIFAR python batch ({type(e).__name__}: "
                        f"{str(e)[:200]})") from e
    if not isinstance(d, dict) or required not in d:
        raise DataError(f"{path}: not a CIFAR python file (no {required!r} entry)")
    return d


def load_cifar_pickles(name: str, root: Path, files: list[str], label_key: str,
                       meta_file: str, names_key: str) -> ArrayDataset:
    xs, ys = [], []
    for fname in files:
        d = read_cifar_batch(root / fname)
        try:  # a ragged list (rows of different lengths) is no array at all
            data, labels = np.asarray(d["data"]), np.asarray(d.get(label_key))
        except (ValueError, TypeError) as e:
            raise DataError(f"{root / fname}: not a CIFAR batch ('data' and {label_key!r} must "
                            f"be arrays: {str(e)[:120]})") from e
        if data.dtype != np.uint8 or data.size == 0 or data.size % 3072:
            raise DataError(f"{root / fname}: 'data' must hold uint8 pixels, 3072 per image, "
                            f"got {data.dtype} of {data.size} values")
        data = data.reshape(-1, 3, 32, 32)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
            raise DataError(f"{root / fname}: {label_key!r} must list one integer label per "
                            f"image ({len(data)}), got {labels.dtype} {labels.shape}")
        xs.append(data)
        ys.append(labels)
    meta = read_cifar_batch(root / meta_file, names_key) if (root / meta_file).exists() else {}
    names = meta.get(names_key, [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{root / meta_file}: {names_key!r} must be a list of class names")
    y, num_classes = class_labels(np.concatenate(ys), str(root))
    if names and num_classes > len(names):
        raise DataError(f"{root}: a label {num_classes - 1} but only {len(names)} class names")
    return ArrayDataset(name, "image", np.concatenate(xs), y, len(names) or num_classes, names)


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

# Limits on one image: the models here take phone-sized inputs, and a file or header claiming
# more is a decompression bomb or damage, not a picture to train on.
MAX_IMAGE_BYTES = 64 << 20
MAX_IMAGE_PIXELS = 4096 * 4096


def _decode(data: bytes, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        w, h = im.size
        if w * h > MAX_IMAGE_PIXELS:
            raise DataError(f"an image of {w}x{h} pixels, more than the "
                            f"{MAX_IMAGE_PIXELS:,} allowed; resize the images first")
        im = im.convert(mode)
        if size is not None and im.size != size:
            im = im.resize(size, Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _decode_all(items: list[tuple[object, int]], read: Callable[[object], bytes],
                name: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode (source, label) pairs to uint8 N×C×H×W; the first image fixes mode and size."""
    if not items:
        raise DataError(f"{name}: no images found")
    x, mode, size = [], "RGB", None
    for src, _ in items:
        try:
            data = read(src)
            if size is None:
                with Image.open(io.BytesIO(data)) as first:
                    mode = "L" if first.mode in ("L", "1", "I;16", "I") else "RGB"
            x.append(_decode(data, mode, size))
        except DataError as e:
            raise DataError(f"{name}: {src}: {e}") from e
        except (OSError, ValueError, EOFError, zlib.error, tarfile.TarError,
                Image.DecompressionBombError) as e:
            raise DataError(f"{name}: cannot read the image {src} ({e})") from e
        if size is None:
            size = (x[0].shape[2], x[0].shape[1])
    y = np.array([label for _, label in items], dtype=np.int64)
    return np.stack(x), y


def _limit(items: list, max_samples: int | None, seed: int) -> list:
    if max_samples is None or max_samples >= len(items):
        return items
    labels = np.array([label for _, label in items])
    return [items[i] for i in stratified_sample(labels, max_samples, seed)]


def _image_file(p: Path, name: str) -> Path:
    """``p`` if it is a regular file (a symlink to one is fine) of at most MAX_IMAGE_BYTES; a
    folder, FIFO or device named like an image is refused (a FIFO or /dev/zero would never
    end)."""
    try:
        st = os.stat(p)
    except OSError as e:
        raise DataError(f"{name}: cannot read {p} ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{name}: {p} is named like an image but is not a regular file "
                        "(a folder, FIFO, device or socket); remove it")
    if st.st_size > MAX_IMAGE_BYTES:
        raise DataError(f"{name}: {p} is {st.st_size:,} bytes, more than an image here may be "
                        f"({MAX_IMAGE_BYTES:,})")
    return p


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
        (_image_file(p, name), index[c.name])
        for r in split_roots for c in sorted(r.iterdir()) if c.is_dir()
        for p in sorted(c.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    x, y = _decode_all(_limit(items, max_samples, seed), Path.read_bytes, name)
    return ArrayDataset(name, "image", x, y, len(classes), classes)


def _tar_members(tar: tarfile.TarFile, path: Path) -> list[tarfile.TarInfo]:
    """The archive's image members, refusing damage instead of reading part of it: tarfile
    ends its listing silently at a corrupt header, so whatever follows the last member must be
    the zero blocks that close an archive. Image-named entries that are not plain files, and
    sizes no image has, are refused too."""
    try:
        members = tar.getmembers()
    except tarfile.ReadError as e:  # a member's data runs past the end of the file
        last = tar.members[-1].name if tar.members else "(none)"
        raise DataError(f"{path}: damaged tar archive: truncated in or after member {last} "
                        f"({e})") from e
    last = members[-1].name if members else "(none)"
    f = tar.fileobj
    f.seek(tar.offset)
    while chunk := f.read(1 << 20):
        if chunk.strip(b"\0"):
            raise DataError(f"{path}: damaged tar archive: unreadable data after member {last} "
                            f"(byte {tar.offset:,}); only part of it could be read")
    # an uncompressed archive can be seeked past its end silently; a compressed one raises
    if isinstance(f, io.BufferedReader) and os.fstat(f.fileno()).st_size < tar.offset:
        raise DataError(f"{path}: damaged tar archive: truncated in member {last}")
    images = []
    for m in members:
        if Path(m.name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if not m.isreg() or m.issparse():
            raise DataError(f"{path}: member {m.name} is named like an image but is a "
                            f"{'sparse file' if m.issparse() else 'link, folder or device'}")
        if m.size > MAX_IMAGE_BYTES:
            raise DataError(f"{path}: member {m.name} claims {m.size:,} bytes, more than an "
                            f"image here may be ({MAX_IMAGE_BYTES:,})")
        images.append(m)
    return images


def load_image_tar(path: Path, name: str, max_samples: int | None = None,
                   seed: int = 0) -> ArrayDataset:
    """An image-folder tree inside an (uncompressed or gzip) tar, read without extracting."""
    try:
        tar = tarfile.open(regular_file(path))
    except (tarfile.TarError, OSError, EOFError, zlib.error, ConfigError) as e:
        raise DataError(f"{path}: not a readable tar archive ({e})") from e
    with tar:
        try:
            members = _tar_members(tar, path)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: damaged tar archive ({e or 'truncated'})") from e
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


def _npz_member_fits(f, key: str, path: Path) -> None:
    """Refuse a member whose header asks for more bytes than the archive says it holds (or
    than this machine has memory for) before numpy allocates it."""
    info = f.zip.getinfo(f"{key}.npy")
    shape, dtype = npz_header(f, key)
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > info.file_size or need > memory_bytes() // 2:
        raise DataError(f"{path}: array {key!r} claims shape {shape} of {dtype} ({need:,} bytes) "
                        f"but the file holds {info.file_size:,} bytes for it; the file is "
                        "damaged or not what it says")


def npz_header(f, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the member ``key`` of an open npz archive, from its header alone."""
    with f.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                  else np.lib.format.read_array_header_2_0)
        shape, _, dtype = header(member)
    return shape, dtype


def memory_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def class_labels(y: np.ndarray, where: str) -> tuple[np.ndarray, int]:
    """Integer labels as int64 and the number of classes (largest label + 1), refusing labels
    that are not class indices 0..K-1."""
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) == 0:
        raise DataError(f"{where}: labels must be a non-empty 1-D integer array, got "
                        f"{y.dtype} {y.shape}")
    lo, hi = int(y.min()), int(y.max())  # Python ints: a uint64 label does not wrap
    if lo < 0 or hi >= len(y):
        raise DataError(f"{where}: labels must be class indices 0..K-1 with K at most the "
                        f"{len(y)} samples, found {lo}..{hi}")
    return y.astype(np.int64), hi + 1


def load_npz(path: Path) -> ArrayDataset:
    """A user's arrays ``x`` and ``y`` (no pickles). Images: N×H×W, N×C×H×W or N×H×W×C with
    C in {1, 3}, uint8 or float in [0, 1]; any other 2-D array of numbers is tabular."""
    arrays = read_npz(path, ("x", "y"))
    return arrays_dataset(f"npz:{path}", arrays["x"], arrays["y"], str(path))


def read_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an npz archive, read without pickles, each checked against the
    bytes the archive holds before numpy allocates it."""
    if not path.exists():
        raise DataError(f"npz file {path} does not exist")
    hint = f"save {', '.join(keys)} with numpy.savez(path, {', '.join(f'{k}=...' for k in keys)})"
    try:
        with np.load(regular_file(path), allow_pickle=False) as f:
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: a single .npy array, not an npz archive; {hint}")
            missing = [k for k in keys if k not in f]
            if missing:
                raise DataError(f"{path}: needs arrays named {', '.join(map(repr, keys))}, "
                                f"found {list(f.keys())}")
            for key in keys:
                _npz_member_fits(f, key, path)
            return {key: f[key] for key in keys}
    except TypeError as e:  # np.load gave a bare array, which is no context manager
        raise DataError(f"{path}: a single .npy array, not an npz archive; {hint}") from e
    except (ValueError, OSError, EOFError, KeyError, ConfigError, zipfile.BadZipFile,
            MemoryError) as e:
        raise DataError(f"{path}: cannot read as npz without pickles ({e or 'empty file'})") from e


def arrays_dataset(name: str, x: np.ndarray, y: np.ndarray, where: str) -> ArrayDataset:
    """A user's arrays as a dataset, each checked: labels are class indices 0..K-1; x holds
    finite real numbers; N×D is tabular (float32), N×H×W, N×C×H×W or N×H×W×C (C in {1, 3})
    are images, uint8 or float in [0, 1] (stored as uint8). ``where`` names the source in
    messages."""
    y, num_classes = class_labels(y, where)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{where}: x holds {x.dtype} values; it must hold real numbers "
                        "(complex and string arrays are refused)")
    if len(x) != len(y):
        raise DataError(f"{where}: {len(x)} inputs but {len(y)} labels")
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise DataError(f"{where}: x must be N×D, N×H×W or N×C×H×W with no empty axis, got "
                        f"shape {x.shape}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{where}: x holds {int((~np.isfinite(x)).sum())} NaN or infinite "
                        f"values (first in sample {int(np.argwhere(~np.isfinite(x))[0][0])}); "
                        "clean or impute them first")
    if x.ndim == 2:
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: x holds values too large for float32 (|x| > 3.4e38); "
                            "rescale them first")
        return ArrayDataset(name, "tabular", x, y, num_classes)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise DataError(f"{where}: x must be N×D, N×H×W or N×C×H×W, got shape {x.shape}")
    if x.dtype != np.uint8:
        if x.dtype.kind != "f" or x.min() < 0 or x.max() > 1:
            raise DataError(f"{where}: float images must lie in [0, 1]; use uint8 for 0..255")
        x = np.round(x * 255).astype(np.uint8)
    return ArrayDataset(name, "image", np.ascontiguousarray(x), y, num_classes)
