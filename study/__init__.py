"""The privacy study: what pruning, retraining and quantization each do to accuracy and to
membership-inference risk (``study``), and SafeCompress against the compress-then-defend
baselines (``compare``). It drives the three stages through their verbs and run directories:
compress, export, evaluate."""

from study.run import compare, study

__all__ = ["compare", "study"]
