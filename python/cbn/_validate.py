"""Argument checking and zero-copy conversion shared by ``cbn.ops`` and the layer.

Every function raises ``TypeError`` or ``ValueError`` whose message names the bad
value and says what was expected.
"""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Sequence

import numpy as np

from . import _core

#: dtypes the core reads and writes directly, besides bfloat16 (``is_bfloat16``).
KERNEL_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
is_bfloat16 = _core.is_bfloat16
#: The core's limit on dimensions (BN_MAX_RANK); no axis list can be longer.
MAX_RANK = _core.MAX_RANK


def _short_reprs() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlist = r.maxtuple = r.maxdict = 8
    r.maxstring = r.maxother = 60
    return r


#: Short reprs for messages about arbitrarily large user values.
short_repr = _short_reprs().repr


def _resolved_view_bits(x, name: str, writeable: bool):
    """A PyTorch-style tensor whose lazy negation/conjugation bit is set exports its
    storage through DLPack without the bit: read it resolved (a copy) as an input,
    refuse it as an output (writes would not reach the tensor the caller sees)."""
    flags = [bit for bit in ("neg", "conj") if getattr(x, f"is_{bit}", lambda: False)() is True]
    if not flags:
        return x
    if writeable:
        raise ValueError(
            f"{name} has its lazy {'/'.join(flags)} bit set; pass a resolved tensor "
            "(tensor.resolve_neg().resolve_conj()) as an output buffer"
        )
    return x.resolve_neg().resolve_conj()


def as_array(x, name: str = "x", *, writeable: bool = False) -> np.ndarray:
    """View ``x`` as a NumPy array without copying.

    Accepts NumPy arrays, DLPack producers (a PyTorch CPU tensor), objects with
    ``__array__`` and buffer-protocol objects. Complex, object, string and other
    non-real dtypes raise ``TypeError``. A tensor with a lazy negation or
    conjugation bit is copied resolved, or refused when ``writeable`` (an output).
    """
    if isinstance(x, np.ndarray):
        arr = x
    elif type(x).__module__.startswith("torch") and hasattr(x, "requires_grad"):
        arr = _torch_tensor_view(_resolved_view_bits(x, name, writeable), name)
    elif type(x).__name__ == "KerasTensor":
        raise TypeError(
            f"{name} is a symbolic KerasTensor (a Keras functional model under construction); "
            "cbn.BatchNormalization and cbn.ops compute on arrays. Inside Keras models use "
            "cbn.keras.BatchNormalization"
        )
    elif hasattr(x, "__dlpack__") and not isinstance(x, (bytes, bytearray, memoryview)):
        x = _resolved_view_bits(x, name, writeable)
        try:
            arr = np.from_dlpack(x)
        except (BufferError, TypeError, RuntimeError):
            arr = np.asarray(x)
    else:
        arr = np.asarray(x)
    if is_bfloat16(arr.dtype):
        return arr
    kind = arr.dtype.kind
    if kind not in "fiub":
        raise TypeError(
            f"{name} has dtype {arr.dtype}; expected a real floating, integer or bool "
            "array (float16, bfloat16, float32, float64, int*, uint*, bool)"
        )
    return arr


def _torch_tensor_view(t, name: str) -> np.ndarray:
    """A PyTorch CPU tensor as a NumPy view, refused when it requires grad."""
    if t.requires_grad:
        raise TypeError(
            f"{name} is a torch tensor that requires grad; cbn.ops computes on plain data and "
            f"records no autograd graph: pass {name}.detach() (cbn.ops.batch_norm_backward "
            "gives the gradients)"
        )
    try:
        return torch_numpy_view(t)
    except (TypeError, RuntimeError):
        return np.asarray(t)


def bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16, imported when first asked for (see ``is_bfloat16``)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def torch_numpy_view(t) -> np.ndarray:
    """The NumPy view of a CPU tensor's memory (no copy), bfloat16 as ml_dtypes' bfloat16."""
    if str(t.dtype) == "torch.bfloat16":
        import torch  # already imported by whoever made the tensor

        return t.view(torch.int16).numpy().view(bfloat16())
    return t.numpy()


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def check_axis_arg(axis, name: str = "axis") -> int | list[int]:
    """Validate an ``axis`` argument's type: an int or a non-empty list/tuple of ints.

    Returns a plain ``int`` or a ``list`` of ``int`` (NumPy integers converted).
    Range is only known once the rank is (see :func:`normalize_axes`).
    """
    if is_integer(axis):
        return int(axis)
    if isinstance(axis, (list, tuple)):
        if len(axis) == 0:
            raise ValueError(
                f"{name} must name at least one axis; received an empty {type(axis).__name__}"
            )
        if len(axis) > MAX_RANK:
            raise ValueError(
                f"{name} has {len(axis)} entries; an input has at most {MAX_RANK} dimensions"
            )
        bad = [a for a in axis if not is_integer(a)]
        if bad:
            raise TypeError(
                f"{name} must contain only ints; received {short_repr(axis)} "
                f"(bad entries: {short_repr(bad)})"
            )
        out = [int(a) for a in axis]
        if len(set(out)) != len(out):
            raise ValueError(f"{name} contains duplicate entries: {axis!r}")
        return out
    raise TypeError(
        f"{name} must be an int or a list/tuple of ints; "
        f"received {short_repr(axis)} of type {type(axis).__name__}"
    )


def normalize_axes(axis, rank: int, name: str = "axis") -> tuple[int, ...]:
    """Non-negative, sorted channel axes for an input of ``rank``.

    Out-of-range or duplicate (after wrapping negatives) axes raise ``ValueError``
    naming the axis and the rank.
    """
    checked = check_axis_arg(axis, name)
    axes = [checked] if isinstance(checked, int) else checked
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ValueError(
                f"{name}={axis!r} is out of range for an input of rank {rank}: "
                f"each axis must be in [{-rank}, {rank - 1}]"
            )
        out.append(a % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"{name}={axis!r} names the same axis twice for an input of rank {rank}")
    return tuple(sorted(out))


def channel_shape(shape: Sequence[int | None], axes: Sequence[int]) -> tuple[int, ...]:
    """Sizes of the channel axes in increasing axis order (the shape of the weights)."""
    return tuple(int(shape[a]) for a in axes)  # type: ignore[arg-type]  # known when called


def squeezed_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(s) for s in shape if s != 1)


def as_param(value, cshape: tuple[int, ...], name: str, dtype=np.float64) -> np.ndarray | None:
    """A per-channel parameter as a contiguous 1-D array of ``prod(cshape)`` values.

    Accepts the channel shape itself or any shape equal to it once size-1 dims are
    dropped (e.g. ``(1, H, 1, C)``); ``None`` passes through.
    """
    if value is None:
        return None
    arr = as_array(value, name)
    if arr.shape != cshape and squeezed_shape(arr.shape) != squeezed_shape(cshape):
        raise ValueError(
            f"{name} has shape {arr.shape}; expected {cshape} (the sizes of the normalized axes)"
        )
    return np.ascontiguousarray(arr, dtype=dtype).reshape(-1)


def canonical_mask(mask, shape: tuple[int, ...], name: str = "mask") -> np.ndarray | None:
    """A mask as a bool array of the input's rank that broadcasts to ``shape``.

    Forms: (a) one dimension fewer than the input: a trailing size-1
    axis is appended (a ``(B, T)`` mask for a ``(B, T, F)`` input); (b) the
    input's rank, broadcastable by NumPy rules. Non-zero means "use".
    """
    if mask is None:
        return None
    m = as_array(mask, name)
    rank = len(shape)
    if m.ndim == rank - 1:
        m = m[..., np.newaxis]
    if m.ndim != rank or any(ms not in (1, s) for ms, s in zip(m.shape, shape, strict=True)):
        raise ValueError(
            f"{name} has shape {tuple(as_array(mask).shape)}, which does not fit the input shape "
            f"{tuple(shape)}: expected the input's shape without its last axis, or a shape of the "
            "input's rank that broadcasts to it"
        )
    if m.dtype != np.bool_:
        m = m != 0
    return m


def check_out(out, like: np.ndarray, dtype: np.dtype, name: str = "out") -> np.ndarray:
    """Validate an ``out=`` buffer: an ndarray of ``like``'s shape and ``dtype``,
    writeable, and either ``like`` itself (in place) or not overlapping it."""
    if not isinstance(out, np.ndarray):
        out = as_array(out, name, writeable=True)
    if out.shape != like.shape:
        raise ValueError(f"{name} has shape {out.shape}; expected the input's shape {like.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} has dtype {out.dtype}; expected {dtype}")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only; expected a writeable array")
    same_layout = (
        out.__array_interface__["data"][0] == like.__array_interface__["data"][0]
        and out.strides == like.strides
    )
    if not same_layout and np.shares_memory(out, like):
        raise ValueError(
            f"{name} overlaps the input without being the same view; pass the input itself "
            "to normalize in place, or a separate buffer"
        )
    broadcast_axes = [n > 1 and st == 0 for n, st in zip(out.shape, out.strides, strict=True)]
    if out.size > 1 and any(broadcast_axes):
        raise ValueError(
            f"{name} has a stride-0 (broadcast) axis, so several results would share one "
            "element; expected a buffer with one element per position"
        )
    return out


def check_epsilon(epsilon) -> float:
    if isinstance(epsilon, (bool, np.bool_)) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a real number; received {epsilon!r}")
    try:
        eps = float(epsilon)
    except OverflowError:
        raise ValueError(
            f"epsilon must be finite and >= 0; received {short_repr(epsilon)}"
        ) from None
    if not eps >= 0.0 or eps == float("inf"):
        raise ValueError(f"epsilon must be finite and >= 0; received {epsilon!r}")
    return eps


def kernel_dtype(arr: np.ndarray) -> np.dtype:
    """The dtype the core computes ``arr`` in: 16/32/64-bit floats as they are,
    integers and bool as float32."""
    if arr.dtype in KERNEL_DTYPES or is_bfloat16(arr.dtype):
        return arr.dtype
    return np.dtype(np.float32)
