"""SafeCompress: dynamic sparse training with safety-test-driven candidate selection."""


def __getattr__(name: str):
    # ``compress`` pulls in torch; resolving it lazily keeps ``compressor.config`` (and so the
    # CLI's --help) free of that import.
    if name == "compress":
        from compressor.run import compress

        return compress
    raise AttributeError(name)


__all__ = ["compress"]
