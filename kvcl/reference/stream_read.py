"""Numpy reference of ``kernels/stream_read.cl``: the sum of every element read."""

import numpy as np


def stream_read(src: np.ndarray) -> float:
    """Sum of a float32 buffer (the kernel returns per-work-item partial sums of it)."""
    return float(np.asarray(src, dtype=np.float64).sum())
