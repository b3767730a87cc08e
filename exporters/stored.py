"""What an exported file really stores, read back from the file itself (never from what a
converter or quantizer claims): one record per weight tensor of a convolution or linear layer."""

from dataclasses import asdict, dataclass

import numpy as np

from exporters.quantize import effective_bits, levels_per_channel


@dataclass
class StoredWeight:
    """A conv/linear weight as stored in an exported file."""

    name: str
    module: str  # the PyTorch module it came from (``features.0``), as far as names tell
    shape: list[int]
    storage: str  # float32, float16, int8 or int4
    container_bits: int  # bits per stored value
    effective_bits: int  # bits of the smallest symmetric code holding its levels (= container
    #                     bits for floats)
    levels: int | None  # most distinct integer levels in one channel (None for floats)
    numel: int
    nnz: int
    zero_scales: int  # channels whose scale is 0 (runtimes such as XNNPACK refuse them)

    def to_dict(self) -> dict:
        return asdict(self)


def record(name: str, module: str, values: np.ndarray, storage: str, axis: int | None = None,
           scale: np.ndarray | None = None) -> StoredWeight:
    """A StoredWeight from decoded values (integer levels for int storage, with their channel
    ``axis`` and scales; floats otherwise)."""
    container = {"float32": 32, "float16": 16, "int8": 8, "int4": 4}[storage]
    if storage.startswith("int"):
        levels = levels_per_channel(values, axis)
        eff = effective_bits(levels)
    else:
        levels, eff = None, container
    zero_scales = 0 if scale is None else int((np.asarray(scale) == 0).sum())
    return StoredWeight(name, module, [int(d) for d in values.shape], storage, container, eff,
                        levels, int(values.size), int(np.count_nonzero(values)), zero_scales)
