"""The exporter's config: everything that decides what ``safeexport export`` writes."""

from dataclasses import dataclass

from safeexport import names
from safeexport.config import StageConfig, opt

# (format, scheme) -> bit widths it can express. 32 and 16 are float storage (weight-only);
# 3 bits are 7 levels in int4 containers, 2 bits 3 levels in int2 (int4 with tflite dynamic).
SUPPORTED = {
    ("onnx", "weight-only"): (32, 16, 8, 4, 3, 2),
    ("onnx", "static"): (8,),
    ("tflite", "weight-only"): (32, 16, 8, 4, 3, 2),
    ("tflite", "dynamic"): (8, 4, 3, 2),
    ("tflite", "static"): (8,),
}


def supported_text() -> str:
    """The supported combinations, for error messages and --help."""
    return "; ".join(f"{f} {s}: {','.join(map(str, b))} bits" for (f, s), b in SUPPORTED.items())


@dataclass
class ExportConfig(StageConfig):
    """Everything that decides what ``safeexport export`` writes."""

    format: str = opt("onnx", "onnx or tflite", choices=names.FORMATS)
    bits: int = opt(8, "weight bits: 32 (float32), 16 (float16), 8, 4 (int8/int4), 3 (7 "
                    "levels in int4) or 2 (3 levels in int2)", choices=names.BITS)
    scheme: str = opt("weight-only", "weight-only (float activations), dynamic (activations "
                      "quantized at run time, tflite) or static (int8 activations calibrated "
                      "on training samples)", choices=names.SCHEMES)
    calibration: int = opt(256, "training samples (known members) that calibrate a static "
                           "export")
    keep_float: list[str] = opt([], "modules kept in float, e.g. features.0 classifier.2 (the "
                                "names of the run's report.json layers without .weight)")
    parity_samples: int = opt(512, "test-split samples the exported file is checked on")
    min_agreement: float = opt(0.9, "top-1 agreement with the PyTorch model below which a "
                               "quantized export fails")
    warn_only: bool = opt(False, "warn instead of failing when agreement is below the floor")
    float_tolerance: float = opt(1e-3, "largest |logit difference| of a float32 export, "
                                 "relative to max(1, max |logit|)")
    batch_size: int = opt(1, "batch size of a TFLite file (litert-torch fixes it; ONNX files "
                          "take any batch)")
    levels: str = opt("symmetric", "symmetric: 2^k - 1 levels around zero ({-1,0,1} at 2 "
                      "bits); asymmetric: every code of a k-bit integer ({-2,-1,0,1} at 2 bits, "
                      "{-4..3} at 3), weight-only or dynamic", choices=names.LEVELS)
    finetune_epochs: int = opt(0, "epochs of quantization-aware fine-tuning on the run's "
                               "members before an 8/4/3/2-bit weight-only or dynamic export "
                               "(the stored levels with learnt scales in the forward pass, "
                               "the run's model's outputs as the target, pruned weights held "
                               "at zero); 0: round the run's weights as they are")
    finetune_lr: float = opt(1e-3, "Adam learning rate of --finetune-epochs")
    sparse_storage: bool = opt(True, "store each weight whose non-zeros are few enough "
                               "sparse where that is smaller than the dense tensor: ONNX as "
                               "one-byte gaps and its values, decoded in the graph when the "
                               "file loads; TFLite (weight-only 8/4/3/2 bits) in its own "
                               "sparse format with a DENSIFY op")

    def problems(self) -> list[str]:
        """Every invalid value, each with what is allowed (all reported at once)."""
        out = []
        supported = SUPPORTED.get((self.format, self.scheme), ())
        valid = not self.choice_problems()
        if valid and self.bits not in supported:
            out.append(f"{self.format} cannot store {self.bits}-bit weights with the "
                       f"{self.scheme} scheme; supported: {supported_text()}")
        for name, lo in (("calibration", 1), ("parity_samples", 1), ("batch_size", 1)):
            if getattr(self, name) < lo:
                out.append(f"{name} must be at least {lo}")
        if not 0 <= self.min_agreement <= 1:
            out.append("min_agreement must be in [0, 1]")
        if self.float_tolerance <= 0:
            out.append("float_tolerance must be positive")
        # bits is compared only once it is one of its choices (choice_problems reports the rest)
        not_own_levels = valid and not self.own_levels
        if self.finetune_epochs < 0:
            out.append("finetune_epochs must be >= 0")
        elif self.finetune_epochs and not_own_levels:
            out.append(f"finetune_epochs fine-tunes against 8/4/3/2-bit weights of the "
                       f"weight-only or dynamic scheme, not {self.bits}-bit {self.scheme} "
                       f"(static weights come from the runtime's own quantizer)")
        if self.levels == "asymmetric" and not_own_levels:
            out.append(f"asymmetric levels are for 8/4/3/2-bit weights of the weight-only or "
                       f"dynamic scheme, not {self.bits}-bit {self.scheme}")
        if self.finetune_lr <= 0:
            out.append("finetune_lr must be positive")
        return out

    @property
    def own_levels(self) -> bool:
        """Whether safeexport's quantizer sets the weights' levels (8 bits and below, not the
        static scheme, whose weights come from the runtime's own quantizer): what asymmetric
        levels and fine-tuning act on."""
        return self.bits <= 8 and self.scheme != "static"

    def name(self) -> str:
        """The export's file stem, e.g. ``model-tflite-w4-weight-only`` (``-asym`` after it:
        asymmetric levels; ``-ft3``: fine-tuned for 3 epochs)."""
        asym = "-asym" if self.levels == "asymmetric" else ""
        tuned = f"-ft{self.finetune_epochs}" if self.finetune_epochs else ""
        return f"model-{self.format}-w{self.bits}-{self.scheme}{asym}{tuned}"
