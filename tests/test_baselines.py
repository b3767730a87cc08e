"""The baselines of `safeexport compress --method`: each trains a tiny model and writes a run
directory that export and evaluate accept, on the same split and seeds as SafeCompress."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compressor import compress
from compressor.masking import erk_counts, maskable
from compressor.train import predict_logits
from device_eval import evaluate
from device_eval.config import EvalConfig
from exporters import export
from exporters.config import ExportConfig
from safeexport.errors import ConfigError
from safeexport.rundir import RunDir
from safeexport.runio import load_model, open_run
from tests.conftest import FAST_EXPORT, RunsOnDemand, cli, one_error_line, tiny_config
from tests.test_compress import _rebuild

BASELINES = ["dense", "prune", "pr-dp", "pr-advreg", "pr-dmp", "kd", "kd-dp", "kd-advreg",
             "kd-dmp", "mia-pr"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> RunsOnDemand:
    root = tmp_path_factory.mktemp("baselines")
    return RunsOnDemand(("safecompress", *BASELINES), lambda m: compress(
        tiny_config(method=m, retrain_epochs=2), root / m).path)


def _report(run) -> dict:
    return json.loads((run / "report.json").read_text())


@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_writes_a_run_that_exports_and_evaluates(runs, method, tmp_path):
    """The run is complete and intact, its model.json rebuilds the saved model (a narrow
    student, Opacus's GroupNorm), and export and evaluate work on it as on any run."""
    run = runs[method]
    report = _report(run)
    assert report["method"] == method
    assert not (run / "curve.png").exists()  # no mask updates, so no learning curve to draw
    model = load_model(open_run(run))  # checks the recorded sha256, rebuilds from model.json
    assert sum(int((p != 0).sum()) for _, p in maskable(model)) == \
        report["compressed"]["nonzero_weights"]
    # 4 balanced classes, chance 0.25; DP-SGD's noise on 200 members may sit near chance
    assert report["compressed"]["task_acc"] > (0.15 if "dp" in method else 0.3)
    exp = export(ExportConfig(format="onnx", bits=8, **FAST_EXPORT), run)
    res = evaluate(exp.path, EvalConfig(), json_out=tmp_path / "e.json")
    for key in ("task_acc", "train_acc", "mia_acc"):
        assert res.report["before"][key] == pytest.approx(report["compressed"][key]), key


def test_dense_keeps_every_weight_and_prune_keeps_the_budget(runs):
    dense, pruned = _rebuild(runs["dense"]), _rebuild(runs["prune"])
    assert _report(runs["dense"])["compressed"]["density"] == 1.0
    assert "dense" not in _report(runs["dense"])  # the method is its own reference
    weights = [p for _, p in maskable(pruned)]
    target = sum(erk_counts([tuple(w.shape) for w in weights], 0.2))
    assert sum(int((w != 0).sum()) for w in weights) <= target
    assert _report(runs["prune"])["compressed"]["nonzero_weights"] == target
    assert sum(int((p != 0).sum()) for _, p in maskable(dense)) > 4 * target


def test_prune_starts_from_the_dense_reference(runs):
    """Same seeds and split for every method: the prune baseline's dense model is the one
    SafeCompress's run trains as its reference, and the dense method trains it too."""
    ref = load_file(str(runs["safecompress"] / "dense.safetensors"))
    started_from = load_file(str(runs["prune"] / "dense.safetensors"))
    assert all(torch.equal(ref[k], started_from[k]) for k in ref)
    own = load_file(str(runs["dense"] / "model.safetensors"))
    assert all(torch.equal(ref[k], own[k]) for k in ref)
    assert _report(runs["prune"])["dense"] == _report(runs["safecompress"])["dense"] | {
        "wall_time_s": _report(runs["prune"])["dense"]["wall_time_s"]}
    for run in runs.values():
        assert (RunDir(run).splits.read_bytes() ==
                RunDir(runs["safecompress"]).splits.read_bytes())


def test_each_report_counts_the_optimizer_steps_that_made_its_model(runs):
    total = _report(runs["dense"])["training"]["iterations"]
    steps = {m: _report(runs[m])["compressed"]["optimizer_steps"] for m in runs}
    assert steps["dense"] == steps["safecompress"] == total > 0
    assert _report(runs["safecompress"])["dense"]["optimizer_steps"] == total
    for m in ("prune", "pr-advreg", "pr-dmp"):  # the dense model's steps, then the retraining
        assert steps[m] == total + _report(runs[m])["two_step"]["iters"] > total, m
    assert steps["pr-dp"] == total + _report(runs["pr-dp"])["dp"]["steps"]
    assert steps["kd"] == _report(runs["kd"])["two_step"]["iters"]  # from scratch
    admm = _report(runs["mia-pr"])["admm"]
    assert steps["mia-pr"] == total + admm["admm_iters"] + admm["retrain_iters"]


def test_pruning_then_fine_tuning_changes_only_kept_weights(runs):
    """The pruned model's non-zeros sit where the dense model's largest weights were (per
    layer), and fine-tuning moved them."""
    dense = load_file(str(runs["prune"] / "dense.safetensors"))
    pruned = _rebuild(runs["prune"])
    for name, p in maskable(pruned):
        kept = p.detach() != 0
        k = int(kept.sum())
        top = torch.zeros(kept.numel(), dtype=torch.bool)
        top[torch.topk(dense[name].abs().flatten(), k).indices] = True
        assert int((top.view_as(kept) & kept).sum()) >= 0.99 * k, name
        assert not torch.equal(p.detach()[kept], dense[name][kept]), name


def test_unknown_method_is_one_clear_line(tmp_path):
    r = cli("compress", "--method", "magic", "--out", tmp_path / "run")
    one_error_line(r, r"Invalid value for '--method': 'magic' is not one of 'safecompress', "
                      r"'dense', 'prune', 'pr-dp', ")
    assert not (tmp_path / "run").exists()


def test_resume_retrains_an_interrupted_baseline_to_the_same_model(runs, tmp_path):
    """Baselines keep no checkpoint: --resume on an unfinished one trains it again, from the
    same seeds, to the same model."""
    run = tmp_path / "prune"
    compress(tiny_config(method="prune", retrain_epochs=2), run)
    (run / "report.json").unlink()
    compress(tiny_config(method="safecompress"), run, resume=True)  # config.json wins
    assert _report(run)["method"] == "prune"
    assert (run / "model.safetensors").read_bytes() == \
        (runs["prune"] / "model.safetensors").read_bytes()


def test_dp_reports_the_accountants_epsilon_which_grows_with_steps(runs):
    """ε after each epoch rises, ends at (not above) the target, and is what Opacus's RDP
    accountant gives for the recorded noise, sampling rate and steps; BatchNorm was folded
    into the convolutions of the pruned model (Pr-DP) or replaced by Opacus's GroupNorm in the
    student trained from scratch (KD-DP), and model.json says which."""
    from opacus.accountants import RDPAccountant

    for method in ("pr-dp", "kd-dp"):
        report = _report(runs[method])
        dp = report["dp"]
        eps = dp["epsilon_per_epoch"]
        assert len(eps) == dp["epochs"] >= 2
        assert all(b > a for a, b in zip(eps, eps[1:], strict=False))
        assert dp["epsilon"] == eps[-1] <= dp["target_epsilon"] * 1.01
        accountant = RDPAccountant()
        accountant.history = [(dp["noise_multiplier"], dp["sample_rate"], dp["steps"])]
        assert accountant.get_epsilon(dp["delta"]) == pytest.approx(dp["epsilon"], rel=1e-6)
        spec = json.loads((runs[method] / "model.json").read_text())
        assert spec["norm"] == {"pr-dp": "bn-folded", "kd-dp": "opacus-fix"}[method]
        model = load_model(RunDir(runs[method]))
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
        assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == \
            (method == "kd-dp")


def test_dp_noise_is_calibrated_to_the_target_epsilon(tmp_path):
    """A smaller ε buys more noise: the same run at ε=1 adds more noise than at ε=8."""
    noise = {}
    for eps in (1.0, 8.0):
        run = compress(tiny_config(method="pr-dp", retrain_epochs=2, dp_epsilon=eps,
                                   dense_reference=False), tmp_path / str(eps))
        dp = _report(run.path)["dp"]
        assert dp["epsilon"] <= eps * 1.01
        noise[eps] = dp["noise_multiplier"]
    assert noise[1.0] > 2 * noise[8.0]


def prepare(tmp_path, **overrides):
    from compressor.setup import prepare

    return prepare(tiny_config(**overrides), RunDir(tmp_path / "run"), False, False, False)[1]


def test_advreg_target_step_lowers_the_attackers_gain(tmp_path):
    """The sign of the min-max game: with the attacker held fixed, the target's steps on its
    AdvReg loss lower the attacker's gain on the members (and the loss falls with the gain);
    the same steps with the sign flipped raise it."""
    from compressor.baselines.defences import AdvReg, advreg_objective, membership_gain
    from compressor.baselines.students import Targets
    from compressor.train import batch_tensors, train_batches

    # outputs not saturated; one attacker step per call, as the attacker is frozen below
    setup = prepare(tmp_path, advreg_alpha=20.0, dataset="digits", advreg_attack_steps=1)
    ce, gain = torch.tensor(1.0), torch.tensor([-0.2, -0.6])
    assert advreg_objective(ce, gain[1], 1.0) < advreg_objective(ce, gain[0], 1.0)

    members = setup.splits.members
    batch = members[:64]

    def gain_before_after(sign: float) -> tuple[float, float]:
        torch.manual_seed(0)
        state = setup.new_state(setup.new_model("dense-init"))
        setup.train(state, "warm", 40, setup.lr, "warm-up")
        game = AdvReg(setup, state.model, Targets(setup, members, None))
        for g in game.optimizer.param_groups:
            g["lr"] = 1e-2
        for _ in range(40):  # an attacker that has learnt something, then frozen
            game(members[torch.randint(len(members), (64,)).numpy()])
        for g in game.optimizer.param_groups:
            g["lr"] = 0.0

        def measure() -> float:
            state.model.eval()
            x, y = batch_tensors(setup.ds, batch, setup.device)
            with torch.no_grad():
                return float(membership_gain(game.attacker,
                                             torch.softmax(state.model(x), 1), y))

        before = measure()
        setup.cfg.advreg_alpha = sign * 20.0
        train_batches(state, [batch] * 10, game, lambda i: 0.05)
        return before, measure()

    before, after = gain_before_after(+1.0)
    assert after < before - 0.01
    before, after = gain_before_after(-1.0)  # the reference code's sign
    assert after > before + 0.01


def test_advreg_attacker_learns_during_the_game(tmp_path):
    """On a target that memorised random labels, the inner attacker (k steps per target
    step) tells members from reference non-members well above chance while the game runs; a
    single step per target step (the old game) stays near chance."""
    from compressor.baselines.defences import AdvReg
    from compressor.baselines.students import Targets

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "r.npz", x=(rng.random((400, 40)) < 0.5).astype(np.float32),
             y=rng.integers(0, 4, 400))
    acc = {}
    for steps in (5, 1):
        setup = prepare(tmp_path / str(steps), dataset=f"npz:{tmp_path / 'r.npz'}",
                        model="mlp", advreg_attack_steps=steps, advreg_alpha=0.0)
        torch.manual_seed(0)
        state = setup.new_state(setup.new_model("dense-init"))
        setup.train(state, "memorise", 150, setup.lr, "memorise")
        game = AdvReg(setup, state.model, Targets(setup, setup.splits.members, None))
        setup.train(state, "advreg", 30, setup.lr * 0.1, "AdvReg", game)
        acc[steps] = float(np.mean(game.attacker_acc[-10:]))
    assert acc[5] > 0.7, acc
    assert acc[5] > acc[1] + 0.1, acc


def test_dmp_reference_set_is_disjoint_from_members(tmp_path):
    """DMP's student learns only from the validation split: no member, no sample any attack
    trains or is measured on, no test sample; the kept part is the teacher's most certain."""
    from compressor.baselines.defences import dmp_reference

    setup = prepare(tmp_path, dmp_keep=0.4)
    teacher = setup.new_model("dense-init")
    setup.train(setup.new_state(teacher), "warm", 20, setup.lr, "teacher")
    kept, info = dmp_reference(setup, teacher)
    s = setup.splits
    assert set(kept) <= set(s.validation)
    for part in (s.members, s.known_nonmembers, s.unknown_nonmembers, s.test):
        assert not set(kept) & set(part)
    assert len(kept) == info["kept"] == int(np.ceil(0.4 * len(s.validation)))
    probs = torch.softmax(predict_logits(teacher, setup.ds, s.validation, setup.device), 1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).numpy()
    is_kept = np.isin(s.validation, kept)
    assert entropy[is_kept].max() <= entropy[~is_kept].min()


def test_kd_student_is_the_widest_that_fits_the_budget(runs):
    """The dense student has at most the sparse model's weight count, and a slightly wider
    one would not fit."""
    from safeexport.models import weight_count

    report = _report(runs["kd"])
    st = report["student"]
    spec = json.loads((runs["kd"] / "model.json").read_text())
    assert spec["kwargs"]["width"] == st["width"] < 1
    assert st["weights"] == report["compressed"]["nonzero_weights"] <= st["budget"]
    assert st["budget"] == _report(runs["prune"])["compressed"]["nonzero_weights"]
    assert weight_count(spec["name"], {**spec["kwargs"], "width": st["width"] + 0.01}) > \
        st["budget"]


def test_mia_pr_prunes_to_the_admm_support_and_keeps_the_budget(runs):
    report = _report(runs["mia-pr"])
    assert report["compressed"]["nonzero_weights"] == \
        _report(runs["prune"])["compressed"]["nonzero_weights"]
    assert report["admm"]["updates"] >= 1
    assert 0 < report["admm"]["residual_before_prune"] < 1


def test_dense_from_must_match_the_dense_settings(runs, tmp_path):
    """A dense run stands in for another run's dense model only if it trained the same one;
    when it does, the baseline starts from it and is charged its time."""
    with pytest.raises(ConfigError, match="other settings .*epochs"):
        compress(tiny_config(method="prune", epochs=5), tmp_path / "a",
                 dense_from=runs["dense"])
    # the schedule and the augmentation shape the dense model too
    with pytest.raises(ConfigError, match=r"other settings \(lr_schedule, augment\)"):
        compress(tiny_config(method="prune", lr_schedule="multistep", augment="crop-flip"),
                 tmp_path / "a2", dense_from=runs["dense"])
    with pytest.raises(ConfigError, match="not a finished `--method dense` run"):
        compress(tiny_config(method="prune"), tmp_path / "b", dense_from=runs["prune"])
    # compared as resolved: auto on these images is none, so an explicit none matches
    run = compress(tiny_config(method="prune", retrain_epochs=2, augment="none"),
                   tmp_path / "c", dense_from=runs["dense"])
    assert run.model.read_bytes() == (runs["prune"] / "model.safetensors").read_bytes()
    rep = _report(run.path)
    assert rep["dense_reused_from"] == str(runs["dense"].resolve())
    assert rep["compressed"]["wall_time_s"] >= _report(runs["dense"])["compressed"]["wall_time_s"]


def test_kd_refuses_a_model_without_width_before_training(tmp_path):
    """A text model has no width option: the kd baselines say so at once."""
    from compressor.baselines.students import narrow_student

    setup = prepare(tmp_path, method="kd", model="mlp")
    assert narrow_student(setup).spec["kwargs"]["width"] < 1
    setup.model_name = "bert"
    with pytest.raises(ConfigError, match="bert has no width option"):
        narrow_student(setup)
