"""The exporters: quantizer properties, every format × bit width on tiny CNN/MLP/BERT runs (file
loads in its runtime, parity, manifest, stored bits and densities read back), zero channels
through int4, static schemes, kept-float layers and every bad input."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from compressor import compress
from exporters import export, onnx_format, tflite_format
from exporters.config import ExportConfig
from exporters.quantize import container_bits, pack_ints, qmax, quantize_channels
from safeexport.data.splits import Splits
from safeexport.errors import ConfigError, ExportError
from safeexport.rundir import RunDir, load_tensors, save_tensors, sha256_file, write_json
from safeexport.runtimes import open_runtime
from safeexport.stored import INSPECT, read_tflite, storage_problems, tflite_stored, unpack_ints
from tests.conftest import cli, one_error_line, tiny_config, write_agnews_csv, write_tabular_npz

FAST = dict(parity_samples=64, calibration=32, min_agreement=0.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs of a CNN, the MLP and a BERT (each a few seconds)."""
    root = tmp_path_factory.mktemp("runs")
    write_tabular_npz(root / "t.npz")
    write_agnews_csv(root)
    cfgs = {"cnn": tiny_config(dense_reference=False),
            "mlp": tiny_config(dataset=f"npz:{root / 't.npz'}", model="mlp",
                               dense_reference=False),
            "bert": tiny_config(dataset="agnews", model="bert", data_dir=str(root),
                                max_samples=None, max_length=12, vocab_size=120, epochs=6,
                                update_frequency=12, dense_reference=False)}
    return {name: compress(cfg, root / name).path for name, cfg in cfgs.items()}


# ---------------------------------------------------------------- quantizer


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_quantizer_keeps_zeros_levels_and_beats_max_abs(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, (16, 8, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.9] = 0  # 90% pruned
    w[5] = 0  # a pruned filter
    q, scale = quantize_channels(w, bits, axis=0)
    assert q.dtype == np.int8 and np.abs(q).max() <= qmax(bits)
    assert np.all(q[w == 0] == 0), "a pruned weight became non-zero"
    assert np.all(scale > 0) and scale[5] == 1.0
    for c in range(16):
        assert len(np.unique(q[c])) <= 2 ** bits - 1
    err = ((q * scale[:, None, None, None] - w) ** 2).sum()
    amax = np.abs(w).reshape(16, -1).max(1)
    s_max = np.where(amax > 0, amax / qmax(bits), 1.0)[:, None, None, None]
    err_max = ((np.clip(np.rint(w / s_max), -qmax(bits), qmax(bits)) * s_max - w) ** 2).sum()
    assert err <= err_max + 1e-12


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_asymmetric_levels_use_every_code_and_never_add_error(bits):
    """Asymmetric levels add −2^(k−1): at 2 bits {−2, −1, 0, 1}, all 4 codes. Zeros stay zero,
    and no channel's error exceeds the symmetric levels' (whose scales stay candidates)."""
    from exporters.quantize import lowest

    rng = np.random.default_rng(10 + bits)
    w = rng.standard_t(3, (32, 40)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    sym_q, sym_s = quantize_channels(w, bits, axis=0)
    q, scale = quantize_channels(w, bits, axis=0, asymmetric=True)
    assert q.min() == lowest(bits, True) == -2 ** (bits - 1) and q.max() <= qmax(bits)
    if bits <= 3:  # few codes: some channel uses every one of them
        assert max(len(np.unique(row)) for row in q) == 2 ** bits
    assert np.all(q[w == 0] == 0)
    err = ((q * scale[:, None] - w) ** 2).sum(1)
    sym_err = ((sym_q * sym_s[:, None] - w) ** 2).sum(1)
    assert np.all(err <= sym_err + 1e-12) and err.sum() < sym_err.sum()


@pytest.mark.parametrize("bits,asymmetric", [(8, False), (4, False), (3, True), (2, True)])
def test_weights_on_a_grid_are_stored_on_that_grid(bits, asymmetric):
    """Learnt scales (qat) leave each channel on its own grid, whose largest level need not be
    the code's largest: the quantizer finds a grid holding every weight exactly, instead of
    rounding again."""
    from exporters.quantize import lowest

    rng = np.random.default_rng(bits)
    low, top = lowest(bits, asymmetric), qmax(bits)
    levels = rng.integers(low, top + 1, (12, 30)).astype(np.int8)
    levels[:, 0] = rng.integers(1, top + 1, 12)  # no channel all zero; peaks below top too
    levels[:, 1:][np.abs(levels[:, 1:]) > np.abs(levels[:, :1])] = 0
    scale = rng.uniform(0.01, 0.2, 12).astype(np.float32)
    w = (levels * scale[:, None]).astype(np.float32)
    q, s = quantize_channels(w, bits, axis=0, asymmetric=asymmetric)
    np.testing.assert_allclose(q * s[:, None], w, rtol=1e-6, atol=0)


def test_quantizer_axis_and_int4_and_int2_packing():
    w = np.arange(-12, 12, dtype=np.float32).reshape(4, 6)
    q0, s0 = quantize_channels(w, 4, axis=1)
    assert s0.shape == (6,)
    assert np.array_equal(quantize_channels(w.T.copy(), 4, axis=0)[0], q0.T)
    vals = np.array([-7, -1, 0, 3, 7, -8, 5], np.int8)
    assert np.array_equal(unpack_ints(pack_ints(vals, 4), len(vals), 4), vals)
    assert pack_ints(np.array([1, 2], np.int8), 4) == bytes([0x21])  # first value, low nibble
    vals = np.array([1, -1, 0, -2, 1], np.int8)
    assert np.array_equal(unpack_ints(pack_ints(vals, 2), len(vals), 2), vals)
    assert pack_ints(vals[:4], 2) == bytes([0b10_00_11_01])  # first value, lowest two bits
    assert [container_bits(b) for b in (8, 4, 3, 2)] == [8, 4, 4, 2]


def test_information_floor_counts_positions_values_scales_and_dense_parameters():
    import math
    from types import SimpleNamespace

    from exporters.run import _floor

    # a 4x2 weight with 2 non-zeros (one scale per output row) and a 2-value bias; a non-zero
    # 4-bit level is one of 14 (-7..7 but 0), a non-zero asymmetric 2-bit one of 3
    src = SimpleNamespace(layers=[{"name": "w", "size": 8, "nnz": 2, "channels": 4}],
                          params={"w": 8, "b": 2})
    positions = math.log2(math.comb(8, 2))
    assert _floor(src, 4) == pytest.approx((positions + 2 * math.log2(14)) / 8 + 4 * 4 + 2 * 4)
    assert _floor(src, 2, asymmetric=True) == pytest.approx(
        (positions + 2 * math.log2(3)) / 8 + 4 * 4 + 2 * 4)
    assert _floor(src, 32) == pytest.approx((positions + 2 * 32) / 8 + 2 * 4)  # no scales


def test_config_rejects_what_a_format_cannot_store():
    with pytest.raises(ConfigError, match="onnx cannot store 4-bit weights with the dynamic "
                                          "scheme; supported: .*tflite dynamic: 8,4,3,2"):
        ExportConfig(format="onnx", bits=4, scheme="dynamic")
    with pytest.raises(ConfigError, match="static"):
        ExportConfig(format="tflite", bits=4, scheme="static")
    with pytest.raises(ConfigError, match="unknown format 'pt'.*; unknown bits 5;"):
        ExportConfig(format="pt", bits=5)
    cfg = ExportConfig(format="tflite", bits=3, scheme="dynamic", keep_float=["a"])
    assert ExportConfig.from_json(cfg.to_json()) == cfg


# ---------------------------------------------------------------- every format × bits


def _check_export(res, run: Path, cfg: ExportConfig) -> None:
    m = res.manifest
    assert res.path.exists() and json.loads(res.manifest_path.read_text()) == m
    assert m["sha256"] == sha256_file(res.path)
    assert m["sizes"]["bytes"] == res.path.stat().st_size
    assert m["source"]["model_sha256"] == sha256_file(run / "model.safetensors")
    assert (m["bits"], m["format"], m["scheme"]) == (cfg.bits, cfg.format, cfg.scheme)
    stored = INSPECT[cfg.format](res.path)
    assert storage_problems(res.path, cfg.format, cfg.bits) == []  # what evaluate checks
    assert [w["name"] for w in m["tensors"]] == [w.name for w in stored]
    ints = [w for w in stored if w.storage.startswith("int")]
    run_nnz = {}
    for name, t in load_tensors(run / "model.safetensors").items():
        if name in {layer["name"] for layer in json.loads((run / "report.json")
                                                          .read_text())["layers"]}:
            run_nnz.setdefault(t.numel(), []).append(int(torch.count_nonzero(t)))
    if cfg.bits == 32:
        assert not ints and m["parity"]["max_abs_diff"] <= 1e-3 * max(
            1, m["parity"]["max_abs_logit"])
        assert m["parity"]["agreement"] == 1.0
        file_nnz = {}
        for w in stored:
            file_nnz.setdefault(w.numel, []).append(w.nnz)
        for size, nnz in run_nnz.items():  # float32 keeps every non-zero, nothing more
            assert sorted(file_nnz[size]) == sorted(nnz)
    elif cfg.bits == 16:
        assert not ints and {w.storage for w in stored} == {"float16"}
        assert m["parity"]["agreement"] >= 0.95
    else:
        assert ints, "nothing was quantized"
        # int2 at 2 bits where a dequantization reads the weight (the dynamic scheme's hybrid
        # kernels read int4)
        container = max(container_bits(cfg.bits), 4 if cfg.scheme == "dynamic" else 2)
        # a TFLite weight in sparse storage holds its levels as int8 (LiteRT's DENSIFY)
        tflite_sparse = [w for w in ints if w.sparse and cfg.format == "tflite"]
        sparse = {w.storage for w in tflite_sparse}
        assert sparse <= {"int8"}
        assert {w.storage for w in ints if w not in tflite_sparse} <= {f"int{container}"}
        assert m["container_bits"] == (8 if sparse else container)
        assert m["effective_bits"] <= cfg.bits
        codes = 2 ** cfg.bits - (0 if cfg.levels == "asymmetric" else 1)
        for w in ints:
            assert w.levels <= codes and w.zero_scales == 0
        for w in stored:  # quantization may round weights to zero, never revive one
            if w.numel in run_nnz:
                assert w.nnz <= max(run_nnz[w.numel])
        assert m["sizes"]["floor_bytes"] < m["sizes"]["torch_fp32_bytes"]
    assert m["parity"]["samples"] > 0
    if cfg.bits == 8:  # 8 bits keep the float model's decisions (a broken quantizer reads
        # chance, 0.25); static int8 also rounds the activations, on 32 calibration samples,
        # and a tiny model trained for 4 epochs has near-ties among its 50 parity samples
        floor = 0.8 if cfg.scheme == "static" else 0.9
        assert m["parity"]["agreement"] >= floor, m["parity"]


@pytest.mark.parametrize("model,fmt", [
    ("cnn", "onnx"), ("cnn", "tflite"), ("mlp", "onnx"), ("mlp", "tflite"), ("bert", "onnx"),
    # siblings: bert to onnx (the text model's export) and cnn, mlp to tflite
    pytest.param("bert", "tflite", marks=pytest.mark.slow)])
def test_every_bit_width_exports_loads_and_reads_back(runs, model, fmt, tmp_path):
    sizes = {}
    for bits in (32, 16, 8, 4, 3, 2):
        cfg = ExportConfig(format=fmt, bits=bits, **FAST)
        res = export(cfg, runs[model], out=tmp_path / f"m{bits}.{fmt}")
        _check_export(res, runs[model], cfg)
        sizes[bits] = res.manifest["sizes"]["bytes"]
    assert sizes[32] > sizes[16] > sizes[8] > sizes[4]


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_finetuning_trains_against_the_stored_levels_with_pruned_weights_held_at_zero(
        runs, fmt, tmp_path, monkeypatch):
    """--finetune-epochs: after every step each pruned weight is exactly zero; the file stores
    the levels the model was fine-tuned with (its logits are the fine-tuned model's with those
    levels), and at 2 bits it agrees with the run's model more than rounding alone."""
    import exporters.qat as qat

    run = runs["cnn"]
    zero = {k.removesuffix(".weight"): v == 0
            for k, v in load_tensors(run / "model.safetensors").items()
            if k.endswith(".weight")}
    steps, scales = [], []

    def on_step(model: torch.nn.Module) -> None:
        for name, m in qat.quantized_modules(model, set()):  # those left float too
            assert not qat.float_weight(m)[zero[name]].any(), name
        steps.append(1)
        scales.append([m.parametrizations.weight[0].scale.detach().clone()
                       for _, m in qat.quantized_modules(model, set())
                       if parametrize.is_parametrized(m, "weight")])

    finetune = qat.finetune
    monkeypatch.setattr(qat, "finetune", lambda *a, **kw: finetune(*a, **kw, on_step=on_step))
    plain = export(ExportConfig(format=fmt, bits=2, **FAST), run, out=tmp_path / f"p.{fmt}")
    cfg = ExportConfig(format=fmt, bits=2, finetune_epochs=3, finetune_lr=1e-3, **FAST)
    tuned = export(cfg, run, out=tmp_path / f"t.{fmt}")
    _check_export(tuned, run, cfg)
    record = tuned.manifest["finetune"]
    members = record["samples"]["count"]
    assert len(steps) == 3 * -(-members // 32) > 0  # every step of 3 epochs, batch 32
    # the step sizes are learnt: every quantized layer's scales moved
    assert scales[0] and all(not torch.equal(a, b) for a, b in zip(scales[0], scales[-1],
                                                                   strict=True))
    # fine-tuned against exactly the layers the file stores as integers
    stored = INSPECT[fmt](tuned.path)
    assert set(record["layers"]) == {w.module for w in stored if w.storage.startswith("int")}
    exact = record["parity_with_finetuned"]
    assert exact["agreement"] == 1.0
    assert exact["max_abs_diff"] <= 1e-4 * max(1.0, exact["max_abs_logit"])
    assert tuned.manifest["parity"]["agreement"] > plain.manifest["parity"]["agreement"], (
        tuned.manifest["parity"], plain.manifest["parity"])
    assert cfg.name().endswith("-ft3") and plain.manifest["finetune"] is None


@pytest.mark.parametrize("bits", [3, 2])
def test_asymmetric_finetuning_leaves_folded_channels_storable(bits):
    """A batch norm with a negative gamma negates its channel when the exporter folds it, so
    the level -2^(k-1) would become +2^(k-1), which the code cannot hold: fine-tuning mirrors
    those channels' levels, and the folded weights are stored exactly."""
    import exporters.qat as qat

    torch.manual_seed(bits)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 36, 4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -1.0, 0.5, -2.0, 1.5, -0.5]))
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    assert qat.folded_signs(model)[id(model[0])].tolist() == [False, True, False, True, False,
                                                              True]
    x = np.random.default_rng(0).random((64, 1, 8, 8)).astype(np.float32)
    given = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the caller's model (the teacher) comes back as given: values and modes
    model[1].eval()
    modes = [m.training for m in model.modules()]
    tuned = qat.finetune(model, lambda idx: x[idx], np.arange(64), x[:8], bits, 2, 1e-2, 16,
                         0, set(), asymmetric=True, progress=False)
    assert [m.training for m in model.modules()] == modes and tuned.model is not model
    assert all(torch.equal(v, given[k]) for k, v in model.state_dict().items())
    conv, bn = tuned.model[0], tuned.model[1]
    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    folded = (conv.weight.detach() * factor[:, None, None, None]).numpy()
    q, scale = quantize_channels(folded, bits, 0, asymmetric=True)
    np.testing.assert_allclose(q * scale[:, None, None, None], folded, rtol=1e-5, atol=1e-7)


def test_sparse_encoding_round_trips_through_long_runs_of_zeros():
    from safeexport.stored import sparse_positions

    w = np.zeros((7, 300), np.float32)
    w[0, 0], w[0, 1], w[3, 299], w[6, 1] = 1.5, -2.0, 3.0, 4.0  # runs of 1 to 1,000 zeros
    gaps, values = onnx_format.sparse_encode(w)
    assert gaps.dtype == np.uint8 and len(gaps) == len(values) < 12  # 4 values, a few stones
    dense = np.zeros(w.size, np.float32)
    dense[sparse_positions(gaps)] = values
    assert np.array_equal(dense.reshape(w.shape), w)
    assert onnx_format.sparse_encode(np.zeros((2, 3)))[0].size == 0


@pytest.mark.parametrize("model,fmt,bits", [
    *(("cnn", "onnx", b) for b in (32, 16, 8, 4, 2)), *(("mlp", "tflite", b) for b in (8, 4, 2)),
    ("cnn", "tflite", 4)])
def test_sparse_storage_holds_the_same_weights_in_fewer_bytes(runs, model, fmt, bits, tmp_path):
    files = {sparse: export(ExportConfig(format=fmt, bits=bits, sparse_storage=sparse,
                                         **FAST), runs[model], out=tmp_path / f"{sparse}.{fmt}")
             for sparse in (True, False)}
    on, off = (files[s].manifest for s in (True, False))
    assert on["sparse_storage"]["on"] and on["sparse_storage"]["tensors"]
    assert off["sparse_storage"] == {"on": False, "tensors": []}
    # the runs keep 20%; a 2-bit TFLite weight stays dense (int2, a quarter byte a weight)
    # wherever DENSIFY's int8 levels and their indices would take more: most of them
    gain = 1.0 if fmt == "tflite" and bits == 2 else 0.75
    assert on["sizes"]["bytes"] < gain * off["sizes"]["bytes"]
    # the same weights, read back from each file's own bytes, and the same logits
    fields = ("name", "effective_bits", "levels", "numel", "nnz", "zero_scales",
              *(("storage",) if fmt == "onnx" else ()))  # TFLite's sparse int4 is int8
    stored = {s: [{k: getattr(w, k) for k in fields} for w in INSPECT[fmt](f.path)]
              for s, f in files.items()}
    assert stored[True] == stored[False]
    assert {w.name for w in INSPECT[fmt](files[True].path) if w.sparse} == \
        set(on["sparse_storage"]["tensors"])
    if fmt == "tflite":  # level by level, scale by scale (a CNN's convolutions are compressed
        # along their output channels, in another traversal order than the natural one)
        read = {s: tflite_stored(read_tflite(f.path.read_bytes())) for s, f in files.items()}
        for a, b in zip(read[True], read[False], strict=True):
            assert a[0] == b[0] and a[3] == b[3]
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_array_equal(a[4], b[4])
        # each weight named after its module (not litert-torch's whole scope)
        assert all(w.name == w.module for w in INSPECT[fmt](files[True].path))
        if model == "cnn":  # each distinct vector stored once, where the schema's own writer
            # repeats them: the last convolution's and the first linear layer's 128 zero points
            from ai_edge_litert.tools import flatbuffer_utils

            ours = files[True].path.read_bytes()
            stock = flatbuffer_utils.convert_object_to_bytearray(read_tflite(ours))
            assert len(ours) <= len(stock) - 128 * 8
    shape = (1, 8, 8) if model == "cnn" else (30,)
    inputs = np.random.default_rng(0).random((8, *shape)).astype(np.float32)
    logits = {s: open_runtime(f.path)(inputs) for s, f in files.items()}
    np.testing.assert_allclose(logits[True], logits[False], rtol=0, atol=1e-6)
    _check_export(files[True], runs[model], ExportConfig(format=fmt, bits=bits, **FAST))


def test_a_sparse_decoding_that_does_not_compute_what_it_claims_is_not_read(runs, tmp_path):
    import onnx
    from onnx import numpy_helper

    res = export(ExportConfig(format="onnx", bits=8, **FAST), runs["cnn"],
                 out=tmp_path / "m.onnx")
    proto = onnx.load(str(res.path))
    for init in proto.graph.initializer:  # every position one further than the values say
        if init.name == "sparse_one":
            init.CopyFrom(numpy_helper.from_array(np.array([2], np.int64), "sparse_one"))
    onnx.save(proto, str(tmp_path / "tampered.onnx"))
    read = {w.name for w in onnx_format.inspect(tmp_path / "tampered.onnx")}
    assert not read & set(res.manifest["sparse_storage"]["tensors"])


def test_a_malformed_onnx_weight_is_refused_in_one_error(runs, tmp_path):
    import onnx

    res = export(ExportConfig(format="onnx", bits=2, sparse_storage=False, **FAST), runs["cnn"],
                 out=tmp_path / "m.onnx")
    proto = onnx.load(str(res.path))
    for init in proto.graph.initializer:
        if init.name.endswith("_q"):  # int2 levels: fewer bytes than their shape needs
            init.raw_data = init.raw_data[:1]
    onnx.save(proto, str(tmp_path / "t.onnx"))
    with pytest.raises(ExportError, match="t.onnx is not a valid ONNX file"):
        onnx_format.inspect(tmp_path / "t.onnx")


def test_a_malformed_tflite_sparse_weight_is_refused_in_one_error(runs, tmp_path):
    from ai_edge_litert.tools import flatbuffer_utils

    res = export(ExportConfig(format="tflite", bits=8, **FAST), runs["mlp"],
                 out=tmp_path / "m.tflite")
    sparse = set(res.manifest["sparse_storage"]["tensors"])
    assert sparse

    def tampered(change) -> Path:
        model = read_tflite(res.path.read_bytes())
        change(model)
        path = tmp_path / f"t{len(list(tmp_path.iterdir()))}.tflite"
        path.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
        return path

    def no_segments(model):
        for t in model.subgraphs[0].tensors:
            if t.sparsity is not None:
                t.sparsity.dimMetadata[-1].arraySegments = None

    # a layout it cannot decode is not read as a weight at all
    assert not {w.name for w in INSPECT["tflite"](tampered(no_segments))} & sparse

    def densify_without_output(model):
        for op in model.subgraphs[0].operators:
            if op.inputs is not None and len(op.inputs) == 1 and len(op.outputs) == 1 \
                    and model.subgraphs[0].tensors[op.inputs[0]].sparsity is not None:
                op.outputs = []

    with pytest.raises(ExportError, match="is not a valid TFLite file"):
        INSPECT["tflite"](tampered(densify_without_output))


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_asymmetric_exports_store_every_code_in_the_smallest_container(runs, fmt, tmp_path):
    """3 and 2 bits with asymmetric levels: int4 and int2 containers holding up to 8 and 4
    levels per channel, read back as 3 and 2 effective bits."""
    for bits, levels in ((3, "asymmetric"), (2, "asymmetric")):
        # dense storage: TFLite's sparse storage holds levels as int8
        cfg = ExportConfig(format=fmt, bits=bits, levels=levels, sparse_storage=False, **FAST)
        res = export(cfg, runs["cnn"], out=tmp_path / f"{bits}{levels}.{fmt}")
        _check_export(res, runs["cnn"], cfg)
        ints = [w for w in INSPECT[fmt](res.path) if w.storage.startswith("int")]
        assert {w.storage for w in ints} == {f"int{container_bits(bits)}"}
        assert res.manifest["container_bits"] == container_bits(bits)
        assert res.manifest["effective_bits"] == bits
        if fmt == "onnx" and bits == 2:  # int2: opset 25, and the IR version it needs
            import onnx

            proto = onnx.load(str(res.path))
            assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} \
                == {25}
            assert proto.ir_version >= onnx.helper.find_min_ir_version_for(proto.opset_import)
        assert max(w.levels for w in ints) > 2 ** bits - 1  # the extra code is used
        assert res.manifest["weight_quantizer"].endswith("asymmetric levels")


def test_finetuning_is_refused_where_no_weights_of_ours_are_stored():
    for bad, pattern in ((dict(bits=32), "not 32-bit weight-only"),
                         (dict(bits=8, scheme="static"), "not 8-bit static"),
                         (dict(bits=4, finetune_epochs=-1), "finetune_epochs must be >= 0"),
                         (dict(bits=4, finetune_lr=0.0), "finetune_lr must be positive"),
                         (dict(bits=16, levels="asymmetric"), "asymmetric levels are for")):
        with pytest.raises(ConfigError, match=pattern):
            ExportConfig(**{"finetune_epochs": 2, **bad})


def test_zero_channels_survive_int4(runs, tmp_path):
    """A conv filter and a linear row pruned entirely get scale 1, stay zero, and XNNPACK (and
    onnxruntime) run the int4 file."""
    run = tmp_path / "run"
    shutil.copytree(runs["cnn"], run)
    rd = RunDir(run)
    state = load_tensors(rd.model)
    state["features.4.weight"][3] = 0
    state["classifier.0.weight"][7] = 0
    save_tensors(rd.model, state)
    report = rd.read_report()
    report["files"]["model.safetensors"] = sha256_file(rd.model)
    write_json(rd.report, report)
    for fmt, scheme in (("tflite", "weight-only"), ("tflite", "dynamic"),
                        ("onnx", "weight-only")):
        # dense storage: the initializers below are read as they are
        res = export(ExportConfig(format=fmt, bits=4, scheme=scheme, sparse_storage=False,
                                  **FAST), run, out=tmp_path / f"z-{fmt}-{scheme}.{fmt}")
        stored = {w.module: w for w in INSPECT[fmt](res.path)}
        assert all(w.zero_scales == 0 for w in stored.values())
        # the runtime ran the whole parity sample (the test split has 50 samples)
        assert res.manifest["parity"]["samples"] == min(64, len(Splits.load(rd.splits).test))
    from onnx import load, numpy_helper

    proto = load(str(tmp_path / "z-onnx-weight-only.onnx"))
    q = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert not q["features.4.weight_q"].astype(np.int8)[3].any()
    assert q["features.4.weight_scale"][3] == 1.0


@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_static_int8_and_kept_float_layers(runs, fmt, tmp_path):
    cfg = ExportConfig(format=fmt, bits=8, scheme="static", **FAST)
    res = export(cfg, runs["cnn"], out=tmp_path / f"s.{fmt}")
    _check_export(res, runs["cnn"], cfg)
    assert res.manifest["calibration"] == {"split": "known_members", "samples": 32}
    keep = ExportConfig(format=fmt, bits=4, keep_float=["classifier.2"], **FAST)
    res = export(keep, runs["cnn"], out=tmp_path / f"k.{fmt}")
    stored = {w.module: w.storage for w in INSPECT[fmt](res.path)}
    assert stored["classifier.2"] == "float32" and stored["classifier.0"] == "int4"


def test_runtime_pads_a_fixed_batch_file(runs, tmp_path):
    res = export(ExportConfig(format="tflite", bits=32, batch_size=4, **FAST), runs["mlp"],
                 out=tmp_path / "b4.tflite")
    rt = open_runtime(res.path)
    assert rt.batch_size == 4 and rt.name == "litert"
    x = np.random.default_rng(0).random((7, 30)).astype(np.float32)
    onnx_res = export(ExportConfig(format="onnx", bits=32, **FAST), runs["mlp"],
                      out=tmp_path / "b.onnx")
    assert np.allclose(rt(x), open_runtime(onnx_res.path)(x), atol=1e-4)


def test_agreement_floor_fails_or_warns(runs, tmp_path):
    cfg = ExportConfig(format="onnx", bits=2, parity_samples=64, min_agreement=1.0)
    out = tmp_path / "exports" / "x.onnx"
    with pytest.raises(ExportError, match="agreement with PyTorch is .* below the floor 1.0.*"
                       "--levels asymmetric .* and --finetune-epochs 10 .* may recover it"):
        export(cfg, runs["bert"], out=out)
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing left behind
    # an export that tried both is told only how to lower the floor or keep the file
    from exporters.run import _parity_problems

    low = {"agreement": 0.5, "acc_before": 0.9, "acc_after": 0.5}
    tried = replace(cfg, levels="asymmetric", finetune_epochs=1)
    assert _parity_problems(low, tried) == [
        "top-1 agreement with PyTorch is 0.500, below the floor 1.0 (accuracy 0.900 -> 0.500); "
        "--min-agreement lowers the floor, --warn-only keeps the file"]
    assert "--levels asymmetric" not in _parity_problems(low, replace(cfg, bits=4))[0]
    res = export(replace(cfg, warn_only=True), runs["bert"], out=out)
    assert res.manifest["warnings"] and out.exists()


# ---------------------------------------------------------------- bad input


def test_bad_inputs_give_one_clear_line(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["mlp"], run)
    one_error_line(cli("export", "--run", tmp_path / "nope"), "does not exist")
    one_error_line(cli("export", "--run", run, "--format", "onnx", "--bits", "4", "--scheme",
                  "dynamic"), "onnx cannot store 4-bit weights .*supported:")
    one_error_line(cli("export", "--run", run, "--keep-float", "conv9"),
              "no such layer; the run's layers are net.1, net.3")
    one_error_line(cli("export", "--run", run, "--out", tmp_path / "x.tflite"),
                   "must end in .onnx")
    existing = tmp_path / "e.onnx"
    existing.write_bytes(b"keep me")
    one_error_line(cli("export", "--run", run, "--out", existing),
                   "already exists; pass --overwrite")
    assert existing.read_bytes() == b"keep me"
    # a model file that is not the one the run recorded
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (run / "model.safetensors").write_bytes(bytes(data))
    one_error_line(cli("export", "--run", run), "does not match its record in report.json")
    (run / "report.json").unlink()
    one_error_line(cli("export", "--run", run), "not a finished run \\(missing report.json\\)")
    assert not (run / "exports").exists()  # nothing partial anywhere


def test_converter_rejections_name_the_op(tmp_path):
    class Eigen(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]

    model = torch.nn.Sequential(torch.nn.Identity(), Eigen())
    x = np.random.default_rng(0).random((2, 3, 3)).astype(np.float32)
    for fmt in (onnx_format, tflite_format):
        with pytest.raises(ExportError, match="cannot convert Sequential: operator "
                                              "aten._?linalg_eigh in layer 1 is not supported"):
            fmt.convert(model, x, 32, "weight-only", set(), None)


def test_cli_all_prints_every_variant(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["mlp"], run)
    r = cli("export", "--run", run, "--all", "--parity-samples", "32", "--min-agreement",
            "0.99")
    rows = [line for line in r.stdout.splitlines() if line.startswith("model-")]
    assert len(rows) == 12, r.stdout + r.stderr
    failed = [line for line in rows if "FAILED" in line]
    assert r.returncode == (1 if failed else 0)
    assert len(list((run / "exports").glob("*.json"))) == 12 - len(failed)
    assert all("agreement" in line for line in failed)
