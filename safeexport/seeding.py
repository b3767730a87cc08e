"""Seeds derived per consumer, so every random stream is reproducible and independent of the
order in which consumers run (the compressor, its final evaluation and device_eval's re-run of it
draw the same numbers for the same tags)."""

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def derive_seed(seed: int, *tags: object) -> int:
    """A 63-bit seed derived from ``seed`` and tags, so every consumer has its own stream and the
    result does not depend on the order in which consumers run."""
    digest = hashlib.sha256(repr((seed, *tags)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU torch.Generator seeded with ``derive_seed(seed, *tags)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block on torch's global RNG seeded with ``seed``, restoring it afterwards (for
    layer initialisation and dropout, which draw from the global RNG)."""
    devices = ([device.index if device.index is not None else torch.cuda.current_device()]
               if device.type == "cuda" else [])
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
