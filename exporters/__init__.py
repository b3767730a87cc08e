"""Exporters: k-bit weight quantization, ONNX and TFLite conversion, and the checks of every
exported file against the run's PyTorch model."""


def __getattr__(name: str):
    # ``export`` pulls in torch and the converters; resolving it lazily keeps the CLI's --help
    # free of those imports.
    if name in ("export", "export_all"):
        from exporters import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["export", "export_all"]
