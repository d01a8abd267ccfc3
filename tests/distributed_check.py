"""One rank's share of a synchronized ``cbn.ops`` training step, checked against float64
NumPy on the whole batch (spec R14, distributed.md).

Every rank builds the same global batch from a seed, takes its shard along the first
reduction axis (uneven, possibly empty) and runs ``batch_norm_train`` and
``batch_norm_backward`` with an allreduce callback. The results must match
``reference.py``'s single-process float64 values on the concatenated batch: statistics
within 1e-6 relative (R14.2), this rank's slice of ``y`` and ``dx``, and its own
``dgamma``/``dbeta``; with exactly one callback call per forward and per backward, and
none for a backward with ``training=False`` (R14.3).

Imported by ``test_distributed.py`` (ranks as threads of a ``ThreadGroup``) and run as a
script by ``test_distributed_engines.py``, one process per rank::

    mpiexec -n 3 python tests/distributed_check.py mpi
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 \
        python tests/distributed_check.py torch

Each rank prints ``rank R of W: K cases ok`` and exits 0, or prints what failed and
exits 1.
"""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass

import numpy as np
import reference
from cbn import distributed, ops

EPS = 1e-3
U32 = 2.0**-24
U64 = 2.0**-53
#: R14.2: synchronized statistics equal the whole batch's within this relative error.
STATS_RTOL = 1e-6


@dataclass(frozen=True)
class Case:
    """A global batch and how it is split; ``shape`` is the concatenated batch."""

    name: str
    shape: tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    dtype: str = "float32"
    #: None; "keras": the input's shape without its last axis; "broadcast": the input's
    #: rank with size 1 on the channel axes.
    mask: str | None = None
    #: "uneven": rank r gets a share proportional to r + 1; "empty": the same, but rank 1
    #: gets nothing; "one": rank 0 gets everything.
    split: str = "uneven"
    loc: float = 3.0
    scale: float = 2.0
    #: Pass a shift near the mean, as a layer passes its moving mean.
    shift: bool = False
    seed: int = 0


CASES = (
    Case("nhwc", (12, 5, 6, 16), 3),
    Case("nchw_f64", (11, 8, 4, 5), 1, dtype="float64", seed=1),
    Case("nhwc_keras_mask", (10, 4, 5, 8), 3, mask="keras", seed=2),
    Case("nchw_broadcast_mask", (9, 6, 4, 4), 1, mask="broadcast", seed=3),
    Case("axis_list_mask", (10, 4, 3, 6), (1, 3), mask="keras", dtype="float64", seed=4),
    Case("empty_rank", (13, 7, 12), 2, split="empty", seed=5),
    Case("empty_rank_mask", (13, 7, 12), 2, mask="keras", split="empty", seed=6),
    Case("all_on_rank0", (8, 6), 1, split="one", seed=7),
    Case("channels_first_2d", (6, 40), 0, mask="keras", seed=8),
    Case("single_channel", (40, 3, 1), -1, mask="broadcast", seed=9),
    Case("mean_1e6_f64", (16, 9, 4), -1, dtype="float64", loc=1e6, scale=1.0, shift=True,
         seed=10),
    Case("mean_1e5_f32", (16, 9, 4), -1, loc=1e5, scale=1.0, shift=True, seed=11),
    Case("parallel_size", (24, 40, 40), -1, mask="keras", seed=12),
)


def shard_axis(case: Case) -> int:
    """The axis the batch is split along: the first reduction axis."""
    axes = reference.axes_of(case.axis, len(case.shape))
    return next(a for a in range(len(case.shape)) if a not in axes)


def shard_bounds(case: Case, world: int, rank: int) -> tuple[int, int]:
    total = case.shape[shard_axis(case)]
    weights = np.arange(1.0, world + 1.0)
    if case.split == "empty" and world > 1:
        weights[1] = 0.0
    elif case.split == "one":
        weights[1:] = 0.0
    ends = np.floor(np.cumsum(weights) / weights.sum() * total + 1e-9).astype(int)
    ends[-1] = total
    starts = np.concatenate([[0], ends[:-1]])
    return int(starts[rank]), int(ends[rank])


@dataclass
class Batch:
    """The global batch every rank builds from the case's seed."""

    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    mask: np.ndarray | None
    shift: np.ndarray | None


def make_batch(case: Case) -> Batch:
    rng = np.random.default_rng(case.seed)
    rank = len(case.shape)
    axes = reference.axes_of(case.axis, rank)
    cshape = reference.channel_shape(case.shape, axes)
    x = rng.normal(case.loc, case.scale, case.shape).astype(case.dtype)
    dy = rng.normal(0.0, 1.0, case.shape).astype(case.dtype)
    gamma = rng.normal(1.0, 0.3, cshape)
    beta = rng.normal(0.0, 0.3, cshape)
    mask = None
    if case.mask == "keras":
        mask = rng.random(case.shape[:-1]) > 0.3
    elif case.mask == "broadcast":
        mask = rng.random(tuple(1 if a in axes else s for a, s in enumerate(case.shape))) > 0.3
    if mask is not None:
        mask.reshape(-1)[0] = True
    shift = None
    if case.shift:
        shift = case.loc + 0.5 * case.scale * rng.standard_normal(cshape)
    return Batch(x, dy, gamma, beta, mask, shift)


def take_shard(case: Case, batch: Batch, world: int, rank: int) -> Batch:
    axis = shard_axis(case)
    lo, hi = shard_bounds(case, world, rank)

    def cut(a: np.ndarray) -> np.ndarray:
        index = [slice(None)] * a.ndim
        index[axis] = slice(lo, hi)
        return a[tuple(index)]

    mask = batch.mask
    if mask is not None and axis < mask.ndim and mask.shape[axis] != 1:
        mask = cut(mask)
    return Batch(cut(batch.x), cut(batch.dy), batch.gamma, batch.beta, mask, batch.shift)


class CountingAllreduce:
    """Wraps a callback and counts its calls."""

    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, buf: np.ndarray):
        self.calls += 1
        return self.fn(buf)


@dataclass
class RankResult:
    mean: np.ndarray
    variance: np.ndarray


def run_rank(case: Case, world: int, rank: int, allreduce) -> RankResult:
    """This rank's synchronized forward and backward on its shard, checked against the
    whole-batch float64 reference. Every rank makes the same collective calls whatever
    the checks find, so a failing check cannot leave the others waiting."""
    full = make_batch(case)
    part = take_shard(case, full, world, rank)
    counted = CountingAllreduce(allreduce)
    y, mean, var = ops.batch_norm_train(part.x, gamma=part.gamma, beta=part.beta,
                                        axis=case.axis, epsilon=EPS, mask=part.mask,
                                        allreduce=counted, shift=part.shift)
    forward_calls = counted.calls
    dx, dgamma, dbeta = ops.batch_norm_backward(part.dy, part.x, mean, var, gamma=part.gamma,
                                                axis=case.axis, epsilon=EPS, mask=part.mask,
                                                allreduce=counted)
    backward_calls = counted.calls - forward_calls
    ops.batch_norm_backward(part.dy, part.x, mean, var, gamma=part.gamma, axis=case.axis,
                            epsilon=EPS, mask=part.mask, training=False, allreduce=counted)
    inference_calls = counted.calls - forward_calls - backward_calls

    where = f"case {case.name}, rank {rank} of {world}, shard {part.x.shape}"
    assert (forward_calls, backward_calls, inference_calls) == (1, 1, 0), (
        f"{where}: collective calls (forward, backward, backward with training=False) = "
        f"{(forward_calls, backward_calls, inference_calls)}; expected (1, 1, 0)")
    check_statistics(case, full, mean, var, where)
    check_shard(case, full, part, world, rank, (y, mean, var), (dx, dgamma, dbeta), where)
    return RankResult(mean, var)


def check_statistics(case: Case, full: Batch, mean, var, where: str) -> None:
    ref_mean, ref_var = reference.moments(full.x, case.axis, full.mask)
    stats_dtype = np.float64 if case.dtype == "float64" else np.float32
    assert mean.dtype == stats_dtype and var.dtype == stats_dtype, (where, mean.dtype)
    assert mean.shape == ref_mean.shape and var.shape == ref_var.shape, (where, mean.shape)
    m64, v64 = mean.astype(np.float64), var.astype(np.float64)
    tol_mean = STATS_RTOL * (np.abs(ref_mean) + np.sqrt(ref_var)) + 1e-300
    tol_var = STATS_RTOL * ref_var + 1e-300
    np.testing.assert_array_less(np.abs(m64 - ref_mean), tol_mean, err_msg=f"{where}: mean")
    np.testing.assert_array_less(np.abs(v64 - ref_var), tol_var, err_msg=f"{where}: variance")


def check_shard(case: Case, full: Batch, part: Batch, world: int, rank: int, forward, backward,
                where: str) -> None:
    """This rank's outputs against its slice of the whole-batch reference: ``y`` for the
    exact statistics; ``dx``, ``dgamma``, ``dbeta`` for the statistics the backward was
    given (the forward's, float32 for float32 data), so the check is as tight for a mean
    far from zero as near it.

    Tolerances: ``k·u`` of the output's scale (``u`` the compute precision's unit
    roundoff, k = 16 for float32 and 64 for float64), plus, far from zero, the rounding
    of a float64 mean (``2**-53·|mean|/std`` per channel), which the reference carries
    too."""
    y, mean, var = forward
    dx, dgamma, dbeta = backward
    axes = reference.axes_of(case.axis, len(case.shape))
    red = tuple(a for a in range(len(case.shape)) if a not in axes)
    bs = reference.bshape(case.shape, axes)
    ref_mean, ref_var = reference.moments(full.x, case.axis, full.mask)
    given_mean, given_var = mean.astype(np.float64), var.astype(np.float64)
    y_ref = reference.normalize(full.x, ref_mean, ref_var, full.gamma, full.beta, case.axis, EPS)
    dx_ref, _, _ = reference.backward(full.dy, full.x, full.gamma, case.axis, full.mask, EPS,
                                      mean=given_mean, variance=given_var)
    refs = take_shard(case, Batch(y_ref, dx_ref, full.gamma, full.beta, None, None), world, rank)
    y_ref, dx_ref = refs.x, refs.dy
    s = 1.0 / np.sqrt(ref_var.reshape(bs) + EPS)
    g = np.abs(full.gamma.reshape(bs))
    far = U64 * np.abs(ref_mean.reshape(bs)) * s
    u, k = (U64, 64) if case.dtype == "float64" else (U32, 16)

    assert y.dtype == part.x.dtype and y.shape == part.x.shape, (where, y.dtype, y.shape)
    tol = k * (u * max(1.0, float(np.abs(y_ref).max(initial=0.0))) + g * far)
    np.testing.assert_array_less(np.abs(y - y_ref), np.broadcast_to(tol, y.shape),
                                 err_msg=f"{where}: y")

    # dx is a difference of terms of size |γ·s·dy|; its error is relative to that scale.
    dy64 = part.dy.astype(np.float64)
    assert dx.dtype == part.x.dtype and dx.shape == part.x.shape, (where, dx.dtype, dx.shape)
    tol = 4 * k * g * s * (np.abs(dy64) + 1) * (u + far)
    np.testing.assert_array_less(np.abs(dx - dx_ref), tol, err_msg=f"{where}: dx")

    # dγ, dβ stay this rank's own: sums over its shard, with the global statistics.
    xhat = reference.normalize(part.x, given_mean, given_var, None, None, case.axis, EPS)
    dgamma_ref = (dy64 * xhat).sum(axis=red).reshape(dgamma.shape)
    dbeta_ref = dy64.sum(axis=red).reshape(dbeta.shape)
    scale = (np.abs(dy64) * (np.abs(xhat) + 1)).sum(axis=red).reshape(dgamma.shape)
    tol = 4 * k * (u + far.reshape(dgamma.shape)) * scale + 1e-300
    np.testing.assert_array_less(np.abs(dgamma - dgamma_ref), tol, err_msg=f"{where}: dgamma")
    np.testing.assert_array_less(np.abs(dbeta - dbeta_ref), tol, err_msg=f"{where}: dbeta")


@dataclass
class Engine:
    """One process of a real engine: its place and callback, how to stop every rank
    after an unexpected error, and how to shut down."""

    world: int
    rank: int
    allreduce: object
    abort: object = None
    close: object = None


def start_engine(name: str) -> Engine:
    if name == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        try:
            distributed.MPIAllreduce(comm=3)
        except TypeError:
            pass
        else:
            raise AssertionError("MPIAllreduce(comm=3) did not raise TypeError")
        return Engine(comm.Get_size(), comm.Get_rank(), distributed.MPIAllreduce(comm),
                      abort=lambda: comm.Abort(1))
    if name == "torch":
        import datetime

        import torch.distributed as dist

        # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); the timeout also bounds a
        # collective that a failed rank never joins.
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        return Engine(dist.get_world_size(), dist.get_rank(), distributed.TorchAllreduce(),
                      close=dist.destroy_process_group)
    raise SystemExit(f"usage: {sys.argv[0]} mpi|torch")


def main() -> int:
    engine = start_engine(sys.argv[1] if len(sys.argv) > 1 else "")
    where = f"rank {engine.rank} of {engine.world}"
    failures = []
    for case in CASES:
        try:
            run_rank(case, engine.world, engine.rank, engine.allreduce)
        except AssertionError as err:
            failures.append(f"{case.name}: {err}")
        except Exception:
            # Not a failed check: this rank may have skipped a collective, so stop them all.
            traceback.print_exc()
            sys.stdout.flush()
            if engine.abort is not None:
                engine.abort()
            return 1
    for failure in failures:
        print(f"{where}: FAILED {failure}", flush=True)
    if not failures:
        print(f"{where}: {len(CASES)} cases ok", flush=True)
    if engine.close is not None:
        engine.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
