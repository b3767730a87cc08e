"""safeexport: compress a network for phones without making it leak its training data."""

__version__ = "0.1.0"
