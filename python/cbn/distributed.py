"""Synchronized batch statistics across ranks ("Distributed training" in README.md).

cbn never talks to a network itself. Synchronized training hands a small float64
buffer to a callback that sums it across ranks; everything else stays local.

**The callback contract.** An *allreduce* is any callable ``allreduce(buf)`` that
takes a 1-D, C-contiguous, writeable float64 NumPy array and sums it element-wise
across all ranks, either in place (returning ``None``) or by returning the summed
array (a float64 NumPy array of the same shape). Every rank must call it exactly
once per training forward and once per training backward, in the same order,
including ranks whose local batch is empty (they contribute zeros; without them
the others would wait forever). cbn sends 3·C values per call, C being the
channel count.

Adapters for the usual engines:

- :class:`MPIAllreduce` — mpi4py, one buffer-based ``Allreduce`` (no pickling);
- :class:`TorchAllreduce` — ``torch.distributed`` on a CPU backend (gloo, mpi),
  zero-copy through ``torch.from_numpy``;
- :class:`ThreadGroup` — ranks as threads of one process (tests, several streams).

A process-wide default (:func:`set_default_allreduce`) serves code that does not
pass a callback explicitly, such as ``cbn.BatchNormalization(synchronized=True)``.
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ._validate import is_integer

__all__ = [
    "Allreduce",
    "MPIAllreduce",
    "TorchAllreduce",
    "ThreadGroup",
    "set_default_allreduce",
    "get_default_allreduce",
    "resolve_allreduce",
]

#: The callback type: sums a 1-D float64 array across ranks, in place or returned.
Allreduce = Callable[[np.ndarray], np.ndarray | None]

_default_allreduce: Allreduce | None = None


def check_allreduce(fn: object, name: str = "allreduce") -> Allreduce | None:
    """``fn`` if it is callable or None, else ``TypeError``."""
    if fn is not None and not callable(fn):
        raise TypeError(
            f"{name} must be a callable that sums a float64 array across ranks, or None; "
            f"received {fn!r} of type {type(fn).__name__}"
        )
    return fn


def set_default_allreduce(fn: Allreduce | None) -> None:
    """Make ``fn`` the process-wide allreduce used when none is passed explicitly
    (``None`` clears it)."""
    global _default_allreduce
    _default_allreduce = check_allreduce(fn, "the default allreduce")


def get_default_allreduce() -> Allreduce | None:
    """The process-wide allreduce, or ``None`` if none is set."""
    return _default_allreduce


def resolve_allreduce(fn: Allreduce | None) -> Allreduce:
    """``fn`` if given, else the process default; ``ValueError`` if neither exists."""
    check_allreduce(fn)
    if fn is None:
        fn = _default_allreduce
    if fn is None:
        raise ValueError(
            "synchronized statistics need an allreduce callback and none is set: pass "
            "allreduce=... (e.g. cbn.distributed.MPIAllreduce()) or set a process default "
            "with cbn.distributed.set_default_allreduce(fn)"
        )
    return fn


def sum_across_ranks(fn: Allreduce, buf: np.ndarray) -> np.ndarray:
    """Run the one collective of a phase: ``fn`` on ``buf`` (which it may overwrite),
    returning the summed array after checking what ``fn`` gave back."""
    result = fn(buf)
    if result is None:
        return check_reduced(buf)
    if not isinstance(result, np.ndarray):
        raise TypeError(
            f"the allreduce callback returned {type(result).__name__}; expected None (the "
            f"buffer summed in place) or the summed float64 NumPy array of shape {buf.shape}"
        )
    if result.dtype != np.float64:
        raise TypeError(
            f"the allreduce callback returned an array of dtype {result.dtype}; expected "
            f"float64 (the buffer's dtype)"
        )
    if result.shape != buf.shape:
        raise ValueError(
            f"the allreduce callback returned an array of shape {result.shape}; expected "
            f"the buffer's shape {buf.shape}"
        )
    return check_reduced(np.ascontiguousarray(result))


def check_reduced(total: np.ndarray) -> np.ndarray:
    """The summed buffer's values, checked before any statistic is built from them.

    Both phases' buffers start with C counts (sums of per-rank position counts:
    finite, non-negative whole numbers) followed by 2·C sums that are finite
    whenever every rank's data is. Anything else means a broken callback, or
    NaN/Inf in some rank's batch, which would silently empty or poison the
    statistics of every rank: ``ValueError`` instead, before any state changes.
    """
    counts, sums = np.split(total, [total.size // 3])
    bad_count = ~np.isfinite(counts) | (counts < 0) | (np.abs(counts - np.rint(counts)) > 1e-6)
    if bad_count.any():
        i = int(np.flatnonzero(bad_count)[0])
        raise ValueError(
            f"the allreduce callback returned count {counts[i]!r} for channel {i}; expected "
            "a finite, non-negative whole number (the sum of the ranks' counts)"
        )
    if not np.isfinite(sums).all():
        i = int(np.flatnonzero(~np.isfinite(sums))[0]) % max(counts.size, 1)
        raise ValueError(
            f"the allreduce result has a non-finite sum for channel {i}: some rank's batch "
            "holds NaN or Inf there, or the callback is broken; synchronized statistics "
            "need finite data"
        )
    return total


class MPIAllreduce:
    """Sum over the ranks of an mpi4py communicator (``COMM_WORLD`` by default) with
    one ``comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)``."""

    def __init__(self, comm: Any = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as err:
            raise ImportError(
                f"MPIAllreduce needs mpi4py ({err}); install it with pip install 'cbn[mpi]' "
                "(mpi4py and MPICH from PyPI)"
            ) from err
        if comm is None:
            comm = MPI.COMM_WORLD
        if not isinstance(comm, MPI.Comm):
            raise TypeError(
                f"comm must be an mpi4py communicator (MPI.Comm); received {comm!r}"
            )
        self.comm = comm
        self._in_place = MPI.IN_PLACE
        self._sum = MPI.SUM

    def __call__(self, buf: np.ndarray) -> None:
        self.comm.Allreduce(self._in_place, buf, op=self._sum)

    def __repr__(self) -> str:
        return f"MPIAllreduce(size={self.comm.Get_size()}, rank={self.comm.Get_rank()})"


class TorchAllreduce:
    """Sum over a ``torch.distributed`` process group (the default group when
    ``group`` is None) with one ``all_reduce`` on a tensor sharing the buffer's
    memory. Needs a backend that reduces CPU tensors (gloo, mpi) and an initialized
    process group at call time."""

    def __init__(self, group: Any = None) -> None:
        try:
            import torch
            import torch.distributed as dist
        except ImportError as err:
            raise ImportError(f"TorchAllreduce needs PyTorch ({err})") from err
        if not dist.is_available():
            raise ImportError("TorchAllreduce needs a PyTorch build with torch.distributed")
        self.group = group
        self._torch = torch
        self._dist = dist

    def __call__(self, buf: np.ndarray) -> None:
        if not self._dist.is_initialized():
            raise ValueError(
                "TorchAllreduce: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group(...) on every rank first"
            )
        self._dist.all_reduce(self._torch.from_numpy(buf), op=self._dist.ReduceOp.SUM,
                              group=self.group)

    def __repr__(self) -> str:
        return f"TorchAllreduce(group={self.group!r})"


class ThreadGroup:
    """``n`` ranks as threads of one process: ``group[i]`` (or ``group.member(i)``) is
    the allreduce callback of rank ``i``; each member belongs to one thread.

    A collective completes when every member has called; each member then receives
    the sum of all members' buffers added in rank order, so every rank's result is
    bitwise identical. If a member does not arrive within ``timeout`` seconds (None:
    wait forever), or one fails inside the collective, or :meth:`abort` is called,
    the members waiting in it raise ``RuntimeError`` instead of hanging, and the group
    is broken for good (create a new one).
    """

    def __init__(self, n: int, timeout: float | None = 60.0) -> None:
        if not is_integer(n):
            raise TypeError(f"n must be an int; received {n!r}")
        if n < 1:
            raise ValueError(f"n must be at least 1; received {n}")
        if timeout is not None:
            if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
                raise TypeError(
                    f"timeout must be a number of seconds or None; received {timeout!r}"
                )
            if not timeout > 0:
                raise ValueError(f"timeout must be > 0 seconds; received {timeout!r}")
        self.size = int(n)
        self.timeout = None if timeout is None else float(timeout)
        self._barrier = threading.Barrier(self.size)
        self._slots: list[np.ndarray | None] = [None] * self.size
        self._busy = [False] * self.size
        self._busy_lock = threading.Lock()
        self._members = [_Member(self, rank) for rank in range(self.size)]

    def member(self, rank: int) -> _Member:
        """The callback of rank ``rank`` (0 <= rank < n)."""
        if not is_integer(rank):
            raise TypeError(f"rank must be an int; received {rank!r}")
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is out of range for a ThreadGroup of {self.size}")
        return self._members[int(rank)]

    __getitem__ = member

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[_Member]:
        return iter(self._members)

    def abort(self) -> None:
        """Break the group: members in or entering a collective raise at once. For a
        thread that fails before its collective, so the others need not wait for the
        timeout."""
        self._barrier.abort()

    def __repr__(self) -> str:
        return f"ThreadGroup(n={self.size}, timeout={self.timeout!r})"

    def _wait(self, rank: int) -> None:
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise RuntimeError(
                f"ThreadGroup rank {rank}: the collective was abandoned (a member failed, "
                f"abort() was called, or a member did not arrive within timeout="
                f"{self.timeout} s); the group is broken, create a new one"
            ) from None

    def _allreduce(self, rank: int, buf: np.ndarray) -> None:
        with self._busy_lock:
            if self._busy[rank]:
                raise ValueError(
                    f"ThreadGroup rank {rank} is already in a collective: each member "
                    "belongs to one thread"
                )
            self._busy[rank] = True
        try:
            if not (isinstance(buf, np.ndarray) and buf.dtype == np.float64 and buf.ndim == 1
                    and buf.flags.c_contiguous and buf.flags.writeable):
                self._barrier.abort()  # the others would otherwise wait for this rank
                raise TypeError(
                    f"ThreadGroup rank {rank}: expected a writeable 1-D contiguous float64 "
                    f"array; received {_describe(buf)}"
                )
            self._slots[rank] = buf
            self._wait(rank)  # every member has deposited its buffer
            slots = [slot for slot in self._slots if slot is not None]
            sizes = {slot.shape[0] for slot in slots}
            total = None
            if len(sizes) == 1 and len(slots) == len(self._slots):
                total = slots[0].copy()
                for slot in slots[1:]:
                    total += slot
            self._wait(rank)  # every member has read the others' buffers
            self._slots[rank] = None
            if total is None:
                # Every member sees the same sizes, so all raise together and the group
                # stays usable.
                raise ValueError(
                    f"ThreadGroup rank {rank}: the members' buffers differ in length "
                    f"({sorted(sizes)}); every rank must send the same number of values"
                )
            buf[...] = total
        finally:
            self._busy[rank] = False


class _Member:
    """One rank's allreduce callback in a :class:`ThreadGroup`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group = group
        self.rank = rank

    def __call__(self, buf: np.ndarray) -> None:
        self.group._allreduce(self.rank, buf)

    def __repr__(self) -> str:
        return f"<ThreadGroup member {self.rank} of {self.group.size}>"


def _describe(buf: object) -> str:
    if not isinstance(buf, np.ndarray):
        return type(buf).__name__
    flags = [] if buf.flags.c_contiguous else ["non-contiguous"]
    if not buf.flags.writeable:
        flags.append("read-only")
    return f"{' '.join(flags + [str(buf.dtype)])} array of shape {buf.shape}"
