"""Synchronized against local training step (forward + backward) on MPI ranks.

    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/distributed.py
    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/distributed.py --shape 8,14,14,256 --samples 51

Every rank holds its own batch of ``--shape`` (float32, channels last) and runs, in
lockstep, the local step (``cbn.ops.batch_norm_train`` then ``batch_norm_backward``) and
the synchronized one (the same with ``allreduce=MPIAllreduce()``: one allreduce of 3·C
float64 values in each), alternating which goes first; a barrier precedes every sample.
A sample's time is the slowest rank's (a synchronized step waits for it anyway); the
medians are reported, with the raw latency of one allreduce of 3·C values (median over
blocks of back-to-back calls). Target (the distributed issue): the synchronized step
costs at most 10% more than the local one, plus one allreduce latency.
"""

from __future__ import annotations

import argparse
import statistics
import time

import cbn
import numpy as np
from cbn.distributed import MPIAllreduce
from cbnbench.machine import LoadMonitor, describe
from mpi4py import MPI


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="32,56,56,64",
                   help="each rank's batch, channels last (32,56,56,64)")
    p.add_argument("--samples", type=int, default=31, help="timed steps of each kind (31)")
    p.add_argument("--latency-calls", type=int, default=2000,
                   help="allreduce calls per latency block (2000)")
    return p.parse_args()


class Step:
    """One training step's arrays on this rank, timed forward and backward."""

    def __init__(self, shape: tuple[int, ...], rank: int, allreduce) -> None:
        rng = np.random.default_rng(rank)
        c = shape[-1]
        self.x = rng.normal(3.0, 2.0, shape).astype(np.float32)
        self.dy = rng.normal(0.0, 1.0, shape).astype(np.float32)
        self.y = np.ones_like(self.x)    # touched: no first-use page faults in the timing
        self.dx = np.ones_like(self.x)
        self.gamma = rng.normal(1.0, 0.1, c).astype(np.float32)
        self.beta = np.zeros(c, np.float32)
        self.shift = np.full(c, 3.0)     # what a layer passes: its moving mean
        self.allreduce = allreduce

    def run(self, synchronized: bool) -> tuple[float, float]:
        sync = {"allreduce": self.allreduce, "shift": self.shift} if synchronized else {}
        t0 = time.perf_counter()
        _, mean, var = cbn.ops.batch_norm_train(self.x, gamma=self.gamma, beta=self.beta,
                                                out=self.y, **sync)
        t1 = time.perf_counter()
        cbn.ops.batch_norm_backward(self.dy, self.x, mean, var, gamma=self.gamma, out=self.dx,
                                    allreduce=sync.get("allreduce"))
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def allreduce_latency(comm, allreduce, values: int, calls: int, blocks: int = 21) -> float:
    """Median seconds per call of back-to-back allreduces of ``values`` float64."""
    buf = np.zeros(values)
    per_call = []
    for _ in range(blocks):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            allreduce(buf)
        per_call.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX) / calls)
    return statistics.median(per_call)


def main() -> None:
    args = parse_args()
    comm = MPI.COMM_WORLD
    rank, ranks = comm.Get_rank(), comm.Get_size()
    shape = tuple(int(s) for s in args.shape.split(","))
    allreduce = MPIAllreduce(comm)
    step = Step(shape, rank, allreduce)
    for synchronized in (False, True, False, True):  # warm-up
        step.run(synchronized)
    load = LoadMonitor()

    # Per kind of step, rows of (forward, backward, step) seconds, each the slowest rank's.
    times: dict[bool, list[np.ndarray]] = {False: [], True: []}
    for i in range(args.samples):
        for synchronized in ((False, True) if i % 2 == 0 else (True, False)):
            comm.Barrier()
            fwd, bwd = step.run(synchronized)
            worst = np.array([fwd, bwd, fwd + bwd])
            comm.Allreduce(MPI.IN_PLACE, worst, op=MPI.MAX)
            times[synchronized].append(worst)
    latency = allreduce_latency(comm, allreduce, 3 * shape[-1], args.latency_calls)
    if rank != 0:
        return
    others = load.other_cpus()

    local, synced = (np.median(np.array(times[kind]), axis=0) for kind in (False, True))
    overhead = synced[2] - local[2]
    allowed = 0.10 * local[2] + latency
    mb = np.prod(shape) * 4 / 1e6
    mpi_library = MPI.Get_library_version().splitlines()[0].strip()
    print(f"# cbn synchronized training step, {ranks} MPI ranks ({mpi_library})")
    for line in describe():
        print(f"- {line}")
    print(f"- cbn {cbn.__version__}, SIMD {cbn.show_config(print_out=False)['simd']}, "
          f"{cbn.get_num_threads()} OpenMP thread(s) per rank")
    print(f"- per rank: float32 {shape} ({mb:.1f} MB), channels last; {args.samples} samples "
          "of each step, interleaved; times are the slowest rank's, medians")
    if others is not None:
        # The other ranks count as "other" here; MPICH keeps each one CPU busy (it polls).
        busy = max(0.0, others - (ranks - 1))
        print(f"- machine load: other processes kept {busy:.2f} CPUs busy during the run "
              "(timings are only meaningful near 0)")
    print()
    print("| step | forward ms | backward ms | step ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, (f, b, s) in (("local", local), ("synchronized", synced)):
        print(f"| {name} | {f * 1e3:.3f} | {b * 1e3:.3f} | {s * 1e3:.3f} |")
    print(f"\nallreduce of {3 * shape[-1]} float64 values: {latency * 1e6:.1f} µs per call")
    verdict = "met" if overhead <= allowed else "NOT met"
    print(f"overhead: {overhead * 1e6:+.0f} µs = {overhead / local[2] * 100:+.2f}% of the local "
          f"step; target <= 10% + one allreduce = {allowed * 1e6:.0f} µs: {verdict}")


if __name__ == "__main__":
    main()
