"""Real-data tier: small samples of the real datasets (skipped when they are absent)."""

import json

import numpy as np
import pytest

from compressor import compress
from safeexport.data import load_dataset
from tests.conftest import tiny_config

pytestmark = pytest.mark.realdata


def test_fashionmnist_sample_compresses(datasets_dir, tmp_path):
    cfg = tiny_config(dataset="fashionmnist", data_dir=str(datasets_dir), max_samples=800,
                      sparsity=0.2, epochs=8, update_frequency=30)
    run = compress(cfg, tmp_path / "run")
    config = json.loads(run.config.read_text())
    assert config["num_samples"] == 800 and config["input_shape"] == [1, 28, 28]
    report = json.loads(run.report.read_text())
    assert report["compressed"]["task_acc"] > 0.5  # 10 classes: chance is 0.1
    assert report["compressed"]["density"] == pytest.approx(0.2, abs=1e-4)


def test_fashionmnist_full_files_are_byte_exact(datasets_dir):
    ds = load_dataset("fashionmnist", data_dir=datasets_dir)
    assert ds.x.shape == (70000, 1, 28, 28)
    assert np.bincount(ds.y).tolist() == [7000] * 10


def test_cifar10_image_tar_sample(datasets_dir):
    ds = load_dataset("cifar10", data_dir=datasets_dir, max_samples=300, seed=1)
    assert ds.x.shape == (300, 3, 32, 32) and ds.num_classes == 10
    assert ds.class_names[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(ds.y).min() == 30


def test_agnews_test_csv(datasets_dir):
    ds = load_dataset("agnews", data_dir=datasets_dir)
    assert len(ds) == 7600 and np.bincount(ds.y).tolist() == [1900] * 4
