"""Exporters: k-bit weight quantization, ONNX and TFLite conversion, and the checks of every
exported file against the run's PyTorch model."""

from safeexport.openmp import set_wait_policy

set_wait_policy()  # before any module of this package loads torch (safeexport/openmp.py)


def __getattr__(name: str):
    # ``export`` pulls in torch and the converters; resolving it lazily keeps the CLI's --help
    # free of those imports.
    if name in ("export", "export_all"):
        from exporters import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["export", "export_all"]
