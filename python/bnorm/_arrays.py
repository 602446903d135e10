"""Adapters that let one implementation of the functional API serve NumPy arrays and torch tensors.

Each adapter answers the same questions about an array of its kind (dtype, shape, strides in
elements, whether it may be written) and makes the few new arrays the API needs (outputs in a given
layout, per-channel vectors, dense copies). Tensors are float32 or float64, and for torch also
bfloat16: a storage type whose per-channel vectors (running statistics, weight, bias and their
gradients) are float32, torch's CPU mixed-precision rule (NumPy has no bfloat16). Nothing here imports torch unless a torch tensor is
actually used, so `import bnorm` stays light for NumPy users.
"""

from __future__ import annotations

import sys

import numpy as np

from . import _bnorm

CHANNELS_FIRST = "channels_first"
CHANNELS_LAST = "channels_last"

# Counts the dense copies made of inputs whose memory is neither layout (tests check that contiguous
# and channels-last inputs are never copied).
copies_made = 0


def layout_of(shape, strides):
    """CHANNELS_FIRST, CHANNELS_LAST or None (neither) for memory with these strides (in elements,
    or None when they are not whole elements): the library's bnorm::layout_of, which the extension
    also uses to build its views. Channels-first where both hold (they are then the same memory)."""
    if strides is None:
        return None
    return _bnorm.layout_of(shape, strides)


def preferred_copy_layout(shape, strides):
    """The layout to copy a non-dense tensor into: channels-last when the channel stride is the
    smallest (a slice of channels-last memory), else channels-first."""
    if strides is None or len(shape) < 3:
        return CHANNELS_FIRST
    others = [abs(strides[i]) for i in range(len(shape)) if i != 1 and shape[i] > 1]
    if shape[1] > 1 and others and abs(strides[1]) < min(others):
        return CHANNELS_LAST
    return CHANNELS_FIRST


def _channels_last_shape(shape):
    return (shape[0], *shape[2:], shape[1])


class NumpyArrays:
    """NumPy ndarrays."""

    name = "numpy.ndarray"
    float64 = np.float64
    supported = "float32 and float64"

    @staticmethod
    def owns(x) -> bool:
        return isinstance(x, np.ndarray)

    @staticmethod
    def problem(x):
        """Why this array cannot be used at all (device, storage), or None."""
        return None

    @staticmethod
    def dtype_name(x) -> str:
        dt = x.dtype
        if dt.kind == "f" and dt.itemsize in (4, 8) and not dt.isnative:
            return f"{dt} (non-native byte order)"
        return str(dt)

    @staticmethod
    def is_supported_dtype(x) -> bool:
        return x.dtype == np.float32 or x.dtype == np.float64

    @staticmethod
    def same_dtype(a, b) -> bool:
        return a.dtype == b.dtype

    @staticmethod
    def is_float64(x) -> bool:
        return x.dtype == np.float64

    @staticmethod
    def vector_dtype_ok(v, input) -> bool:
        """v has the dtype of input's per-channel vectors (input's own: float32 or float64)."""
        return v.dtype == input.dtype

    @staticmethod
    def vector_dtype_name(input) -> str:
        return str(input.dtype)

    @staticmethod
    def is_reduced(x) -> bool:
        """True for a storage-only dtype computed in float32 (never, for NumPy)."""
        return False

    @staticmethod
    def shape(x):
        return tuple(x.shape)

    @staticmethod
    def size_str(shape) -> str:
        return str(tuple(shape))

    @staticmethod
    def strides(x):
        size = x.itemsize
        if not x.flags.aligned or any(s % size for s in x.strides):
            return None  # copied into aligned, dense memory first
        return tuple(s // size for s in x.strides)

    @staticmethod
    def numel(x) -> int:
        return int(x.size)

    @staticmethod
    def writable(x) -> bool:
        return bool(x.flags.writeable)

    @staticmethod
    def requires_grad(x) -> bool:
        return False

    @staticmethod
    def for_kernel(x):
        return x

    @staticmethod
    def copy_to(x, layout, count=True):
        global copies_made
        copies_made += count
        # np.array(copy=True), not np.ascontiguousarray: a contiguous but unaligned array must be
        # copied too (the library refuses misaligned pointers).
        if layout == CHANNELS_LAST:
            return np.moveaxis(np.array(np.moveaxis(x, 1, -1), order="C", copy=True), -1, 1)
        return np.array(x, order="C", copy=True)

    @staticmethod
    def empty(shape, like, layout):
        if layout == CHANNELS_LAST:
            return np.moveaxis(np.empty(_channels_last_shape(shape), dtype=like.dtype), -1, 1)
        return np.empty(shape, dtype=like.dtype)

    @staticmethod
    def empty_vector(n, like=None, float64=False):
        """n values of the dtype of like's per-channel vectors (float64 when asked or no like)."""
        return np.empty(n, dtype=np.float64 if float64 or like is None else like.dtype)

    @staticmethod
    def zeros_vector(n, like):
        return np.zeros(n, dtype=like.dtype)

    @staticmethod
    def contiguous_vector(v):
        """v's values as a contiguous array (v itself when it already is)."""
        return v if v.flags.c_contiguous and v.flags.aligned else np.array(v, order="C", copy=True)

    @staticmethod
    def write_back(dst, src):
        if dst is not src:
            dst[...] = src.reshape(dst.shape)

    @staticmethod
    def as_numpy(v):
        return v

    @staticmethod
    def clone_vector(v):
        return np.array(v, copy=True).reshape(-1)


class TorchTensors:
    """torch.Tensor on the CPU (torch is imported by whoever made the tensor)."""

    name = "torch.Tensor"
    supported = "float32, float64 and bfloat16"

    @staticmethod
    def _torch():
        return sys.modules["torch"]

    @staticmethod
    def owns(x) -> bool:
        torch = sys.modules.get("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    @staticmethod
    def problem(x):
        if x.device.type != "cpu":
            return f"is on device '{x.device}', but bnorm runs on the CPU only (move it with .cpu())"
        torch = TorchTensors._torch()
        if x.layout != torch.strided:
            return f"has layout {x.layout}, but bnorm needs a dense (strided) tensor (use .to_dense())"
        return None

    @staticmethod
    def dtype_name(x) -> str:
        return str(x.dtype).replace("torch.", "")

    @staticmethod
    def is_supported_dtype(x) -> bool:
        torch = TorchTensors._torch()
        return x.dtype == torch.float32 or x.dtype == torch.float64 or x.dtype == torch.bfloat16

    @staticmethod
    def same_dtype(a, b) -> bool:
        return a.dtype == b.dtype

    @staticmethod
    def is_float64(x) -> bool:
        return x.dtype == TorchTensors._torch().float64

    @staticmethod
    def _vector_dtype(input):
        """The dtype of input's per-channel vectors: float32 for bfloat16, else input's own."""
        torch = TorchTensors._torch()
        return torch.float32 if input.dtype == torch.bfloat16 else input.dtype

    @staticmethod
    def vector_dtype_ok(v, input) -> bool:
        return v.dtype == TorchTensors._vector_dtype(input)

    @staticmethod
    def vector_dtype_name(input) -> str:
        return str(TorchTensors._vector_dtype(input)).replace("torch.", "")

    @staticmethod
    def is_reduced(x) -> bool:
        """True for bfloat16: stored in 16 bits, computed in float32 with float32 vectors."""
        return x.dtype == TorchTensors._torch().bfloat16

    @staticmethod
    def shape(x):
        return tuple(x.shape)

    @staticmethod
    def size_str(shape) -> str:
        return str(TorchTensors._torch().Size(shape))

    @staticmethod
    def strides(x):
        return tuple(x.stride())

    @staticmethod
    def numel(x) -> int:
        return int(x.numel())

    @staticmethod
    def writable(x) -> bool:
        return True

    @staticmethod
    def requires_grad(x) -> bool:
        return bool(x.requires_grad)

    @staticmethod
    def for_kernel(x):
        # DLPack refuses tensors that require grad; the kernels never record anything for autograd.
        return x.detach()

    @staticmethod
    def copy_to(x, layout, count=True):
        global copies_made
        copies_made += count
        x = x.detach()
        if layout == CHANNELS_LAST:
            return x.movedim(1, -1).contiguous().movedim(-1, 1)
        return x.contiguous()

    @staticmethod
    def empty(shape, like, layout):
        torch = TorchTensors._torch()
        if layout == CHANNELS_LAST:
            return torch.empty(_channels_last_shape(shape), dtype=like.dtype).movedim(-1, 1)
        return torch.empty(shape, dtype=like.dtype)

    @staticmethod
    def empty_vector(n, like=None, float64=False):
        torch = TorchTensors._torch()
        return torch.empty(n, dtype=torch.float64 if float64 or like is None else TorchTensors._vector_dtype(like))

    @staticmethod
    def zeros_vector(n, like):
        return TorchTensors._torch().zeros(n, dtype=TorchTensors._vector_dtype(like))

    @staticmethod
    def contiguous_vector(v):
        v = v.detach()
        return v if v.is_contiguous() else v.contiguous()

    @staticmethod
    def write_back(dst, src):
        if dst.data_ptr() != src.data_ptr() or dst.stride() != src.stride():
            torch = TorchTensors._torch()
            with torch.no_grad():
                dst.copy_(src.reshape(dst.shape))

    @staticmethod
    def as_numpy(v):
        return v.detach().numpy()

    @staticmethod
    def clone_vector(v):
        return v.detach().reshape(-1).clone()


def kind_of(x):
    """The adapter for x, or None when x is neither a NumPy array nor a torch tensor."""
    if NumpyArrays.owns(x):
        return NumpyArrays
    if TorchTensors.owns(x):
        return TorchTensors
    return None
