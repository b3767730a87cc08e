"""The compressor's config: everything that decides what ``safeexport compress`` produces."""

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from safeexport import names
from safeexport.config import StageConfig, opt

# how runs are executed, not what they produce: not part of any run's settings
EXECUTION_KEYS = ("executor", "ray_address", "cpus_per_run", "gpus_per_run", "threads")
# What decides the dense model: a dense run may stand in for another run's only if these agree
# (and the resolved augmentation, and the data subset).
DENSE_KEYS = ("model", "init_weights", "dataset", "max_samples", "epochs", "batch_size",
              "optimizer", "lr", "lr_schedule", "momentum", "weight_decay", "seed", "pretrained",
              "max_length", "vocab_size")


@dataclass
class CompressConfig(StageConfig):
    """Everything that decides what ``safeexport compress`` produces."""

    method: str = opt("safecompress", "safecompress, or a baseline: dense (no compression); "
                      "prune (train dense, magnitude-prune, fine-tune); pr-dp, pr-advreg, "
                      "pr-dmp (prune, then fine-tune with DP-SGD, adversarial regularisation or "
                      "DMP distillation); kd (a narrow dense student of the same size, "
                      "distilled), kd-dp, kd-advreg, kd-dmp; mia-pr (ADMM pruning)",
                      choices=names.METHODS)
    model: str = opt("auto", "architecture: auto (cnn for images, mlp for tables, bert for "
                     f"text), {', '.join(names.MODELS)}, a plugin's name, or your own as "
                     "package.module:factory, called as factory(input_shape=(C, H, W) or (D,), "
                     "num_classes=K)")
    init_weights: str | None = opt(None, "start from these trained weights (a .safetensors "
                                   "state dict of --model, e.g. a run's model.safetensors); "
                                   "the initial mask keeps each layer's largest weights")
    dataset: str = opt("digits", f"{', '.join(names.DATASETS)} (digits is embedded: no "
                       "download), npz:PATH (arrays x, y), folder:PATH (PATH/<class>/<image>) or "
                       "torch:package.module:factory (factory() returns a map-style torch "
                       "Dataset of (x, y) pairs)")
    data_dir: str | None = opt(None, "folder holding the dataset's files (default ./data)")
    download: bool = opt(False, "fetch a public dataset (checksum-verified) into data_dir")
    max_samples: int | None = opt(None, "use a class-stratified subset of this many samples")
    augment: str = opt("auto", "training-time augmentation of the target: crop-flip (random "
                       "crop with 4-pixel zero padding, horizontal flip), none, or auto "
                       "(crop-flip for cifar10, cifar100 and tinyimagenet as in the paper, "
                       "none otherwise); attacks and evaluation always read un-augmented inputs",
                       choices=names.AUGMENTS)
    sparsity: float = opt(0.05, "fraction of weights KEPT (the paper's Ω): 0.05 keeps 5% of the "
                          "weights and sets 95% to zero; in (0, 1]")
    epochs: int = opt(40, "training budget of the target, in epochs over the members")
    update_frequency: int = opt(40, "training iterations between two mask updates (paper: "
                                "4000)")
    batch_size: int = opt(128, "target batch size")
    optimizer: str = opt("auto", "auto = sgd for CNNs (as in the paper), adamw for MLPs "
                         "and bert/roberta; or sgd, adamw",
                         choices=("auto", *names.OPTIMIZERS))
    lr: float | None = opt(None, "learning rate, scheduled by --lr-schedule (default: 0.05 "
                           "for sgd, 1e-3 for adamw, 5e-5 for adamw on a --pretrained model)")
    lr_schedule: str = opt("cosine", "cosine (annealed to 0) or multistep (divided by 10 at 1/2 "
                           "and 3/4 of the budget: the paper's recipe with --lr 0.1)",
                           choices=names.SCHEDULES)
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "SGD weight decay")
    regularizer: str = opt("none", "entropy regularizer added to the loss: re1 rewards output "
                           "entropy on the whole batch, re2 on misclassified samples only (the "
                           "paper's best)",
                           choices=names.REGULARIZERS)
    beta: float = opt(0.1, "weight β of the entropy regularizer")
    lam: float = opt(1.0, "λ of TM-score = TaskAcc^λ / MIAAcc")
    prune: list[str] = opt(["magnitude", "threshold"], "prune strategies of the candidates",
                           choices=names.PRUNE)
    grow: list[str] = opt(["gradient", "random"], "grow strategies of the candidates",
                          choices=names.GROW)
    prune_rate: float = opt(0.5, "initial prune rate, cosine-decayed towards 0 over training")
    finetune_iters: int = opt(5, "iterations each candidate is fine-tuned before testing "
                              "(the winner's count inside the --epochs budget: it is training "
                              "of the model that continues)")
    retrain_epochs: int = opt(10, "prune baselines: epochs of fine-tuning after pruning")
    dp_epsilon: float = opt(8.0, "pr-dp, kd-dp: the ε DP-SGD's noise is calibrated to (RDP "
                            "accountant), for the private phase")
    dp_delta: float = opt(1e-5, "pr-dp, kd-dp: δ of the (ε, δ) guarantee")
    dp_max_grad_norm: float = opt(1.0, "pr-dp, kd-dp: per-sample gradient clipping norm")
    advreg_alpha: float = opt(1.0, "pr-advreg, kd-advreg: weight α of the attacker's gain in "
                              "the target's loss")
    advreg_attack_steps: int = opt(5, "pr-advreg, kd-advreg: attacker steps (each on a fresh "
                                   "batch of members and reference non-members) before each "
                                   "target step, Nasr et al.'s k")
    kd_temperature: float = opt(4.0, "kd baselines and DMP: softmax temperature of distillation")
    kd_alpha: float = opt(0.9, "kd baselines: weight of the teacher's soft labels against the "
                          "hard labels")
    dmp_keep: float = opt(0.5, "pr-dmp, kd-dmp: fraction of the reference set kept (the "
                          "samples the teacher is surest of, lowest entropy)")
    admm_rho: float = opt(1e-3, "mia-pr: ADMM penalty ρ pulling the weights to the sparse set")
    attack: str = opt("nasr", "attack of the final evaluation (and of `evaluate` on this "
                      "run's exports): nasr (Nasr et al.'s trained attacker), or a "
                      "training-free threshold attack: loss, confidence, entropy, "
                      "modified_entropy (the threshold attacks are measured beside it always)",
                      choices=names.ATTACKS)
    score: str = opt("loss", "SafeCompress's in-loop safety score, read on every candidate: a "
                     "threshold attack (loss, confidence, entropy, modified_entropy), fitted "
                     "and read on all the known non-members and as many known members, "
                     "deterministic and training-free; lira, LiRA's per-sample z against the "
                     "run's --references (an even number, trained before the loop and reused "
                     "by every round; a reference's own loop reads loss); or nasr, the paper's "
                     "trained attacker, retrained on every round's model (several times "
                     "slower)",
                     choices=names.SCORES)
    attack_epochs: int = opt(100, "--score nasr: most epochs the attacker trains on each "
                             "round's model (early stopping on a held-out fifth of its data "
                             "ends it sooner)")
    attack_finetune_epochs: int = opt(10, "--score nasr: most warm-start epochs of the attacker "
                                      "per candidate")
    final_attack_epochs: int = opt(300, "most epochs of the attacker in the final evaluation")
    attack_seeds: int = opt(1, "train the final attacker from this many seeds and report mean "
                            "± std of its figures (the first seed's figures are the run's)")
    references: int = opt(0, "reference models for LiRA (Carlini et al. 2022) and RMIA "
                          "(Zarifzadeh et al. 2024), each trained like this run on a random "
                          "half of the known members and non-members, "
                          "under RUN/references/ (reused while their settings are unchanged); "
                          "0 = none, else at least 2; each costs about one run's training")
    reference_method: str = opt("same", "how references are trained: same (this run's method "
                                "and settings) or dense (cheaper: a dense model on the same "
                                "budget, an approximation the report names)",
                                choices=names.REFERENCE_METHODS)
    executor: str = opt("local", "how the reference models (and study --compare's runs) "
                        "run: local (one after another here) or ray (Ray tasks on this "
                        "machine or a cluster)",
                        choices=names.EXECUTORS)
    ray_address: str | None = opt(None, "--executor ray: the cluster to join (auto: the one "
                                  "`ray start` made on this node); default: start a local Ray "
                                  "instance")
    cpus_per_run: float = opt(1.0, "--executor ray: CPUs each run reserves (and its torch "
                              "threads)")
    gpus_per_run: float = opt(0.0, "--executor ray: GPUs each run reserves; fractions share "
                              "a GPU (a scheduling label: each run must fit its share of the "
                              "memory)")
    threads: int | None = opt(None, "torch CPU threads of this run (default: torch's choice, "
                              "one per core); the run records the count it ran on, and resume "
                              "and replay reuse it, since figures can differ in the last "
                              "digits between thread counts (floating-point sums)")
    select: str = opt("tm", "how a round's winner is chosen: tm (the highest TM-score when "
                      "its lead exceeds the paired standard error, else the tie rule: task "
                      "accuracy, then the lower attack accuracy; the method) or random (an "
                      "ablation: does TM-score selection matter on this data?)",
                      choices=names.SELECTIONS)
    allow_no_updates: bool = opt(False, "let SafeCompress run with a budget too small for one "
                                 "mask update (it is then plain sparse training)")
    dense_reference: bool = opt(True, "also train and evaluate a dense model on the same budget")
    device: str = opt("auto", "auto (CUDA if present), cpu, cuda or cuda:N")
    seed: int = opt(0, "seed of the split, initialisation, sampling and attacker")
    data_seed: int | None = opt(None, "seed of the --max-samples subset (default: --seed)")
    pretrained: str | None = opt(None, "local folder of a pretrained BERT/RoBERTa + tokenizer")
    max_length: int = opt(64, "token sequence length for text models")
    vocab_size: int = opt(8000, "vocabulary of a tokenizer trained on the data")

    # runs from before --augment trained on the stored inputs, and before --lr-schedule on
    # the cosine schedule
    RECORDED_DEFAULTS: ClassVar[dict[str, Any]] = {"augment": "none", "lr_schedule": "cosine"}

    @classmethod
    def from_recorded(cls, d: dict) -> "CompressConfig":
        """As ``StageConfig.from_recorded``; a run from before --score read its in-loop
        safety test with its --attack."""
        if isinstance(d, dict) and "score" not in d:
            d = {**d, "score": d.get("attack", "nasr")}
        return super().from_recorded(d)

    @classmethod
    def from_run_record(cls, record: dict) -> "CompressConfig":
        """As ``StageConfig.from_run_record``; a run whose ``optimizer: auto`` resolved to
        another optimizer or rate than it does now (MLPs trained with SGD before ``auto``
        meant AdamW for them) gets the ones it trained with (recorded beside its config), so
        it resumes, replays and compares as what it is."""
        from compressor.train import resolve_optimizer  # torch: only when a run is read

        cfg = cls.from_recorded(record["config"])
        used = record.get("optimizer")
        if cfg.optimizer != "auto" or not isinstance(used, dict) \
                or used.get("name") not in names.OPTIMIZERS:
            return cfg
        now = resolve_optimizer("auto", record.get("model", cfg.model), cfg.lr,
                                bool(cfg.pretrained))
        if now == (used["name"], used.get("lr")):
            return cfg
        return replace(cfg, optimizer=used["name"], lr=used.get("lr"))

    def check_executor(self, writes: Path) -> None:
        """The Ray cluster this config names answers, and its workers can write into
        ``writes`` (checked before any training, by every command that will use the
        executor)."""
        if self.executor == "ray":
            from safeexport.executors import check_ray_cluster, check_workers_write

            check_ray_cluster(self.ray_address)
            check_workers_write(writes, self.ray_address)

    def executor_options(self) -> dict:
        """``run_tasks``' options for this config's executor."""
        return ({"address": self.ray_address, "cpus_per_task": self.cpus_per_run,
                 "gpus_per_task": self.gpus_per_run} if self.executor == "ray" else {})

    def problems(self) -> list[str]:
        """Every invalid value, each with what is allowed (all reported at once)."""
        # The registries import torch; importing them here keeps `safeexport --help` instant.
        from safeexport.data import DATASETS, dataset_names
        from safeexport.errors import ConfigError
        from safeexport.executors import ray_endpoint
        from safeexport.models import MODELS, known_model

        p = []
        if not (isinstance(self.sparsity, int | float) and 0 < self.sparsity <= 1):
            p.append(f"--sparsity is the fraction of weights kept and must be in (0, 1], got "
                     f"{self.sparsity}")
        if self.model != "auto" and not known_model(self.model):
            p.append(f"unknown model {self.model!r}; known: auto, {', '.join(MODELS.names())}, "
                     "or your own as package.module:factory")
        if not (self.dataset.startswith(names.DATASET_PREFIXES) or self.dataset in DATASETS):
            p.append(f"unknown dataset {self.dataset!r}; known: {', '.join(dataset_names())}")
        for name in ("epochs", "update_frequency", "batch_size", "attack_epochs",
                     "final_attack_epochs", "attack_seeds"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                p.append(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("finetune_iters", "attack_finetune_epochs", "seed", "retrain_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                p.append(f"{name} must be an integer >= 0, got {getattr(self, name)}")
        for name in ("dp_epsilon", "dp_max_grad_norm", "kd_temperature", "admm_rho"):
            if not getattr(self, name) > 0:
                p.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.dp_delta < 1:
            p.append(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        for name in ("kd_alpha", "dmp_keep"):
            if not 0 < getattr(self, name) <= 1:
                p.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.advreg_alpha < 0:
            p.append(f"advreg_alpha must be >= 0, got {self.advreg_alpha}")
        if self.threads is not None and self.threads < 1:
            p.append(f"threads must be >= 1, got {self.threads}")
        if self.advreg_attack_steps < 1:
            p.append(f"advreg_attack_steps must be >= 1, got {self.advreg_attack_steps}")
        if self.max_samples is not None and self.max_samples < 1:
            p.append(f"max_samples must be >= 1, got {self.max_samples}")
        if self.lr is not None and not self.lr > 0:
            p.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            p.append(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0 or self.beta < 0:
            p.append("weight_decay and beta must be >= 0")
        if not self.lam > 0:
            p.append(f"lam (λ) must be > 0, got {self.lam}")
        if not 0 < self.prune_rate < 1:
            p.append(f"prune_rate must be in (0, 1), got {self.prune_rate}")
        for kind in ("prune", "grow"):
            if not getattr(self, kind):
                p.append(f"at least one {kind} strategy is needed")
        if not isinstance(self.references, int) or self.references < 0 or self.references == 1:
            p.append(f"references must be 0 or an integer >= 2 (RMIA and LiRA compare the "
                     f"target with several references), got {self.references}")
        if self.ray_address is not None:
            try:
                ray_endpoint(self.ray_address)
            except ConfigError as e:
                p.append(str(e))
        if not self.cpus_per_run > 0 or self.gpus_per_run < 0:
            p.append("cpus_per_run must be > 0 and gpus_per_run >= 0")
        if self.data_seed is not None and (not isinstance(self.data_seed, int)
                                           or self.data_seed < 0):
            p.append(f"data_seed must be an integer >= 0, got {self.data_seed}")
        if (self.method == "safecompress" and self.score == "lira"
                and (not isinstance(self.references, int) or self.references < 2
                     or self.references % 2)):
            p.append(f"--score lira reads LiRA's z against the run's reference models, which "
                     f"are trained before the loop: pass --references K with an even K >= 2 "
                     f"(every known sample is then out of half of them), got {self.references}")
        if not (self.device in ("auto", "cpu", "cuda") or
                (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            p.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_length < 8 or self.vocab_size < 100:
            p.append("max_length must be >= 8 and vocab_size >= 100")
        if self.init_weights is not None and not (self.init_weights.endswith(".safetensors")
                                                  and Path(self.init_weights).is_file()):
            p.append(f"--init-weights {self.init_weights} is not a .safetensors file (weights "
                     "are read as safetensors only, never unpickled)")
        if self.pretrained is not None and not Path(self.pretrained).is_dir():
            p.append(f"--pretrained {self.pretrained} is not a folder")
        return p
