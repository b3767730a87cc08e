"""SafeCompress: dynamic sparse training with safety-test-driven candidate selection."""

from safeexport.openmp import set_wait_policy

set_wait_policy()  # before any module of this package loads torch (safeexport/openmp.py)


def __getattr__(name: str):
    # ``compress`` pulls in torch; resolving it lazily keeps ``compressor.config`` (and so the
    # CLI's --help) free of that import.
    if name == "compress":
        from compressor.run import compress

        return compress
    raise AttributeError(name)


__all__ = ["compress"]
