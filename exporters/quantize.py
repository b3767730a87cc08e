"""Per-output-channel weight quantization that keeps pruned weights exactly zero.

A k-bit weight takes one of the 2^k − 1 levels {−(2^(k−1)−1), …, 0, …, 2^(k−1)−1} times its
channel's scale (symmetric), or one of all 2^k codes of a k-bit two's complement number,
−2^(k−1) included (asymmetric): zero is a level either way, so a pruned weight stays exactly
zero and the sparsity survives. The scale of each channel is searched to minimise the squared
error of the channel's weights (clipping the largest weights when that lowers the error), not
only set from max |w|. A channel that is entirely zero (a pruned filter) gets scale 1, never
0: runtimes such as XNNPACK refuse a zero scale, and with all levels 0 the value is exact
anyway.
"""

import math

import numpy as np

# Clip ratios tried per channel: scale = ratio * max|w| / qmax.
_RATIOS = np.linspace(1.0, 0.2, 81, dtype=np.float64)


def qmax(bits: int) -> int:
    """Largest level of a symmetric ``bits``-bit code (2^(bits−1) − 1)."""
    return 2 ** (bits - 1) - 1


def lowest(bits: int, asymmetric: bool) -> int:
    """Smallest level: −(2^(k−1) − 1) symmetric, −2^(k−1) with every code of a k-bit two's
    complement number used (asymmetric: {−2, −1, 0, 1} at 2 bits, 4 levels instead of 3)."""
    return -qmax(bits) - (1 if asymmetric else 0)


def quantize_channels(w: np.ndarray, bits: int, axis: int,
                      asymmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integer levels (int8 array, same shape as ``w``) and float32 per-channel scales along
    ``axis`` with ``w ≈ levels * scale``; zeros map to level 0 exactly. The candidate scales:
    clip ratios of max |w| / qmax, and max |w| / m for every level m (a channel already on a
    grid, as fine-tuning leaves it, is then stored exactly). ``asymmetric`` adds the level
    −2^(k−1) (``lowest``) and also tries the scales that put the most negative weight on it;
    the symmetric scales stay candidates, so its error is never larger."""
    top, low = qmax(bits), lowest(bits, asymmetric)
    moved = np.moveaxis(np.asarray(w, np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    bases = [np.abs(flat).max(axis=1) / top]
    if asymmetric:
        bases.append(np.maximum(-flat.min(axis=1), 0) / -low)
    peak = np.abs(flat).max(axis=1)
    # the clip ratios' scales, then those putting the largest |w| exactly on each level: weights
    # already on a grid (fine-tuned with learnt scales, qat) are stored exactly on that grid
    candidates = [np.where(base > 0, ratio * base, 1.0) for base in bases for ratio in _RATIOS]
    candidates += [np.where(peak > 0, peak / m, 1.0) for m in range(1, -low + 1)]
    best_err = np.full(len(flat), np.inf)
    best_scale = np.ones(len(flat))
    for scale in candidates:
        q = np.clip(np.rint(flat / scale[:, None]), low, top)
        err = ((q * scale[:, None] - flat) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best_scale[better] = err[better], scale[better]
    scale = best_scale.astype(np.float32)
    q = np.clip(np.rint(flat / scale[:, None].astype(np.float64)), low, top).astype(np.int8)
    return np.moveaxis(q.reshape(moved.shape), 0, axis), scale


def container_bits(bits: int) -> int:
    """Bits per stored level of a ``bits``-bit weight: int8, int4 (4 and 3 bits: no format has
    a 3-bit integer) or int2."""
    return 8 if bits > 4 else 4 if bits > 2 else 2


def pack_ints(q: np.ndarray, width: int) -> bytes:
    """Two's-complement ``width``-bit values (4 or 2), 8 // width per byte, the first in the
    lowest bits (TFLite's and ONNX's layout); the last byte is padded with 0."""
    per = 8 // width
    flat = (q.reshape(-1).astype(np.int16) & ((1 << width) - 1)).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros(-len(flat) % per, np.uint8)])
    packed = np.zeros(len(flat) // per, np.uint8)
    for k in range(per):
        packed |= flat[k::per] << (k * width)
    return packed.tobytes()


def floor_bytes(numel: int, nnz: int, value_bits: float) -> float:
    """Information-theoretic size of a tensor with ``nnz`` non-zeros among ``numel`` positions
    whose non-zero values each carry ``value_bits`` bits: log2 C(numel, nnz) bits for the
    positions plus the values."""
    positions = (math.lgamma(numel + 1) - math.lgamma(nnz + 1) - math.lgamma(numel - nnz + 1)) \
        / math.log(2)
    return (positions + nnz * value_bits) / 8


def nonzero_value_bits(bits: int, asymmetric: bool = False) -> float:
    """Bits a non-zero level of a ``bits``-bit code carries (2^k − 2 choices symmetric, 2^k − 1
    asymmetric); float formats carry their full width."""
    if bits >= 16:
        return float(bits)
    return math.log2(2 * qmax(bits) + (1 if asymmetric else 0))
