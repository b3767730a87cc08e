"""A user's own model and data: ``--model package.module:factory`` from the working directory,
a plugin installed under the ``safeexport.models`` entry points, ``--init-weights``, and
``--dataset torch:package.module:factory`` (a map-style torch Dataset)."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import safeexport
from compressor import compress
from compressor.setup import prepare
from safeexport.data import load_dataset
from safeexport.errors import ConfigError, DataError
from safeexport.models import build_model, model_info, plugin_names
from safeexport.plugins import trust
from safeexport.rundir import RunDir, load_tensors, sha256_file
from tests.conftest import FAST_EXPORT, REPO, cli, one_error_line, tiny_config

# A module a user keeps beside their data: a model factory and a Dataset factory that work,
# and broken ones.
USER_MODULE = textwrap.dedent("""
    import sys

    import torch
    from torch import nn
    from torch.utils.data import Dataset

    class Blobs(Dataset):
        # 4 classes of 8x8 float images in [0, 1], the class shifting the brightness
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.y = torch.arange(200) % 4
            self.x = (torch.rand(200, 1, 8, 8, generator=g) * 0.4
                      + self.y.view(-1, 1, 1, 1) * 0.2)

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            return self.x[i], self.y[i]

    def blobs():
        return Blobs()

    def fractional():
        return [(torch.zeros(3), 0.5)] * 10

    def ragged():
        return [(torch.zeros(3 + i % 2), 0) for i in range(10)]

    def ragged_inner():
        return [([[0.0, 1.0], [2.0]], 0)] * 10

    def requires_grad():
        return [(torch.full((3,), 0.5, requires_grad=True), i % 2) for i in range(10)]

    def bfloat16():
        return [(torch.full((3,), 0.5, dtype=torch.bfloat16), i % 2) for i in range(10)]

    def string_labels():
        return [(torch.zeros(3), "cat")] * 10

    def none_labels():
        return [(torch.zeros(3), None)] * 10

    def dict_inputs():
        return [({"pixels": torch.zeros(3)}, 0)] * 10

    def unreachable():
        raise OSError("no such bucket")

    BUILT = []

    def tinynet(input_shape, num_classes):
        BUILT.append((input_shape, num_classes))
        return nn.Sequential(nn.Conv2d(input_shape[0], 6, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                             nn.Linear(24, num_classes))

    def raises(input_shape, num_classes):
        raise RuntimeError("my factory is broken")

    def not_a_module(input_shape, num_classes):
        return "a string"

    def wrong_logits(input_shape, num_classes):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[1] * input_shape[2], 3))

    class Mean(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.num_classes = num_classes

        def forward(self, x):
            return x.flatten(1).mean(1, keepdim=True).expand(-1, self.num_classes)

    def no_weights(input_shape, num_classes):
        return Mean(num_classes)

    def exits(input_shape, num_classes):
        sys.exit(0)

    class TwoInputs(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(64, num_classes)

        def forward(self, x, mask):
            return self.fc(x.flatten(1) * mask)

    def two_inputs(input_shape, num_classes):
        return TwoInputs(num_classes)

    class ExitsInForward(TwoInputs):
        def forward(self, x):
            sys.exit(3)

    def exits_in_forward(input_shape, num_classes):
        return ExitsInForward(num_classes)

    def exiting_dataset():
        sys.exit(0)

    class ExitsOnRead(Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            sys.exit(0)

    def exits_on_read():
        return ExitsOnRead()
""")


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory holding the user's module (a fresh name per test, so an import
    cached by an earlier test cannot stand in for this one's)."""
    name = f"usernets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path, name
    sys.modules.pop(name, None)


def test_user_model_from_module_path_through_compress_export_evaluate(user_dir):
    """The user's factory, named on the command line as a new user would (the console script
    does not have the working directory on its path), trains, and export and evaluate rebuild
    it from model.json in this process."""
    folder, name = user_dir
    out = folder / "run"
    cfg = tiny_config(model=f"{name}:tinynet", dataset=f"torch:{name}:blobs", max_samples=None)
    args = [sys.executable, "-c", "from commands.cli import main; main()", "compress",
            "--out", str(out), "--no-progress"]
    for key, value in cfg.to_dict().items():
        if value is not None and key in ("dataset", "model", "sparsity", "epochs",
                                         "update_frequency", "batch_size", "finetune_iters",
                                         "attack_epochs", "attack_finetune_epochs",
                                         "final_attack_epochs", "max_samples", "device"):
            args += [f"--{key.replace('_', '-')}", str(value)]
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(folder)}
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    spec = json.loads((out / "model.json").read_text())
    assert spec == {"name": f"{name}:tinynet",
                    "kwargs": {"input_shape": [1, 8, 8], "num_classes": 4}}
    weights = load_tensors(out / "model.safetensors")
    assert set(weights) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    density = sum(int((weights[k] != 0).sum()) for k in ("0.weight", "4.weight")) / \
        sum(weights[k].numel() for k in ("0.weight", "4.weight"))
    assert abs(density - 0.2) < 0.01  # the factory's Conv and Linear were masked at Ω = 0.2

    # this process did not name the factories: a run folder naming them is not enough
    with pytest.raises(ConfigError, match="pass --trust-code"):
        safeexport.export(out, format="onnx", bits=8, **FAST_EXPORT)
    assert name not in sys.modules  # refused before importing (importing runs the module)
    result = cli("export", "--run", out, "--trust-code", "--format", "onnx", "--parity-samples",
                 "64", "--calibration", "32", "--min-agreement", "0")
    assert result.returncode == 0, result.stderr
    onnx = out / "exports" / "model-onnx-w8-weight-only.onnx"
    assert json.loads(onnx.with_suffix(".json").read_text())["parity"]["agreement"] > 0.9
    result = cli("evaluate", onnx, "--trust-code", "--attack-epochs", "2", "--json",
                 folder / "e.json")
    assert result.returncode in (0, 1, 3), result.stderr  # 1 or 3: a verdict, not an error
    report = json.loads((folder / "e.json").read_text())
    assert report["before"]["task_acc"] == pytest.approx(
        json.loads((out / "report.json").read_text())["compressed"]["task_acc"], abs=1e-6)
    assert sys.modules[name].BUILT  # export/evaluate imported the factory again


def test_a_torch_dataset_is_read_as_its_arrays_would_be(user_dir):
    """The Dataset's items, stacked, are the dataset: the same arrays saved as an npz give
    the same fingerprint (so splits and later stages cannot tell the two apart). Only a
    trusted reference is imported."""
    folder, name = user_dir
    with pytest.raises(ConfigError, match="pass --trust-code"):
        load_dataset(f"torch:{name}:blobs")
    trust(f"{name}:blobs")
    ds = load_dataset(f"torch:{name}:blobs")
    blobs = sys.modules[name].Blobs()
    np.savez(folder / "same.npz", x=blobs.x.numpy(), y=blobs.y.numpy())
    assert ds.kind == "image" and ds.x.shape == (200, 1, 8, 8) and ds.x.dtype == np.uint8
    assert ds.y.tolist() == blobs.y.tolist()
    assert ds.fingerprint() == load_dataset(f"npz:{folder}/same.npz").fingerprint()


@pytest.mark.parametrize("factory", ["requires_grad", "bfloat16"])
def test_dataset_tensors_that_numpy_cannot_take_directly_are_read(user_dir, factory):
    """A tensor that requires grad is detached, and bfloat16 (no numpy type) widened."""
    _, name = user_dir
    trust(f"{name}:{factory}")
    ds = load_dataset(f"torch:{name}:{factory}")
    assert ds.x.dtype == np.float32 and ds.x.shape == (10, 3)
    assert np.all(ds.x == 0.5) and ds.y.tolist() == [0, 1] * 5


@pytest.mark.parametrize("factory, message", [
    ("fractional", "labels"),
    ("ragged", "item 1 has shape (4,), item 0 (3,); every input must have the same shape"),
    ("unreachable", "did not give a map-style Dataset with a length (OSError: no such bucket)"),
    ("ragged_inner", "item 0's input is not a rectangular array (setting an array element"),
    ("string_labels", "labels must be a non-empty 1-D integer array, got <U3"),
    ("none_labels", "labels must be a non-empty 1-D integer array, got object"),
    ("dict_inputs", "x holds object values"),
    ("missing", "has no callable 'missing'"),
])
def test_a_dataset_factory_that_fails_is_one_data_error(user_dir, factory, message):
    _, name = user_dir
    trust(f"{name}:{factory}")
    with pytest.raises((DataError, ConfigError), match=re.escape(message)):
        load_dataset(f"torch:{name}:{factory}")


@pytest.mark.parametrize("factory, message", [
    ("no_such_module_xyz:build", "cannot import the model factory no_such_module_xyz:build"),
    ("{name}:missing", "has no callable 'missing'"),
    ("{name}:raises", "failed to build a model for input_shape=(1, 8, 8), num_classes=4: "
                      "RuntimeError: my factory is broken"),
    ("{name}:not_a_module", "returned str, not a torch.nn.Module"),
    ("{name}:wrong_logits", "must return logits of shape (batch, 4), got (2, 3)"),
    ("{name}:no_weights", "has no Conv or Linear layer"),
    ("{name}:two_inputs", "cannot be called as model(x) (TwoInputs.forward() missing 1 "
                          "required positional argument: 'mask')"),
    ("not a module path", "unknown model 'not a module path'"),
])
def test_a_factory_that_cannot_build_is_one_line_and_writes_nothing(user_dir, factory, message):
    folder, name = user_dir
    out = folder / "run"
    result = cli("compress", "--model", factory.format(name=name), "--dataset", "synthetic",
                 "--max-samples", "200", "--update-frequency", "10", "--out", out)
    assert message in one_error_line(result, "")
    assert not out.exists()


@pytest.mark.parametrize("option, value, message", [
    ("--model", "{name}:exits", "model factory {name}:exits called sys.exit(0)"),
    ("--model", "{name}:exits_in_forward",
     "model {name}:exits_in_forward's forward called sys.exit(3)"),
    ("--model", "exiting_mod:build", "importing module exiting_mod (the model factory "
                                     "exiting_mod:build) called sys.exit(0)"),
    ("--dataset", "torch:{name}:exiting_dataset",
     "Dataset factory {name}:exiting_dataset called sys.exit(0)"),
    ("--dataset", "torch:{name}:exits_on_read",
     "the Dataset of {name}:exits_on_read (item 0) called sys.exit(0)"),
])
def test_user_code_that_exits_is_one_error_naming_it(user_dir, option, value, message):
    folder, name = user_dir
    (folder / "exiting_mod.py").write_text("import sys\nsys.exit(0)\n")
    out = folder / "run"
    args = ["--dataset", "synthetic"] if option == "--model" else []
    result = cli("compress", option, value.format(name=name), *args, "--max-samples", "200",
                 "--update-frequency", "10", "--out", out)
    assert message.format(name=name) in one_error_line(result, "")
    assert not out.exists()
    sys.modules.pop("exiting_mod", None)


def test_a_plugin_under_the_entry_point_group_is_a_model(tmp_path, monkeypatch):
    """An installed package's ``[safeexport.models]`` entry point: discovered through its
    dist-info, listed with the known models, built with the input shape and class count."""
    site = tmp_path / "site"
    (site / "acme_nets").mkdir(parents=True)
    (site / "acme_nets" / "__init__.py").write_text(
        "from torch import nn\n"
        "def build(input_shape, num_classes):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], num_classes))\n")
    info = site / "acme_nets-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-nets\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[safeexport.models]\nacme-mlp = acme_nets:build\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "acme-mlp" in plugin_names()
        model = build_model("acme-mlp", {"input_shape": [30], "num_classes": 4})
        assert model(torch.zeros(2, 30)).shape == (2, 4)
        assert model_info("acme-mlp").kinds == ("image", "tabular")
        with pytest.raises(ConfigError, match="acme-mlp, or your own as package.module"):
            model_info("acme-cnn")
    finally:
        sys.modules.pop("acme_nets", None)


def test_init_weights_start_from_the_file_and_are_recorded(tmp_path, monkeypatch):
    """--init-weights: the initial model holds the file's weights (the dense run's here), the
    initial mask keeps each layer's largest of them, and config.json records the file's hash."""
    dense = compress(tiny_config(method="dense", epochs=2), tmp_path / "dense", progress=False)
    init = str(dense.model)
    cfg = tiny_config(init_weights=init, epochs=2, update_frequency=4, dense_reference=False)
    _, setup = prepare(cfg, RunDir(tmp_path / "run"), False, False, False)
    model = setup.new_model("init")
    given = load_tensors(dense.model)
    assert all(torch.equal(v, given[k]) for k, v in model.state_dict().items())
    student = setup.new_model("student", {**setup.model_kwargs, "width": 0.5})
    assert student.state_dict()["features.0.weight"].shape[0] < given["features.0.weight"].shape[0]
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["init_weights_sha256"] == sha256_file(dense.model)

    import compressor.run

    calls = []
    real = compressor.run.init_masks
    monkeypatch.setattr(compressor.run, "init_masks",
                        lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    compress(cfg, tmp_path / "sc", progress=False)
    assert calls == [{"by_magnitude": True}]


def test_init_weights_that_do_not_fit_the_model_are_refused_before_writing(tmp_path):
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(wrong))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="does not fit the model --model cnn describes"):
        compress(tiny_config(init_weights=str(wrong)), out, progress=False)
    assert not out.exists()
    pickle = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    with pytest.raises(ConfigError, match="is not a .safetensors file"):
        tiny_config(init_weights=str(pickle))


@pytest.mark.parametrize("change, message", [
    (lambda k, v: -v if k.endswith("running_var") else v,
     "negative BatchNorm running variance in features.1.running_var"),
    (lambda k, v: v.fill_(float("nan")) if k == "features.0.weight" else v,
     "non-finite values in features.0.weight"),
])
def test_init_weights_with_unusable_values_are_refused_before_writing(run, tmp_path, change,
                                                                      message):
    """A negative running variance is NaN under the square root: every prediction would be
    NaN and the first metric a ValueError."""
    tensors = {k: change(k, v.clone()) for k, v in load_tensors(run / "model.safetensors").items()}
    path = tmp_path / "init.safetensors"
    save_file(tensors, str(path))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=re.escape(message)):
        compress(tiny_config(init_weights=str(path)), out, progress=False)
    assert not out.exists()
