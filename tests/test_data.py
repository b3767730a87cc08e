import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from safeexport.data import DATASETS, DatasetInfo, load_dataset
from safeexport.data.base import to_tensor
from safeexport.data.download import Resource, fetch
from safeexport.data.images import read_cifar_batch
from safeexport.data.splits import Splits, make_splits
from safeexport.errors import ConfigError, DataError


def test_digits_is_embedded_and_real():
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.uint8 and ds.num_classes == 10
    assert ds.x.max() == 255 and len(set(ds.y.tolist())) == 10
    x = to_tensor(ds.x[:3])
    assert x.dtype.is_floating_point and float(x.max()) <= 1.0


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ConfigError, match="known: digits, synthetic"):
        load_dataset("imagenet22k")


def test_max_samples_is_stratified_and_seeded():
    a = load_dataset("digits", max_samples=500, seed=1)
    b = load_dataset("digits", max_samples=500, seed=1)
    assert len(a) == 500 and np.array_equal(a.x, b.x)
    counts = np.bincount(a.y, minlength=10)
    assert counts.min() >= 48 and counts.max() <= 52


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


@pytest.mark.parametrize("compressed", [True, False])
def test_idx_files_gz_or_not(tmp_path, compressed):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        for part, arr in (("images-idx3", rng.integers(0, 255, (n, 28, 28))),
                          ("labels-idx1", np.arange(n) % 10)):
            name = f"{split}-{part}-ubyte"
            if compressed:
                (raw / f"{name}.gz").write_bytes(gzip.compress(_idx(arr)))
            else:
                (raw / name).write_bytes(_idx(arr))
    ds = load_dataset("fashionmnist", data_dir=tmp_path)
    assert ds.x.shape == (40, 1, 28, 28) and ds.class_names[9] == "Ankle boot"


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.*--download"):
        load_dataset("mnist", data_dir=tmp_path)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(DataError, match="dataset_purchase"):
        load_dataset("purchase100", data_dir=tmp_path)
    with pytest.raises(DataError, match="train.csv"):
        load_dataset("agnews", data_dir=tmp_path)
    with pytest.raises(DataError, match="wnids.txt"):
        load_dataset("tinyimagenet", data_dir=tmp_path)


def test_cifar_pickles_load_and_code_in_a_pickle_is_refused(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8),
                 "labels": [0, 1, 2, 9]}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in
                                                                      range(10)]}))
    ds = load_dataset("cifar10", data_dir=tmp_path)
    assert ds.x.shape == (24, 3, 32, 32) and ds.num_classes == 10

    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (root / "data_batch_1").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load"):
        read_cifar_batch(root / "data_batch_1")
    assert not (tmp_path / "pwned").exists()


def _png(color, size=(6, 6), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_and_tar_layouts(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                # different sizes are resized to the first image's size
                (d / f"{i}.png").write_bytes(_png(color, (6 + i, 6)))
    ds = load_dataset(f"folder:{root}")
    assert ds.x.shape == (12, 3, 6, 6) and ds.class_names == ["cat", "dog"]
    assert ds.x[ds.y == 0][:, 0].min() == 255  # cats are red
    tar_path = tmp_path / "imgs.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(root, arcname="imgs")
    from_tar = load_dataset(f"folder:{tar_path}")
    assert from_tar.x.shape == ds.x.shape and from_tar.class_names == ds.class_names


def test_npz_user_data_without_pickles(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.random.default_rng(0).random((50, 5, 5, 3)), y=np.arange(50) % 5)
    ds = load_dataset(f"npz:{p}")
    assert ds.kind == "image" and ds.x.shape == (50, 3, 5, 5)
    np.savez(p, x=np.zeros((50, 7), np.float32), y=np.arange(50) % 2)
    assert load_dataset(f"npz:{p}").kind == "tabular"
    np.savez(p, x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(DataError, match="pickles"):
        load_dataset(f"npz:{p}")
    np.savez(p, x=np.zeros((3, 2)), y=np.array([0.5, 1, 2]))
    with pytest.raises(DataError, match="integer"):
        load_dataset(f"npz:{p}")


def test_tabular_and_text_files(tmp_path):
    rows = [",".join([str(i % 100 + 1)] + ["1" if (i + j) % 7 == 0 else "0" for j in range(600)])
            for i in range(20)]
    (tmp_path / "dataset_purchase").write_text("\n".join(rows))
    ds = load_dataset("purchase100", data_dir=tmp_path)
    assert ds.x.shape == (20, 600) and ds.y.max() == 19
    tex = tmp_path / "texas" / "100"
    tex.mkdir(parents=True)
    (tex / "feats").write_text("\n".join(",".join("01"[(i + j) % 2] for j in range(12))
                                         for i in range(6)))
    (tex / "labels").write_text("\n".join(str(i + 1) for i in range(6)))
    assert load_dataset("texas100", data_dir=tmp_path).x.shape == (6, 12)
    ag = tmp_path / "ag_news"
    ag.mkdir()
    (ag / "test.csv").write_text('"3","Wall St. Bears","Short-sellers, \\\\band"\n'
                                 '"4","New chip","Faster CPUs"\n')
    ds = load_dataset("agnews", data_dir=tmp_path)
    assert ds.kind == "text" and ds.y.tolist() == [2, 3] and "Short-sellers" in ds.x[0]
    (ag / "test.csv").write_text('"7","bad class","x"\n')
    with pytest.raises(DataError, match="class 1..4"):
        load_dataset("agnews", data_dir=tmp_path)


def test_splits_disjoint_complete_stratified_reproducible(tmp_path):
    ds = load_dataset("digits")
    s = make_splits(ds.y, ds.fingerprint(), seed=3)
    parts = [s.known_members, s.unknown_members, s.known_nonmembers, s.unknown_nonmembers,
             s.validation, s.test]
    allidx = np.concatenate(parts)
    assert len(allidx) == len(ds) == len(set(allidx.tolist()))
    for p in parts:
        frac = np.bincount(ds.y[p], minlength=10) / len(p)
        assert np.abs(frac - np.bincount(ds.y) / len(ds)).max() < 0.03
    tm, tn = s.attack_train()
    sm, sn = s.attack_select()
    # members and non-members of each attack set share the class mix, so an attacker that
    # sees the label cannot learn a per-class membership prior that inverts on the hold-out
    for m, n in ((tm, tn), (sm, sn), (s.unknown_members[:len(s.unknown_nonmembers)],
                                      s.unknown_nonmembers)):
        fm, fn = (np.bincount(ds.y[i], minlength=10) / len(i) for i in (m, n))
        assert np.abs(fm - fn).max() < 1.5 / len(n) + 1e-9
    assert not set(sm.tolist()) & set(tm.tolist()) and not set(sn.tolist()) & set(tn.tolist())
    assert set(np.r_[tm, sm].tolist()) == set(s.known_members.tolist())
    again = make_splits(ds.y, ds.fingerprint(), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, [again.known_members,
               again.unknown_members, again.known_nonmembers, again.unknown_nonmembers,
               again.validation, again.test], strict=True))
    other = make_splits(ds.y, ds.fingerprint(), seed=4)
    assert not np.array_equal(other.test, s.test)
    s.save(tmp_path / "splits.npz")
    loaded = Splits.load(tmp_path / "splits.npz")
    assert loaded.fingerprint == s.fingerprint and np.array_equal(loaded.test, s.test)


def test_too_small_for_the_split():
    with pytest.raises(DataError, match="too few for the membership split.*at least 160"):
        make_splits(np.arange(100) % 4, "fp", 0)


def test_fingerprint_changes_with_data():
    ds = load_dataset("digits")
    fp = ds.fingerprint()
    ds.x = ds.x.copy()
    ds.x[0, 0, 0, 0] ^= 1
    assert ds.fingerprint() != fp


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www (no test reaches the internet)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = lambda *a, **k: _Quiet(*a, directory=str(www), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    thread.join(timeout=5)


def test_download_verifies_checksum_and_extracts(local_server, tmp_path):
    www, url = local_server
    src = tmp_path / "src" / "FashionMNIST" / "raw"
    src.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 20)):
        (src / f"{split}-images-idx3-ubyte").write_bytes(_idx(rng.integers(0, 255, (n, 28, 28))))
        (src / f"{split}-labels-idx1-ubyte").write_bytes(_idx(np.arange(n) % 10))
    with tarfile.open(www / "small.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "src" / "FashionMNIST", arcname="FashionMNIST")
    md5 = hashlib.md5((www / "small.tar.gz").read_bytes()).hexdigest()
    data_dir = tmp_path / "data"
    DATASETS.register("test-archive", DatasetInfo(
        DATASETS.get("fashionmnist").load, "image", "test",
        (Resource(url + "small.tar.gz", "small.tar.gz", md5, extract=True),)))
    try:
        ds = load_dataset("test-archive", data_dir=data_dir, download=True)
        assert len(ds) == 40
        # a tampered file is refused and nothing is kept
        bad = Resource(url + "small.tar.gz", "other.tar.gz", "0" * 32)
        with pytest.raises(DataError, match="checksum mismatch"):
            fetch(bad, data_dir)
        assert not (data_dir / "other.tar.gz").exists()
        assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]
        with pytest.raises(DataError, match="could not download"):
            fetch(Resource(url + "missing.gz", "m.gz", md5), data_dir)
    finally:
        DATASETS._items.pop("test-archive")


def test_download_refused_for_datasets_without_published_checksum(tmp_path):
    with pytest.raises(DataError, match="no download with a published checksum"):
        load_dataset("purchase100", data_dir=tmp_path, download=True)


def _window(img, dy: int, dx: int, size: int, mirrored: bool):
    crop = img[:, dy:dy + size, dx:dx + size]
    return crop.flip(2) if mirrored else crop


def test_crop_flip_shifts_and_mirrors_each_image_within_the_padding():
    import torch

    from safeexport.data.augment import PAD, crop_flip

    torch.manual_seed(0)
    x = torch.rand(64, 3, 6, 6)
    out = crop_flip(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (PAD,) * 4)
    flips = 0
    for img, src in zip(out, padded, strict=True):
        found = [(dy, dx, f) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)
                 for f in (False, True)
                 if torch.equal(img, _window(src, dy, dx, 6, f))]
        assert found, "an output image is no crop of its padded input, nor its mirror"
        flips += all(f for *_, f in found)
    assert 16 < flips < 48  # about half mirrored
    assert not torch.equal(out, x)


def test_augment_auto_is_for_natural_images_and_refused_on_tables():
    from safeexport.data.augment import resolve_augment

    assert resolve_augment("auto", "cifar10", "image") == "crop-flip"
    assert resolve_augment("auto", "digits", "image") == "none"
    assert resolve_augment("crop-flip", "digits", "image") == "crop-flip"
    with pytest.raises(ConfigError, match="needs images"):
        resolve_augment("crop-flip", "purchase100", "tabular")
