"""The second step of the two-step baselines, defend: how the compressed student is trained.

- ``none``: cross-entropy on the members (or distillation, for a KD student).
- ``dp``: DP-SGD through Opacus (its PrivacyEngine, RDP accountant and validators).
- ``advreg``: Nasr et al.'s adversarial regularisation, a min-max game with an inference model.
- ``dmp``: Shejwalkar & Houmansadr's distillation for membership privacy: the student sees
  only the teacher's soft labels on a reference set disjoint from the members.

The defenders' reference set (AdvReg's non-members, DMP's unlabelled data) is the split's
validation part: never trained on by the target, and not among the samples any attack
trains or is measured on, nor the test split.
"""

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from compressor.baselines.students import Student, Targets
from compressor.setup import Setup
from compressor.train import (
    TrainState,
    batch_tensors,
    model_loss,
    predict_logits,
    training_batch,
)
from safeexport.attacks.nasr import NasrAttackModel
from safeexport.errors import ConfigError
from safeexport.models import private_norm
from safeexport.registry import Registry
from safeexport.seeding import derive_seed, generator, seeded

Defended = tuple[TrainState, dict]  # the trained student, and what the report says of it
Defence = Callable[[Setup, Student, torch.nn.Module], Defended]
DEFENCES: Registry[Defence] = Registry("defence")


def reference_set(setup: Setup) -> np.ndarray:
    """The defenders' non-member data (the validation split)."""
    return setup.splits.validation


@DEFENCES.decorator("none")
def undefended(setup: Setup, student: Student, teacher: torch.nn.Module) -> Defended:
    """Plain training: cross-entropy, or distillation from the teacher on the members."""
    loss = model_loss(student.state.model, setup.ds, setup.device,
                      student.member_targets(setup, teacher))
    setup.train(student.state, "retrain", student.iters, student.lr, "train student", loss)
    return student.state, {}


@DEFENCES.decorator("dp")
def dp_sgd(setup: Setup, student: Student, teacher: torch.nn.Module) -> Defended:
    """DP-SGD (Poisson-sampled batches, per-sample clipping, Gaussian noise) with the noise
    Opacus calibrates to ``dp_epsilon`` at ``dp_delta`` over the student's iterations.
    BatchNorm mixes the samples of a batch, which DP-SGD's per-sample gradients cannot: in a
    trained student (Pr-DP) each BatchNorm after a convolution is folded into it with its
    running statistics, so the private phase starts from the model it fine-tunes (Opacus's
    ``ModuleValidator.fix`` put freshly initialised GroupNorm in their place, an architecture
    reset that DP's cost was then blamed for); any other normalisation, and a student trained
    from scratch (KD-DP), gets Opacus's fix. model.json records which, so export rebuilds it."""
    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    cfg = setup.cfg
    model, norm = private_norm(student.state.model, fold=student.trained)
    model = model.to(setup.device)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise ConfigError(f"{setup.model_name} cannot be trained with DP-SGD: "
                          + "; ".join(str(p) for p in problems))
    masks = student.state.masking.masks if student.state.masking is not None else None
    state = setup.new_state(model, masks)
    members = setup.splits.members
    batch = min(cfg.batch_size, len(members))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.from_numpy(members)), batch_size=batch)
    epochs = max(1, round(student.iters / len(loader)))
    targets = student.member_targets(setup, teacher)
    epsilons: list[float] = []
    with seeded(derive_seed(cfg.seed, "dp-sampling"), setup.device), warnings.catch_warnings():
        # Opacus's advice to use its secure RNG for production, its note that a larger RDP
        # order would tighten ε, and torch's note on hooks of a first layer whose input needs
        # no gradient: none is a fault here
        for message in ("Secure RNG", "Optimal order", "Full backward hook"):
            warnings.filterwarnings("ignore", message=f".*{message}.*")
        engine = PrivacyEngine(accountant="rdp")
        module, optimizer, loader = engine.make_private_with_epsilon(
            module=model, optimizer=state.optimizer, data_loader=loader,
            target_epsilon=cfg.dp_epsilon, target_delta=cfg.dp_delta, epochs=epochs,
            max_grad_norm=cfg.dp_max_grad_norm,
            noise_generator=torch.Generator(setup.device).manual_seed(
                derive_seed(cfg.seed, "dp-noise")))

        def batches():
            for _ in range(epochs):
                for (idx,) in loader:
                    yield idx.numpy()
                epsilons.append(engine.get_epsilon(cfg.dp_delta))

        dp_state = TrainState(module, optimizer, state.masking)
        # no autocast: per-sample gradients are taken in float32
        loss = model_loss(module, setup.ds, setup.device, targets, mixed=False)
        setup.run_batches(dp_state, "dp", batches(), epochs * len(loader), student.lr,
                          "DP-SGD", loss)
    module.remove_hooks()
    for p in model.parameters():
        p.grad_sample = None
    state.optimizer = optimizer.original_optimizer
    return state, {"dp": {
        "epsilon": epsilons[-1], "delta": cfg.dp_delta, "target_epsilon": cfg.dp_epsilon,
        "epsilon_per_epoch": epsilons, "noise_multiplier": optimizer.noise_multiplier,
        "max_grad_norm": cfg.dp_max_grad_norm, "sample_rate": 1 / len(loader),
        "expected_batch_size": optimizer.expected_batch_size, "epochs": epochs,
        "steps": epochs * len(loader), "accountant": "rdp (opacus)",
        "norm": norm,
        "scope": "the DP-SGD phase only; the dense model it starts from or distils saw the "
                 "members without noise"}}


def membership_gain(attacker: NasrAttackModel, probs: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor:
    """The attacker's gain on members: the mean log-probability it gives them of being
    members (what it maximises on them; its BCE loss on them is minus this)."""
    onehot = F.one_hot(y, probs.shape[1]).float()
    return F.logsigmoid(attacker(probs, onehot)).mean()


def advreg_objective(task_loss: torch.Tensor, gain: torch.Tensor,
                     alpha: float) -> torch.Tensor:
    """The target's loss in the min-max game: its task loss plus α times the attacker's gain,
    i.e. CE − α·(the attacker's BCE on the members). It falls as the attacker's gain falls,
    so minimising it trains the target to defeat the attacker."""
    return task_loss + alpha * gain


class AdvReg:
    """A batch loss that plays one round of the game per target step, as in Nasr et al.'s
    Algorithm 1: first ``advreg_attack_steps`` (k) attacker steps, each on a fresh batch of
    members against a batch of reference non-members, then the target's loss is
    ``advreg_objective`` against the updated attacker. One attacker step per target step left
    the attacker near its initialisation (its gain at chance), so the defence defended against
    nothing; the report records the attacker's accuracy on its own batches to show it learns."""

    def __init__(self, setup: Setup, model: torch.nn.Module, targets: Targets) -> None:
        self.setup, self.model, self.targets = setup, model, targets
        with seeded(derive_seed(setup.cfg.seed, "advreg-attacker"), setup.device):
            self.attacker = NasrAttackModel(setup.ds.num_classes, inputs=setup.ds.num_classes
                                            ).to(setup.device)
        self.optimizer = torch.optim.Adam(self.attacker.parameters(), lr=1e-3)
        self.members = torch.as_tensor(setup.splits.members)
        self.reference = torch.as_tensor(reference_set(setup))
        self.gen = generator(setup.cfg.seed, "advreg-reference")
        self.gains: list[float] = []
        self.attacker_acc: list[float] = []  # per target step, on the attacker's last batches

    def _draw(self, pool: torch.Tensor, n: int) -> np.ndarray:
        return pool[torch.randint(len(pool), (n,), generator=self.gen)].numpy()

    @torch.no_grad()
    def _outputs(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's softmax outputs and the one-hot labels of ``idx``, in the training
        mode its own step runs in (the attacker must see the outputs whose gain the target
        lowers; with BatchNorm, eval-mode outputs differ)."""
        x, y = batch_tensors(self.setup.ds, idx, self.setup.device)
        probs = F.softmax(self.model(x).float(), dim=1)
        return probs, F.one_hot(y, self.setup.ds.num_classes).float()

    def _attacker_step(self, n: int) -> float:
        """One ascent of log h(members) + log(1 - h(non-members)); the attacker's accuracy
        on the batch (members above 0.5, non-members below)."""
        pm, om = self._outputs(self._draw(self.members, n))
        pr, orf = self._outputs(self._draw(self.reference, n))
        hm, hr = self.attacker(pm, om), self.attacker(pr, orf)
        loss = -(F.logsigmoid(hm).mean() + F.logsigmoid(-hr).mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(((hm > 0).float().mean() + (hr <= 0).float().mean()) / 2)

    def __call__(self, idx: np.ndarray) -> torch.Tensor:
        acc = [self._attacker_step(len(idx)) for _ in range(self.setup.cfg.advreg_attack_steps)]
        self.attacker_acc.append(acc[-1])
        x, y = training_batch(self.setup.ds, idx, self.setup.device)
        logits = self.model(x).float()
        gain = membership_gain(self.attacker, F.softmax(logits, dim=1), y)
        self.gains.append(float(gain.detach()))
        return advreg_objective(self.targets(logits, y, idx), gain, self.setup.cfg.advreg_alpha)


@DEFENCES.decorator("advreg")
def adversarial_regularisation(setup: Setup, student: Student,
                               teacher: torch.nn.Module) -> Defended:
    """Nasr et al. (2018): k attacker steps, then one target step, alternate; the target
    minimises its task loss plus α·the attacker's gain on its members."""
    game = AdvReg(setup, student.state.model, student.member_targets(setup, teacher))
    setup.train(student.state, "advreg", student.iters, student.lr, "AdvReg", game)
    tenth = max(1, len(game.gains) // 10)
    return student.state, {"advreg": {
        "alpha": setup.cfg.advreg_alpha, "attack_steps": setup.cfg.advreg_attack_steps,
        "reference": "validation", "reference_size": len(game.reference),
        "attacker_gain_first_tenth": float(np.mean(game.gains[:tenth])),
        "attacker_gain_last_tenth": float(np.mean(game.gains[-tenth:])),
        "attacker_acc_first_tenth": float(np.mean(game.attacker_acc[:tenth])),
        "attacker_acc_last_tenth": float(np.mean(game.attacker_acc[-tenth:])),
        "attacker_acc_mean": float(np.mean(game.attacker_acc))}}


def dmp_reference(setup: Setup, teacher: torch.nn.Module) -> tuple[np.ndarray, dict]:
    """The reference samples the student learns from: the ``dmp_keep`` fraction of the
    reference set on which the teacher's prediction has the lowest entropy."""
    ref = reference_set(setup)
    probs = F.softmax(predict_logits(teacher, setup.ds, ref, setup.device), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1).numpy()
    keep = max(1, math.ceil(setup.cfg.dmp_keep * len(ref)))
    order = np.argsort(entropy, kind="stable")[:keep]
    return ref[np.sort(order)], {"reference": "validation", "reference_size": len(ref),
                                 "kept": keep, "keep": setup.cfg.dmp_keep,
                                 "mean_entropy_all": float(entropy.mean()),
                                 "mean_entropy_kept": float(entropy[order].mean())}


@DEFENCES.decorator("dmp")
def distillation_for_privacy(setup: Setup, student: Student,
                             teacher: torch.nn.Module) -> Defended:
    """DMP: the unprotected teacher labels the reference set, the lowest-entropy part is kept,
    and the student learns the teacher's soft labels on it only (never a member)."""
    data, info = dmp_reference(setup, teacher)
    targets = Targets(setup, data, teacher, labels=False)
    loss = model_loss(student.state.model, setup.ds, setup.device, targets)
    setup.train(student.state, "dmp", student.iters, student.lr, "DMP", loss, data)
    return student.state, {"dmp": info}
