"""Bad inputs and faults, as a careless or hostile user would bring them: each gets one line
starting "error:" and exit status 2, destroys nothing already written, and is never reported as
a result. Inputs are generated here; the commands run in-process (click's runner) so the whole
file takes seconds."""

import errno
import io
import json
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from compressor import compress
from safeexport.errors import ConfigError, TrainingError
from safeexport.rundir import RunDir, sha256_file, write_json
from tests.conftest import cli, closed_port, one_error_line, tiny_config

TINY = ["--dataset", "synthetic", "--max-samples", "400", "--sparsity", "0.2", "--epochs", "1",
        "--update-frequency", "3", "--batch-size", "32", "--finetune-iters", "1",
        "--attack-epochs", "1", "--attack-finetune-epochs", "1", "--final-attack-epochs", "1",
        "--device", "cpu", "--no-dense-reference", "--no-progress"]
TINY_DATA = [a for a in TINY[2:]]  # the same without --dataset synthetic


def refused(pattern: str, *args) -> str:
    """Assert the command is refused with exactly one "error:" line matching ``pattern``."""
    return one_error_line(cli(*args), pattern)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> Path:
    """A finished tiny run with a float ONNX export."""
    from exporters import export
    from exporters.config import ExportConfig

    root = tmp_path_factory.mktemp("bad-inputs")
    path = compress(tiny_config(epochs=1, update_frequency=5, dense_reference=False,
                                finetune_iters=1), root / "run").path
    export(ExportConfig(format="onnx", bits=32, parity_samples=32), path)
    return path


@pytest.fixture
def copy(done, tmp_path) -> Path:
    """A private copy of the finished run, to tamper with (its export's manifest points at
    the copy)."""
    dst = tmp_path / "run"
    shutil.copytree(done, dst)
    m = dst / "exports" / "model-onnx-w32-weight-only.json"
    manifest = json.loads(m.read_text())
    manifest["source"]["run"] = str(dst.resolve())
    write_json(m, manifest)
    return dst


def edit_json(run: Path, name: str, change, rehash: bool = True) -> None:
    """Change one of the run's JSON files and, by default, its sha256 record in report.json
    too, so the check behind the hash (the file's content) is what is tested."""
    path = run / name
    obj = json.loads(path.read_text())
    obj = change(obj)
    path.write_text(json.dumps(obj) if not isinstance(obj, bytes) else "")
    if isinstance(obj, bytes):
        path.write_bytes(obj)
    if rehash and name != "report.json":
        report = json.loads((run / "report.json").read_text())
        report["files"][name] = sha256_file(path)
        (run / "report.json").write_text(json.dumps(report))


# ------------------------------------------------------------------------------ data loss

def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    proj = tmp_path / "project"
    (proj / "src").mkdir(parents=True)
    (proj / "config.json").write_text('{"name": "my project"}')
    (proj / "src" / "main.py").write_text("print('mine')")
    before = snapshot(proj)
    refused("not a run directory", "compress", *TINY, "--out", proj, "--overwrite")
    assert snapshot(proj) == before


def test_overwrite_never_replaces_a_users_config_json(tmp_path):
    """A file named like a run's own does not make a run: the folder is the user's."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"config": {"model": "mine"}}')
    before = snapshot(mine)
    refused(r"not a run directory \(it holds config\.json\)", "compress", *TINY, "--out",
            mine, "--overwrite")
    assert snapshot(mine) == before


def test_resume_of_a_finished_run_with_a_broken_history_is_refused(copy):
    shutil.rmtree(copy / "checkpoint", ignore_errors=True)
    with open(copy / "history.jsonl", "a") as f:
        f.write('{"round": 9, "winn')
    refused(r"history\.jsonl is damaged", "compress", "--out", copy, "--resume")


def test_overwrite_refuses_a_run_that_holds_foreign_files(done, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(done, run)
    (run / "notes.txt").write_text("mine")
    before = snapshot(run)
    refused("not the run's own.*notes.txt", "compress", *TINY, "--out", run, "--overwrite")
    assert snapshot(run) == before


@pytest.mark.parametrize("where, named", [
    ("exports/NOTES-mine.txt", "exports/NOTES-mine.txt"), ("evals/mine/notes.txt", "evals/mine"),
    ("references/ref-0/notes.txt", "references/ref-0/notes.txt"),
    ("references/mine.txt", "references/mine.txt")])
def test_overwrite_refuses_a_run_with_foreign_files_in_its_folders(done, tmp_path, where,
                                                                    named):
    run = tmp_path / "run"
    shutil.copytree(done, run)
    if where.startswith("references/ref-0"):  # a reference run: a run directory of its own
        shutil.copytree(done, run / "references" / "ref-0")
    (run / where).parent.mkdir(parents=True, exist_ok=True)
    (run / where).write_text("mine")
    before = snapshot(run)
    refused(f"not the run's own.*{named}", "compress", *TINY, "--out", run, "--overwrite")
    assert snapshot(run) == before


def test_no_output_lands_on_a_file_of_a_runs_contract(copy):
    before = snapshot(copy)
    exp = copy / "exports" / "model-onnx-w32-weight-only.onnx"
    for name in ("report.json", "config.json"):
        refused(rf"{name} is a file of the run in .*choose another --json", "evaluate", exp,
                "--json", copy / name, "--overwrite", "--attack-epochs", "1")
    assert snapshot(copy) == before


def test_overwrite_through_a_symlinked_out_replaces_the_run(done, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(done, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    r = cli("compress", *TINY, "--seed", "3", "--out", link, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink()
    assert json.loads((real / "config.json").read_text())["config"]["seed"] == 3
    assert not (real / "exports").exists()  # the old run's exports went with it


def test_export_manifest_never_overwrites_a_run_file(copy):
    before = snapshot(copy)
    line = refused(r"manifest.*report\.json.*not an export manifest", "export", "--run", copy,
                   "--format", "onnx", "--bits", "32", "--out", copy / "report.onnx",
                   "--overwrite")
    assert "config.onnx" not in line
    refused(r"report\.json.*not an export manifest", "export", "--run", copy, "--format",
            "onnx", "--bits", "32", "--out", copy / "report.onnx")
    assert snapshot(copy) == before


def test_export_names_the_file_that_exists(copy, tmp_path):
    shutil.copy(copy / "exports" / "model-onnx-w32-weight-only.json", tmp_path / "m.json")
    refused(r"m\.json already exists.*--overwrite", "export", "--run", copy, "--format", "onnx",
            "--bits", "32", "--out", tmp_path / "m.onnx")


def test_evaluate_json_named_like_its_plot_is_refused(copy, tmp_path):
    exp = copy / "exports" / "model-onnx-w32-weight-only.onnx"
    refused(r"--json out\.png: the ROC plot goes beside the report as \.png", "evaluate", exp,
            "--json", tmp_path / "out.png", "--attack-epochs", "1")
    assert not any(tmp_path.glob("out*"))


def test_a_manifest_that_names_another_file_is_refused(copy):
    exp = copy / "exports" / "model-onnx-w32-weight-only.onnx"
    m = exp.with_suffix(".json")
    manifest = json.loads(m.read_text())
    write_json(m, {**manifest, "file": "other.onnx"})
    refused(r"describes 'other\.onnx', not model-onnx-w32-weight-only\.onnx", "evaluate", exp,
            "--attack-epochs", "1")
    assert not (copy / "evals").exists()


def test_a_manifest_that_misstates_format_or_bits_is_refused(copy):
    from exporters import export
    from exporters.config import ExportConfig

    export(ExportConfig(format="onnx", bits=8, parity_samples=32), copy)
    for stem, claim, message in [
            ("model-onnx-w32-weight-only", {"format": "tflite"}, "the file is onnx, not tflite"),
            ("model-onnx-w32-weight-only", {"bits": 8}, "no weight is stored as an integer"),
            ("model-onnx-w8-weight-only", {"bits": 32}, r"is stored as int8 in a 32-bit file"),
            ("model-onnx-w8-weight-only", {"bits": 4}, r"levels per channel, more than 4 bits")]:
        m = copy / "exports" / f"{stem}.json"
        real = json.loads(m.read_text())
        write_json(m, {**real, **claim})
        refused(f"{stem}.json says .* but {stem}.onnx contradicts it .*{message}", "evaluate",
                copy / "exports" / f"{stem}.onnx", "--attack-epochs", "1")
        write_json(m, real)
    assert not (copy / "evals").exists()


def test_evaluate_json_is_not_overwritten_without_the_flag(copy, tmp_path):
    target = tmp_path / "mine.json"
    target.write_text("keep me")
    (tmp_path / "mine.png").write_text("keep me too")
    exp = copy / "exports" / "model-onnx-w32-weight-only.onnx"
    refused(r"mine\.json.*already exist.*--overwrite", "evaluate", exp, "--json", target,
            "--attack-epochs", "1")
    assert target.read_text() == "keep me" and (tmp_path / "mine.png").read_text() == "keep me too"
    r = cli("evaluate", exp, "--json", target, "--attack-epochs", "1", "--overwrite")
    assert r.returncode in (0, 1, 3), r.stderr
    report = json.loads(target.read_text())
    assert report["model_file"] == str(exp.resolve())
    assert "file is the file's name" in report["manifest_checked"]


# ------------------------------------------------------------------ silently wrong results

def test_a_second_writer_is_refused_naming_the_holder(tmp_path, done):
    out = tmp_path / "run"
    with RunDir(out).lock(create=True):
        refused(r"in use by another safeexport process \(pid \d+", "compress", *TINY,
                "--out", out)
        assert [p.name for p in out.iterdir()] == [".lock"]
    # a run being exported (a shared lock) cannot be overwritten meanwhile
    run = tmp_path / "copy"
    shutil.copytree(done, run)
    before = snapshot(run)
    with RunDir(run).lock(shared=True):
        refused("in use by another safeexport process", "compress", *TINY, "--out", run,
                "--overwrite")
    assert snapshot(run) == before
    # while a writer holds it, an export is refused too
    with RunDir(run).lock():
        refused("in use by another safeexport process", "export", "--run", run, "--format",
                "onnx", "--bits", "32", "--out", tmp_path / "x.onnx")


def test_two_compress_processes_on_one_out(tmp_path):
    """The case as a user meets it: a second `compress` on a folder another process is
    writing is refused with that process's pid, and the first run's files are its own; once
    the holder dies (even by SIGKILL) the folder is free again."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import HANG_GUARD_S, REPO

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "safeexport", "compress", *TINY, "--epochs",
                             "50", "--out", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + HANG_GUARD_S
        while (proc.poll() is None and time.time() < deadline
               and not (out / "config.json").exists()):
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before the second could meet it"
        # without --overwrite it is "already holds a run"; with it, the lock decides
        refused(rf"in use by another safeexport process \(pid {proc.pid} ", "compress", *TINY,
                "--seed", "1", "--overwrite", "--out", out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunDir(out).lock():  # released by the kernel when its holder died
        pass
    assert json.loads((out / "config.json").read_text())["config"]["seed"] == 0


@pytest.mark.parametrize("flag,value", [("--weight-decay", "nan"), ("--lr", "inf"),
                                        ("--beta", "nan"), ("--prune-rate", "nan")])
def test_non_finite_options_are_refused(tmp_path, flag, value):
    refused(f"{flag[2:].replace('-', '_')} must be a finite number", "compress", *TINY, flag,
            value, "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_float_tolerance_nan_is_refused(copy):
    refused("float_tolerance must be a finite number", "export", "--run", copy, "--format",
            "onnx", "--bits", "32", "--float-tolerance", "nan", "--out", copy / "x.onnx")


def _npz(tmp_path: Path, name: str = "d.npz", **arrays) -> str:
    path = tmp_path / name
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_divergence_stops_training_with_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="loss became (nan|inf).*lower --lr"):
        compress(tiny_config(lr=1e30, epochs=1, update_frequency=5, dense_reference=False),
                 tmp_path / "run")
    assert not (tmp_path / "run" / "report.json").exists()


def test_nan_never_reaches_a_report(tmp_path):
    with pytest.raises(ConfigError, match="NaN or infinite"):
        write_json(tmp_path / "r.json", {"auc": float("nan")})
    assert not (tmp_path / "r.json").exists()


def _tar_of_images(path: Path, n: int, gz: bool = False) -> list[int]:
    """``n`` small PNGs in two classes; returns each member's header offset."""
    from PIL import Image

    offsets = []
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(np.full((8, 8), i % 250, np.uint8)).save(buf, format="PNG")
            info = tarfile.TarInfo(f"data/c{i % 2}/{i:04d}.png")
            info.size = len(buf.getvalue())
            offsets.append(tar.offset)
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return offsets


def test_a_damaged_tar_is_refused_naming_the_member(tmp_path):
    path = tmp_path / "imgs.tar"
    offsets = _tar_of_images(path, 300)
    data = bytearray(path.read_bytes())
    at = offsets[180]  # a corrupt header at 60%
    data[at:at + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))
    refused(r"damaged tar archive.*after member data/c1/0179\.png", "compress", *TINY_DATA,
            "--dataset", f"folder:{path}", "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_truncated_tar_gz_is_refused(tmp_path):
    path = tmp_path / "imgs.tar.gz"
    _tar_of_images(path, 300, gz=True)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    refused(r"imgs\.tar\.gz.*(damaged|truncated|not a readable)", "compress", *TINY_DATA,
            "--dataset", f"folder:{path}", "--out", tmp_path / "run")


def test_swapped_splits_are_refused(copy):
    with np.load(copy / "splits.npz") as f:
        parts = dict(f)
    parts["test"], parts["known_members"] = parts["known_members"], parts["test"]
    np.savez(copy / "splits.npz", **parts)
    refused(r"splits\.npz does not match its record", "export", "--run", copy, "--format",
            "onnx", "--bits", "32", "--out", copy / "x.onnx")
    refused(r"splits\.npz does not match its record", "evaluate",
            copy / "exports" / "model-onnx-w32-weight-only.onnx", "--attack-epochs", "1",
            "--json", copy / "e.json")


@pytest.mark.parametrize("name", ["config.json", "model.json"])
def test_edited_run_files_are_refused(copy, name):
    edit_json(copy, name, lambda o: {**o, "edited": True}, rehash=False)
    refused(rf"{name} does not match its record", "export", "--run", copy, "--format", "onnx",
            "--bits", "32", "--out", copy / "x.onnx")


def test_complex_data_and_one_class_are_refused(tmp_path):
    x = np.zeros((300, 5), np.complex64) + 1j
    refused("complex", "compress", *TINY_DATA, "--dataset",
            _npz(tmp_path, x=x, y=np.arange(300) % 3), "--out", tmp_path / "run")
    refused("at least two classes", "compress", *TINY_DATA, "--dataset",
            _npz(tmp_path, "one.npz", x=np.random.rand(300, 5), y=np.zeros(300, int)),
            "--out", tmp_path / "run")


# ------------------------------------------------------------------ a crash without a word

def test_a_runtime_crash_is_reported_not_silent(run, tmp_path):
    """A .tflite whose Model table lost its subgraphs (the vtable entry of field 2 zeroed, as
    damage might do) makes LiteRT dereference nothing and die: evaluate must say so in one
    line instead of vanishing with the runtime."""
    import subprocess
    import sys

    src = run / "exports" / "model-tflite-w32-weight-only.tflite"
    data = bytearray(src.read_bytes())
    root = struct.unpack_from("<I", data, 0)[0]
    vtable = root - struct.unpack_from("<i", data, root)[0]
    struct.pack_into("<H", data, vtable + 4 + 2 * 2, 0)  # Model.subgraphs: absent
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(bytes(data))
    manifest = json.loads(src.with_suffix(".json").read_text())
    manifest["sha256"], manifest["file"] = sha256_file(bad), bad.name
    write_json(bad.with_suffix(".json"), manifest)
    sample = tmp_path / "x.npy"
    np.save(sample, np.zeros((1, *manifest["input"]["shape"][1:]), np.float32))
    child = subprocess.run([sys.executable, "-m", "safeexport.probe", str(bad), "tflite",
                            str(sample)], capture_output=True)
    if child.returncode >= 0:
        pytest.skip("this LiteRT no longer crashes on a model without subgraphs")
    refused(r"the runtime crashed loading .*bad\.tflite \(tflite, SIG", "evaluate", bad,
            "--run", run, "--attack-epochs", "1", "--json", tmp_path / "e.json")


# ------------------------------------------------------------- tracebacks become one line

def _npy_bytes(shape: tuple, dtype: str, payload: bytes) -> bytes:
    """An .npy file whose header says ``shape`` but which holds ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + payload


def _lying_npz(path: Path) -> None:
    y = io.BytesIO()
    np.save(y, np.arange(300) % 3)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("x.npy", _npy_bytes((10**12,), "|u1", b"\0" * 64))
        z.writestr("y.npy", y.getvalue())


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` pixels, with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def _image_folder(root: Path, n: int = 300) -> Path:
    from PIL import Image

    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), i % 250, np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def npz_case(**arrays):
    return lambda tmp: _npz(tmp, **arrays)


def _x(n=300):
    return np.random.default_rng(0).integers(0, 255, (n, 8, 8), dtype=np.uint8)


def _y(n=300):
    return np.arange(n) % 3


def _uint64_labels():
    y = _y().astype(np.uint64)
    y[5] = np.uint64(2**64 - 1)
    return y


def _labels(value):
    y = _y().astype(np.int64)
    y[7] = value
    return y


def _npy_as_npz(tmp):
    np.save(tmp / "d.npy", _x())
    return f"npz:{tmp / 'd.npy'}"


def _zero_npz(tmp):
    (tmp / "z.npz").write_bytes(b"")
    return f"npz:{tmp / 'z.npz'}"


def _lying(tmp):
    _lying_npz(tmp / "l.npz")
    return f"npz:{tmp / 'l.npz'}"


def _folder_with(make):
    def build(tmp):
        root = _image_folder(tmp / "imgs")
        make(root / "c0")
        return f"folder:{root}"
    return build


def _tar_with(add):
    def build(tmp):
        path = tmp / "t.tar"
        _tar_of_images(path, 300)
        data = path.read_bytes().rstrip(b"\0")  # drop the end-of-archive blocks
        data += b"\0" * (-len(data) % 512)
        with open(path, "wb") as f:
            f.write(data)
            f.write(add())
            f.write(b"\0" * 1024)
        return f"folder:{path}"
    return build


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE, **kw) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info.tobuf(tarfile.GNU_FORMAT)


def _sparse_header() -> bytes:
    """A GNU sparse member whose real size field claims 1 TiB."""
    buf = bytearray(_header("data/c0/sparse.png", 0, tarfile.GNUTYPE_SPARSE))
    buf[483:495] = b"%011o\0" % (2**40)  # the "realsize" field of the old GNU sparse header
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


DATA_CASES = {
    "npz-empty": (npz_case(x=np.zeros((0, 8, 8), np.uint8), y=np.zeros(0, int)), "non-empty"),
    "npz-strings": (npz_case(x=np.array([["a"] * 4] * 300), y=_y()), "real numbers"),
    "npy-as-npz": (_npy_as_npz, "single .npy array, not an npz"),
    "npz-header-1e12": (_lying, "claims shape .*1000000000000"),
    "npz-label-2^40": (npz_case(x=_x(), y=_labels(2**40)), "class indices 0..K-1.*1099511627776"),
    "npz-negative-label": (npz_case(x=_x(), y=_labels(-1)), "class indices 0..K-1"),
    "npz-uint64-label": (npz_case(x=_x(), y=_uint64_labels()),
                         "class indices.*found 0..18446744073709551615$"),
    "npz-N-by-0": (npz_case(x=np.zeros((300, 0), np.float32), y=_y()), "no empty axis"),
    "npz-1x1-images": (npz_case(x=np.zeros((300, 1, 1), np.uint8), y=_y()),
                       r"model cnn cannot take inputs of shape \[1, 1, 1\]"),
    "npz-zero-bytes": (_zero_npz, "cannot read as npz"),
    "npz-nan-table": (npz_case(x=np.where(np.eye(300, 5) > 0, np.nan, 1.0), y=_y()),
                      "NaN or infinite.*sample 0"),
    "npz-inf-images": (npz_case(x=np.where(_x() > 250, np.inf, 0.5), y=_y()), "NaN or infinite"),
    "npz-float32-overflow": (npz_case(x=np.full((300, 4), 1e300), y=_y()), "too large for float32"),
    "folder-dir-named-png": (_folder_with(lambda c: (c / "x.png").mkdir()),
                             "x.png is named like an image but is not a regular file"),
    "folder-dev-zero": (_folder_with(lambda c: (c / "z.png").symlink_to("/dev/zero")),
                        "z.png is named like an image but is not a regular file"),
    "folder-fifo": (_folder_with(lambda c: os.mkfifo(c / "f.png")),
                    "f.png is named like an image but is not a regular file"),
    "folder-png-bomb": (_folder_with(lambda c: (c / "big.png").write_bytes(_png(30000, 30000))),
                        "big.png.*30000x30000 pixels|big.png.*decompression bomb"),
    "tar-symlink": (_tar_with(lambda: _header("data/c0/l.png", 0, tarfile.SYMTYPE,
                                              linkname="/etc/passwd")),
                    "member data/c0/l.png is named like an image but is a link"),
    "tar-dir": (_tar_with(lambda: _header("data/c0/d.png", 0, tarfile.DIRTYPE)),
                "member data/c0/d.png is named like an image"),
    "tar-10GB-missing": (_tar_with(lambda: _header("data/c0/huge.png", 10 << 30)),
                         "huge.png claims 10,737,418,240 bytes|truncated"),
    "tar-sparse-1TiB": (_tar_with(_sparse_header), "sparse.png.*sparse file|sparse.png claims"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_gets_one_line(tmp_path, case):
    build, pattern = DATA_CASES[case]
    refused(pattern, "compress", *TINY_DATA, "--dataset", build(tmp_path), "--out",
            tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _cifar(tmp: Path, batch1: dict | bytes | None = None, meta: dict | None = None) -> Path:
    root = tmp / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 255, (50, 3072), dtype=np.uint8),
             "labels": (np.arange(50) % 10).tolist()}
        payload = pickle.dumps(d)
        if name == "data_batch_1" and batch1 is not None:
            payload = batch1 if isinstance(batch1, bytes) else pickle.dumps({**d, **batch1})
        (root / name).write_bytes(payload)
    (root / "batches.meta").write_bytes(pickle.dumps(
        meta if meta is not None else {"label_names": [f"c{i}" for i in range(10)]}))
    return tmp


class _Reduce:
    """Pickles as ``func(*args)`` followed by ``__setstate__(state)``."""

    def __init__(self, func, args, state=None):
        self.r = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.r


def _huge_array() -> bytes:
    from numpy._core.multiarray import _reconstruct

    state = (1, (9 << 40,), np.dtype("u1"), False, b"")
    return pickle.dumps({"data": _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), state),
                         "labels": [0]})


def _bad_args() -> bytes:
    from numpy._core.multiarray import _reconstruct

    return pickle.dumps({"data": _Reduce(_reconstruct, (np.ndarray, "x", 5)), "labels": [0]})


CIFAR_CASES = {
    "9-TiB-array": (dict(batch1=_huge_array()), "data_batch_1: not a CIFAR python batch"),
    "bad-arguments": (dict(batch1=_bad_args()), "data_batch_1: not a CIFAR python batch"),
    "wrong-data-size": (dict(batch1={"data": np.zeros(100, np.uint8)}), "3072 per image"),
    "string-data": (dict(batch1={"data": np.array(["a"] * 3072 * 50)}), "uint8 pixels"),
    "string-labels": (dict(batch1={"labels": ["cat"] * 50}), "one integer label per image"),
    "label-1e12": (dict(batch1={"labels": [10**12] * 50}), "class indices 0..K-1"),
    "label-names-int": (dict(meta={"label_names": 7}), "list of class names"),
    "ragged-data": (dict(batch1={"data": [[1, 2, 3], [1, 2]]}), "not a CIFAR batch"),
}


@pytest.mark.parametrize("case", list(CIFAR_CASES))
def test_bad_cifar_pickles_get_one_line(tmp_path, case):
    kw, pattern = CIFAR_CASES[case]
    refused(pattern, "compress", *TINY_DATA, "--dataset", "cifar10", "--data-dir",
            _cifar(tmp_path, **kw), "--out", tmp_path / "run")


def _put(name: str, value):
    return lambda o: {**o, name: value}


def _drop(name: str):
    return lambda o: {k: v for k, v in o.items() if k != name}


RUN_CASES = {
    "report-invalid-utf8": ("report.json", lambda o: b"\xff\xfe{", "report.json: cannot read"),
    "report-list": ("report.json", lambda o: [o], "report.json: expected a JSON object"),
    "report-files-string": ("report.json", _put("files", "x"), "'files' is missing or not"),
    "report-no-layers": ("report.json", _drop("layers"), "'layers' is missing or not"),
    "model-json-no-kwargs": ("model.json", _drop("kwargs"), "'kwargs' is missing or not"),
    "model-json-list": ("model.json", lambda o: [o], "model.json: expected a JSON object"),
    "model-json-1e12-classes": ("model.json",
                                lambda o: {**o, "kwargs": {**o["kwargs"], "num_classes": 10**12}},
                                "num_classes 1000000000000 differs"),
    "config-no-config": ("config.json", _drop("config"), "'config' is missing or not"),
    "config-no-fingerprint": ("config.json", _drop("dataset_fingerprint"),
                              "'dataset_fingerprint' is missing or not"),
}


@pytest.mark.parametrize("case", list(RUN_CASES))
@pytest.mark.parametrize("stage", ["export", "evaluate"])
def test_damaged_run_files_get_one_line(copy, tmp_path, case, stage):
    name, change, pattern = RUN_CASES[case]
    edit_json(copy, name, change)
    if stage == "export":
        refused(pattern, "export", "--run", copy, "--format", "onnx", "--bits", "32",
                "--out", tmp_path / "x.onnx")
    else:
        refused(pattern, "evaluate", copy / "exports" / "model-onnx-w32-weight-only.onnx",
                "--attack-epochs", "1", "--json", tmp_path / "e.json")


def _set_compressed(key: str, value):
    return lambda o: {**o, "compressed": {**o["compressed"], key: value}}


REPORT_CASES = {
    "no-compressed": ("report.json", _drop("compressed"), r"report.json is damaged \(KeyError"),
    "string-task-acc": ("report.json", _set_compressed("task_acc", "0.9"),
                        r"report.json is damaged \(ValueError"),
    "string-records": ("report.json", lambda o: {**o, "exposure": {**o["exposure"],
                                                                  "records": "abc"}},
                       r"report.json is damaged \(TypeError"),
    "eval-without-verdict": ("evals/e.json", lambda o: {"model_file": "x.onnx"},
                             r"evals/e.json is damaged \(KeyError: 'verdict'\); evaluate"),
    "manifest-string-sizes": ("exports/model-onnx-w32-weight-only.json",
                              _put("sizes", "big"), r"weight-only.json is damaged"),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_report_on_damaged_files_gets_one_line(copy, case):
    """report.json has no hash record of its own, and evals/ and exports/ JSON are the user's
    to edit: a field that is missing or of the wrong type names the file and the fix."""
    name, change, pattern = REPORT_CASES[case]
    path = copy / name
    path.parent.mkdir(exist_ok=True)
    if not path.exists():
        path.write_text("{}")
    edit_json(copy, name, change, rehash=False)
    refused(pattern, "report", copy)
    assert not (copy / "report.html").exists()


def _rewrite_splits(run: Path, change) -> None:
    with np.load(run / "splits.npz") as f:
        parts = dict(f)
    change(parts)
    np.savez(run / "splits.npz", **parts)
    report = json.loads((run / "report.json").read_text())
    report["files"]["splits.npz"] = sha256_file(run / "splits.npz")
    (run / "report.json").write_text(json.dumps(report))


@pytest.mark.parametrize("change,pattern", [
    (lambda p: p.__setitem__("test", p["test"] + 10**6), "outside the dataset's 400"),
    (lambda p: p.__setitem__("test", p["test"][:0]), r"empty or malformed parts \(test\)"),
    (lambda p: p.__setitem__("test", p["known_members"]), "a sample in two parts"),
])
def test_bad_splits_get_one_line(copy, tmp_path, change, pattern):
    _rewrite_splits(copy, change)
    refused(pattern, "export", "--run", copy, "--format", "onnx", "--bits", "32", "--out",
            tmp_path / "x.onnx")


def test_model_file_that_is_a_folder_or_fifo(copy, tmp_path):
    (copy / "model.safetensors").unlink()
    os.mkfifo(copy / "model.safetensors")  # reading it would block forever
    refused("model.safetensors is a FIFO, not a regular file", "export", "--run", copy,
            "--format", "onnx", "--bits", "32", "--out", tmp_path / "x.onnx")
    (copy / "model.safetensors").unlink()
    (copy / "model.safetensors").mkdir()
    refused("model.safetensors is a folder, not a regular file", "export", "--run", copy,
            "--format", "onnx", "--bits", "32", "--out", tmp_path / "x.onnx")


@pytest.mark.parametrize("change,pattern", [
    (_drop("source"), r"not a complete export manifest \(missing or mistyped: source\.run, "
                      r"source\.model_sha256\)"),
    (_drop("input"), "not a complete export manifest"),
    (_put("bits", "8"), r"missing or mistyped: bits\)"),
    (_drop("parity"), r"missing or mistyped: parity\)"),
    (lambda o: [o], "expected a JSON object"),
])
def test_bad_manifest_gets_one_line(copy, tmp_path, change, pattern):
    m = copy / "exports" / "model-onnx-w32-weight-only.json"
    m.write_text(json.dumps(change(json.loads(m.read_text()))))
    refused(pattern, "evaluate", m.with_suffix(".onnx"), "--attack-epochs", "1", "--json",
            tmp_path / "e.json")


def test_the_exporter_and_evaluate_agree_on_what_a_manifest_is(copy, tmp_path):
    """One definition: a manifest evaluate refuses as incomplete is no manifest to the
    exporter either (it will not write over it as an earlier export)."""
    src = copy / "exports" / "model-onnx-w32-weight-only.json"
    incomplete = {k: v for k, v in json.loads(src.read_text()).items() if k != "input"}
    (tmp_path / "x.json").write_text(json.dumps(incomplete))
    refused(r"x\.json, which exists and is not an export manifest", "export", "--run", copy,
            "--format", "onnx", "--bits", "32", "--out", tmp_path / "x.onnx", "--overwrite")
    src.write_text(json.dumps(incomplete))
    refused(r"not a complete export manifest \(missing or mistyped: input\.shape, input\.dtype",
            "evaluate", src.with_suffix(".onnx"), "--attack-epochs", "1")


def test_resume_with_broken_history_or_on_a_foreign_folder(tmp_path):
    out = tmp_path / "run"

    def stop(rnd):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress(tiny_config(dense_reference=False), out, on_round=stop)
    (out / "history.jsonl").write_text('{"round": 1}\n{broken\n')
    refused(r"history\.jsonl is damaged.*--overwrite", "compress", "--out", out, "--resume")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"config": 1}')
    refused("holds no run to resume", "compress", "--out", other, "--resume")


def test_sparsity_that_keeps_no_weight_is_refused_before_writing(tmp_path):
    refused(r"--sparsity 1e-09 keeps .* = 0 of cnn's weights.*smallest --sparsity",
            "compress", *TINY, "--sparsity", "1e-9", "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- paths

READ_ONLY = Path("/sys/safeexport-test")  # sysfs refuses new files, even to root


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a read-only /sys")
def test_read_only_targets(copy, tmp_path):
    refused(f"cannot write {READ_ONLY}", "compress", *TINY, "--out", READ_ONLY)
    refused("cannot write /sys/x.onnx", "export", "--run", copy, "--format", "onnx", "--bits",
            "32", "--out", "/sys/x.onnx")
    refused("cannot write /sys/e.json", "evaluate",
            copy / "exports" / "model-onnx-w32-weight-only.onnx", "--attack-epochs", "1",
            "--json", "/sys/e.json")


def test_out_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    refused("cannot write|is a file", "compress", *TINY, "--out", tmp_path / "file" / "run")
    r = cli("compress", *TINY, "--out", tmp_path / "file")
    assert r.returncode == 2 and "is a file" in r.stderr, r.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch, copy):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safeexport.rundir.os.fsync", full)
    refused("cannot write .*No space left on device", "compress", *TINY, "--out",
            tmp_path / "new")
    assert not (tmp_path / "new").exists()
    before = snapshot(copy)
    refused("cannot write .*No space left on device", "export", "--run", copy, "--format",
            "onnx", "--bits", "32", "--out", copy / "exports" / "new.onnx")
    assert snapshot(copy) == before  # neither the file nor its manifest, nor a temporary


def test_a_disk_that_fills_after_the_set_up_removes_the_new_run_folder(tmp_path, monkeypatch):
    real, calls = os.fsync, []

    def fills_up(fd):  # config.json, splits.npz and model.json are written, then nothing
        calls.append(fd)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr("safeexport.rundir.os.fsync", fills_up)
    refused("cannot write .*No space left on device", "compress", *TINY, "--out",
            tmp_path / "new")
    assert len(calls) > 3 and not (tmp_path / "new").exists()


def test_export_after_a_killed_export_leaves_no_leftover_and_shares_its_mode(copy):
    """A SIGKILL while a file is staged leaves its hidden temporary behind; the next export of
    that path removes it (a live writer's is kept), and files get the run's mode, not 0600."""
    exports = copy / "exports"
    target = exports / "again.onnx"
    dead = exports / ".again.onnx.4194303.x1.onnx"  # above Linux's pid_max: no such process
    live = exports / f".again.onnx.{os.getppid()}.x2.onnx"
    dead.write_bytes(b"half a model")
    live.write_bytes(b"being written")
    r = cli("export", "--run", copy, "--format", "onnx", "--bits", "32", "--out", target)
    assert r.returncode == 0, r.stderr
    assert not dead.exists() and live.exists()
    mode = target.stat().st_mode & 0o777
    assert mode == target.with_suffix(".json").stat().st_mode & 0o777
    assert mode & 0o044  # readable by the group and others, as the run's other files


def _agnews(tmp: Path, data: bytes) -> Path:
    (tmp / "ag_news").mkdir(parents=True)
    (tmp / "ag_news" / "train.csv").write_bytes(data)
    return tmp


@pytest.mark.parametrize("make,pattern", [
    (lambda t: _agnews(t, b'"1","caf\xe9 au lait","x"\n'), r"train\.csv:1: not a readable UTF-8"),
    (lambda t: _agnews(t, b'"1","' + b"w" * (1 << 18) + b'"\n'), r"train\.csv:1: not a readable"),
])
def test_bad_text_csv_gets_one_line(tmp_path, make, pattern):
    refused(pattern, "compress", "--dataset", "agnews", "--data-dir", make(tmp_path),
            "--out", tmp_path / "run")


def test_fractional_tabular_labels_are_refused_not_truncated(tmp_path):
    rows = "\n".join(f"{1.5 if i == 0 else 1 + i % 100}," + ",".join(["0"] * 600)
                     for i in range(300))
    (tmp_path / "dataset_purchase").write_text(rows)
    refused(r"dataset_purchase: labels must be whole class numbers", "compress", "--dataset",
            "purchase100", "--data-dir", tmp_path, "--out", tmp_path / "run")


def test_study_never_writes_over_a_folder_of_someone_elses_files(tmp_path):
    mine = tmp_path / "paper"
    mine.mkdir()
    (mine / "study.md").write_text("my draft")
    (mine / "notes.txt").write_text("mine")
    before = snapshot(mine)
    refused(r"holds files a study does not write \(notes\.txt\)", "study", *TINY, "--out",
            mine)
    refused(r"holds files a study does not write", "study", *TINY, "--compare", "dense",
            "--out", mine)
    assert snapshot(mine) == before


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))
CONFIG_FILES = {
    "deep.yaml": ("dataset: " + "[" * 50000 + "]" * 50000, "nested deeper than 4 levels"),
    "deep-block.yaml": ("".join(" " * i + "a:\n" for i in range(400)) + " " * 400 + "1",
                        "nested deeper than 4 levels"),
    "laughs.yaml": (LAUGHS, r"YAML aliases \(\*a\) are not accepted"),
    "deep.json": ('{"dataset": ' + "[" * 100000 + "]" * 100000 + "}", "cannot read it as a json"),
    "huge.yaml": ("seed: 1\n" + "#" * (2 << 20), "larger than 1024 KiB"),
}


@pytest.mark.parametrize("name", list(CONFIG_FILES))
def test_run_bounds_a_config_file_before_parsing_it(tmp_path, name):
    """PyYAML's composer recurses per level and expands every alias, json's decoder recurses:
    a hostile config file is refused by its shape, in milliseconds, before it is built."""
    text, pattern = CONFIG_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    refused(f"{name}: {pattern}", "run", path, "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_settings_on_a_command_line_are_bounded_like_config_files(tmp_path):
    """``KEY=VALUE`` (study's METHOD/KEY=VALUE, the benchmarks' --set) is read as YAML too."""
    from safeexport.config import parse_setting

    with pytest.raises(ConfigError, match="YAML aliases"):
        parse_setting("select=[&a [1, 2], [*a, *a]]")
    refused("nested deeper", "study", "--compare", "prune/select=" + "[" * 20000 + "]" * 20000,
            "--out", tmp_path / "study")
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("address", ["not a host:xx", "127.0.0.1:99999", "http://h:1"])
def test_a_ray_address_that_is_not_one_is_refused(tmp_path, address):
    refused(r"--ray-address .* is not HOST:PORT, ray://HOST:PORT, auto or local", "compress",
            *TINY, "--executor", "ray", "--ray-address", address, "--out", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_ray_cluster_that_does_not_answer_is_refused_before_any_training(copy, tmp_path):
    """ray.init retries an address where nothing listens for as long as it is left running:
    compress (whose references would run after the model trained), study and evaluate
    building references each probe it first."""
    port = closed_port()
    dead = ["--executor", "ray", "--ray-address", f"127.0.0.1:{port}"]
    pattern = rf"--ray-address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}"
    refused(pattern, "compress", *TINY, *dead, "--references", "2", "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    refused(pattern, "study", *TINY, *dead, "--compare", "prune", "--out", tmp_path / "study")
    assert not any((tmp_path / "study").glob("seed-*"))
    edit_json(copy, "config.json", lambda o: {**o, "config": {
        **o["config"], "executor": "ray", "ray_address": f"127.0.0.1:{port}"}})
    refused(pattern, "evaluate", copy / "exports" / "model-onnx-w32-weight-only.onnx",
            "--references", "2", "--json", tmp_path / "e.json")
    assert not (copy / "references" / "ref-0" / "report.json").exists()


@pytest.mark.parametrize("args, pattern", [
    (["compress", "--bogus"], r"No such option '--bogus'.* \(see `\S+ compress --help`\)"),
    (["export", "--format", "xx"], r"Invalid value for '--format': 'xx' is not one of"),
    (["evaluate"], r"Missing argument 'MODEL_FILES...'"),
    (["--bogus"], r"No such option '--bogus'"),
    (["nocommand"], r"No such command 'nocommand'"),
])
def test_clicks_own_refusals_are_one_line_too(args, pattern):
    """A bad choice, a missing argument or an unknown option: one "error:" line and exit 2,
    like every other refusal (click printed a three-line usage block)."""
    refused(pattern, *args)
