"""The thread count of bnorm's kernels, in both copies of the library that the package holds: the
extension's (bnorm._bnorm) and the torch operators' (bnorm._ops, loaded with bnorm.torch)."""

from __future__ import annotations

from . import _bnorm

_requested = None  # the last set_num_threads(n), which a copy of the library loaded later gets too
_followers = []


def set_num_threads(n: int) -> None:
    """Sets the number of threads bnorm's kernels use (default: OpenMP's maximum). n >= 1. It holds
    for the NumPy path and for the torch operators (bnorm.torch), whose library is a copy of its own."""
    global _requested
    _bnorm.set_num_threads(n)
    _requested = n
    for set_threads in _followers:
        set_threads(n)


def num_threads() -> int:
    """The number of threads bnorm's kernels use."""
    return _bnorm.num_threads()


def follow(set_threads) -> None:
    """set_threads(n) gets every later set_num_threads(n), and the last one before now."""
    _followers.append(set_threads)
    if _requested is not None:
        set_threads(_requested)
