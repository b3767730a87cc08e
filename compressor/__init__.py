"""SafeCompress: dynamic sparse training with safety-test-driven candidate selection."""

from compressor.run import compress

__all__ = ["compress"]
