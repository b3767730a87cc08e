"""device_eval's config: everything that decides how an exported file is evaluated."""

from dataclasses import dataclass

from safeexport import names
from safeexport.config import StageConfig, opt


@dataclass
class EvalConfig(StageConfig):
    """Everything that decides how ``safeexport evaluate`` measures an exported file."""

    runtime: str = opt("auto", "auto (by file suffix: torch .safetensors, onnxruntime .onnx, "
                       "tflite .tflite), or adb to run on an Android phone",
                       choices=names.RUNTIMES)
    threads: int | None = opt(None, "threads of a host runtime (default min(4, CPUs))")
    max_mia_rise: float = opt(0.01, "largest allowed rise of the strongest attack's MIA "
                              "accuracy from the PyTorch model to the exported file (0.01 = 1 "
                              "point); a rise fails only when its paired 95% interval also "
                              "excludes zero")
    max_task_drop: float = opt(0.02, "largest allowed fall of task accuracy (0.02 = 2 points)")
    attack: str | None = opt(None, "trained attack (default: the run's)", choices=names.ATTACKS)
    attack_epochs: int | None = opt(None, "epochs of the attacker (default: the run's "
                                    "final_attack_epochs, so the figures compare)")
    attack_seeds: int | None = opt(None, "train the attacker from this many seeds and report "
                                   "mean ± std (default: the run's attack_seeds)")
    references: int | None = opt(None, "reference models for LiRA and RMIA: default every "
                                 "one the run has (none when it has none); K uses K of them, "
                                 "building the missing ones like the run's own (about one "
                                 "run's training each); 0 turns them off")
    references_export: bool = opt(False, "export the reference models with the evaluated "
                                  "file's own format, bits and scheme (in each reference's "
                                  "exports/, reused) so they mimic the deployed pipeline; "
                                  "without it the references are PyTorch models")
    serial: str | None = opt(None, "adb: the device's serial (needed when several are "
                             "connected)")
    adb: str = opt("adb", "adb: the adb client to run (a name on PATH or a path)")
    runner: str = opt("benchmark_model", "adb: device-side runner, benchmark_model (LiteRT's "
                      "binary, .tflite only) or python (python3 with ai-edge-litert or "
                      "onnxruntime on the phone, e.g. Termux)", choices=names.RUNNERS)
    runner_path: str | None = opt(None, "adb: the runner on the device (default "
                                  "/data/local/tmp/benchmark_model, or python3)")
    runner_binary: str | None = opt(None, "adb: a benchmark_model binary on this machine to "
                                    "push (its ABI is checked against the phone's)")
    timeout: float = opt(300.0, "adb: seconds each step may take before it is killed")
    chunk: int = opt(256, "samples per batch of inputs sent to the runtime")

    def problems(self) -> list[str]:
        """Every invalid value, each with what is allowed (all reported at once)."""
        out = []
        for name in ("max_mia_rise", "max_task_drop"):
            if not 0 <= getattr(self, name) <= 1:
                out.append(f"{name} must be in [0, 1]")
        for name in ("timeout", "chunk"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive")
        if self.threads is not None and self.threads < 1:
            out.append("threads must be at least 1")
        for name in ("attack_epochs", "attack_seeds"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                out.append(f"{name} must be at least 1")
        if self.references is not None and (self.references < 0 or self.references == 1):
            out.append(f"references must be 0 or at least 2, got {self.references}")
        return out
