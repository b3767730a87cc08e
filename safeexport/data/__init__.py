"""Dataset registry. ``load_dataset(name, ...)`` returns an ``ArrayDataset``.

Names: the registered ones (``digits`` is the embedded default) plus ``npz:PATH``,
``folder:PATH`` and ``torch:package.module:factory`` (a map-style torch Dataset) for a user's
own data.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from safeexport import names
from safeexport.data.base import ArrayDataset, stratified_sample, to_tensor
from safeexport.data.download import Resource, fetch
from safeexport.data.images import (
    arrays_dataset,
    load_cifar,
    load_digits_dataset,
    load_idx_dataset,
    load_image_folder,
    load_image_tar,
    load_npz,
    load_tinyimagenet,
    make_synthetic,
    memory_bytes,
    npz_header,
)
from safeexport.data.tabular import load_purchase100, load_texas100, make_purchase_like
from safeexport.data.text import AGNEWS_CLASSES, load_text_csv
from safeexport.errors import DataError
from safeexport.registry import Registry

__all__ = ["ArrayDataset", "DATASETS", "DatasetInfo", "load_dataset", "stratified_sample",
           "to_tensor", "dataset_names"]

Loader = Callable[[Path, int | None, int], ArrayDataset]


@dataclass(frozen=True)
class DatasetInfo:
    """How to load one dataset: ``load(data_dir, max_samples, seed)``, its kind, and the public
    files ``--download`` may fetch (empty when none is published with a checksum)."""

    load: Loader
    kind: str
    description: str
    resources: tuple[Resource, ...] = field(default=())
    download_subdir: str = ""


DATASETS: Registry[DatasetInfo] = Registry("dataset")

_FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
            "Bag", "Ankle boot"]
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
_MNIST_MD5 = ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
              "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c")
_FASHION_MD5 = ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310")
_DL_HINT = "pass --data-dir DIR pointing at them, or --download to fetch them"

DATASETS.register("digits", DatasetInfo(
    lambda d, m, s: load_digits_dataset(), "image",
    "scikit-learn's bundled handwritten digits, 1,797 8x8 images, 10 classes (no download)"))
DATASETS.register("synthetic", DatasetInfo(
    lambda d, m, s: make_synthetic(n=m or 600, seed=s), "image",
    "class prototypes plus noise, 8x8, 4 classes (for tests)"))
DATASETS.register("fashionmnist", DatasetInfo(
    lambda d, m, s: load_idx_dataset("fashionmnist", "FashionMNIST", d, _FASHION, _DL_HINT),
    "image", "Fashion-MNIST idx files, 70,000 28x28 grayscale, 10 classes",
    tuple(Resource(_FASHION_URL + f, f, md5) for f, md5 in zip(_IDX_FILES, _FASHION_MD5,
                                                               strict=True)),
    "FashionMNIST/raw"))
DATASETS.register("mnist", DatasetInfo(
    lambda d, m, s: load_idx_dataset("mnist", "MNIST", d, [str(i) for i in range(10)], _DL_HINT),
    "image", "MNIST idx files, 70,000 28x28 grayscale, 10 classes",
    tuple(Resource(_MNIST_URL + f, f, md5) for f, md5 in zip(_IDX_FILES, _MNIST_MD5,
                                                             strict=True)),
    "MNIST/raw"))
DATASETS.register("cifar10", DatasetInfo(
    lambda d, m, s: load_cifar("cifar10", d, m, s), "image",
    "CIFAR-10: python batches, train/<class>/ test/<class>/ folders, or cifar10-jpg.tar",
    (Resource("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
              "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", extract=True),)))
DATASETS.register("cifar100", DatasetInfo(
    lambda d, m, s: load_cifar("cifar100", d, m, s), "image",
    "CIFAR-100: python batches or train/<class>/ test/<class>/ folders",
    (Resource("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
              "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", extract=True),)))
DATASETS.register("tinyimagenet", DatasetInfo(
    load_tinyimagenet, "image", "Tiny-ImageNet-200 in its own folder layout, 64x64, 200 classes"))
DATASETS.register("purchase100", DatasetInfo(
    lambda d, m, s: load_purchase100(d), "tabular",
    "Purchase100 (dataset_purchase): 600 binary features, 100 classes"))
DATASETS.register("texas100", DatasetInfo(
    lambda d, m, s: load_texas100(d), "tabular",
    "Texas100 (texas/100/feats, labels): 6,169 binary features, 100 classes"))
DATASETS.register("purchase-like", DatasetInfo(
    lambda d, m, s: make_purchase_like(), "tabular",
    "a seeded Purchase-like stand-in (no download): 5,000 records, 600 binary features, "
    "40 classes; its dense MLP overfits and leaks (for tests and benchmarks)"))
DATASETS.register("agnews", DatasetInfo(
    lambda d, m, s: load_text_csv("agnews", d, ["ag_news_csv", "ag_news"], 4, AGNEWS_CLASSES,
                                  "get ag_news_csv (train.csv, test.csv) and pass --data-dir"),
    "text", "AG News CSV (class, title, description), 4 classes"))
DATASETS.register("yelp5", DatasetInfo(
    lambda d, m, s: load_text_csv("yelp5", d, ["yelp_review_full_csv", "yelp5"], 5,
                                  [f"{i} stars" for i in range(1, 6)],
                                  "get yelp_review_full_csv (train.csv, test.csv), "
                                  "pass --data-dir"),
    "text", "Yelp review full CSV (class, text), 5 classes"))
DATASETS.check(names.DATASETS)


def dataset_names() -> list[str]:
    """Registered names plus the patterns for a user's own data."""
    return DATASETS.names() + ["npz:PATH", "folder:PATH", "torch:package.module:factory"]


def load_torch_dataset(ref: str) -> ArrayDataset:
    """``factory()`` from ``package.module:factory``: a map-style torch Dataset (``len`` and
    ``[i]``) of ``(x, y)`` pairs, x an image (C×H×W or H×W, uint8 or float in [0, 1]) or a
    feature vector, y a class index. Read once into arrays (every stage works on the whole
    set in memory) and checked as an npz's arrays are."""
    from safeexport.plugins import import_object, user_code

    where = f"torch:{ref}"
    factory = import_object(ref, "Dataset factory")
    try:
        with user_code(f"Dataset factory {ref}", DataError):
            dataset = factory()
            n = len(dataset)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code; its error is the message
        raise DataError(f"{where}: the factory did not give a map-style Dataset with a "
                        f"length ({type(e).__name__}: {e})") from e
    if n < 1:
        raise DataError(f"{where}: the Dataset is empty")
    xs, ys = [], []
    for i in range(n):
        try:
            with user_code(f"the Dataset of {ref} (item {i})", DataError):
                item = dataset[i]
            x, y = item
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's code; its error is the message
            raise DataError(f"{where}: item {i} is not an (x, y) pair "
                            f"({type(e).__name__}: {e})") from e
        x = _item_array(x, f"{where}: item {i}'s input")
        if i == 0 and x.nbytes * n > memory_bytes() // 2:
            raise DataError(f"{where}: {n:,} items of {x.nbytes:,} bytes do not fit in "
                            "half of this machine's memory")
        if xs and x.shape != xs[0].shape:
            raise DataError(f"{where}: item {i} has shape {x.shape}, item 0 {xs[0].shape}; "
                            "every input must have the same shape")
        y = _item_array(y, f"{where}: item {i}'s label")
        if y.ndim != 0:
            raise DataError(f"{where}: item {i}'s label has shape {y.shape}; a label is one "
                            "class index")
        xs.append(x)
        ys.append(y)
    return arrays_dataset(where, np.stack(xs), np.stack(ys), where)


def _item_array(value, what: str) -> np.ndarray:
    """A Dataset item's input or label as a numpy array. A tensor is detached (a Dataset may
    hand out tensors that require grad) and bfloat16 widened to float32 (numpy has no
    bfloat16); anything that is not a rectangular array (ragged lists, a sparse tensor)
    raises DataError naming ``what``. Its values are checked with the whole array's
    (``arrays_dataset``)."""
    try:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
        return np.asarray(value)
    except (ValueError, TypeError, RuntimeError) as e:  # ragged lists, sparse tensors
        raise DataError(f"{what} is not a rectangular array "
                        f"({str(e).splitlines()[0]})") from e


def dataset_kind(name: str) -> str | None:
    """The kind of data (image, tabular, text) ``name`` holds, found without loading it (an
    npz's from its header); None when that cannot be told cheaply (loading will then say
    what is wrong)."""
    if name.startswith("folder:"):
        return "image"
    if name.startswith("torch:"):
        return None
    if name.startswith("npz:"):
        try:
            with np.load(Path(name[4:]), allow_pickle=False) as f:
                shape, _ = npz_header(f, "x")
        except Exception:  # noqa: BLE001 - any unreadable file: the loader reports it
            return None
        return "tabular" if len(shape) == 2 else "image"
    return DATASETS.get(name).kind if name in DATASETS else None


def load_dataset(name: str, data_dir: Path | None = None, download: bool = False,
                 max_samples: int | None = None, seed: int = 0) -> ArrayDataset:
    """Load a dataset by name; ``max_samples`` keeps a class-stratified subset of the pool."""
    if name.startswith("npz:"):
        ds = load_npz(Path(name[4:]))
    elif name.startswith("torch:"):
        ds = load_torch_dataset(name[6:])
    elif name.startswith("folder:"):
        path = Path(name[7:])
        ds = (load_image_tar(path, name, max_samples, seed) if path.is_file()
              else load_image_folder(path, name, max_samples, seed))
    else:
        info = DATASETS.get(name)
        data_dir = Path(data_dir) if data_dir is not None else Path("data")
        if download:
            if not info.resources:
                raise DataError(f"{name} has no download with a published checksum; "
                                f"place its files in --data-dir by hand")
            for res in info.resources:
                fetch(res, data_dir / info.download_subdir)
        ds = info.load(data_dir, max_samples, seed)
    if max_samples is not None:
        ds = ds.subset(max_samples, seed)
    return ds
