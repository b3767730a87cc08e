"""The privacy study: what pruning, retraining and quantization each do to accuracy and to
membership-inference risk (``study``), and SafeCompress against the compress-then-defend
baselines (``compare``). It drives the three stages through their verbs and run directories:
compress, export, evaluate."""

from safeexport.openmp import set_wait_policy

set_wait_policy()  # before any module of this package loads torch (safeexport/openmp.py)

from study.run import compare, study  # noqa: E402 - after the wait policy

__all__ = ["compare", "study"]
