"""Shared helpers for bnorm's Python tests: random data, layouts and tolerances."""

import numpy as np
import torch

DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}

# bnorm accumulates in double; torch's float32 CPU path in float32 (outputs agree to a few ulps of
# the output's scale, reductions such as grad_weight to ~1e-6 of theirs).
TOL = {
    torch.float32: dict(rtol=2e-4, atol=2e-5),
    torch.float64: dict(rtol=1e-9, atol=1e-10),
}
GRAD_TOL = {
    torch.float32: dict(rtol=5e-4, atol=2e-4),
    torch.float64: dict(rtol=1e-8, atol=1e-9),
}


def close(actual, expected, dtype, grad=False):
    """Asserts that two arrays or tensors agree within the tolerance for dtype."""
    tol = (GRAD_TOL if grad else TOL)[dtype]
    a = actual.detach() if isinstance(actual, torch.Tensor) else torch.from_numpy(np.asarray(actual))
    e = expected.detach() if isinstance(expected, torch.Tensor) else torch.from_numpy(np.asarray(expected))
    torch.testing.assert_close(a, e, **tol)


def random_shape(rng, rank):
    """A small random (N, C, ...) shape of the given rank with more than one value per channel."""
    while True:
        shape = [int(rng.integers(1, 6)), int(rng.integers(1, 7))] + [int(rng.integers(1, 6)) for _ in range(rank - 2)]
        m = shape[0] * int(np.prod(shape[2:], dtype=np.int64))
        if m > 1:
            return tuple(shape)


def random_input(rng, shape, np_dtype):
    """Values with a per-channel offset and scale, so that the statistics matter."""
    C = shape[1]
    bshape = (1, C) + (1,) * (len(shape) - 2)
    offset = rng.uniform(-3, 3, size=bshape)
    scale = rng.uniform(0.5, 2.5, size=bshape)
    return (rng.standard_normal(shape) * scale + offset).astype(np_dtype)


def channels_last_numpy(a):
    """The same logical array in channels-last memory (N, ..., C)."""
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


def channels_last_torch(t):
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


def is_channels_last(t):
    """Channels-last strides (for a NumPy array or a torch tensor), rank >= 3."""
    if isinstance(t, np.ndarray):
        strides = tuple(s // t.itemsize for s in t.strides)
        shape = t.shape
    else:
        strides, shape = t.stride(), tuple(t.shape)
    order = [0, *range(2, len(shape)), 1]
    expected = 1
    for axis in reversed(order):
        if shape[axis] != 1 and strides[axis] != expected:
            return False
        expected *= shape[axis]
    return True


def vectors(rng, C, np_dtype):
    """running_mean, running_var, weight, bias as NumPy arrays."""
    return (
        rng.uniform(-1, 1, C).astype(np_dtype),
        rng.uniform(0.5, 2, C).astype(np_dtype),
        rng.uniform(0.5, 1.5, C).astype(np_dtype),
        rng.uniform(-1, 1, C).astype(np_dtype),
    )
