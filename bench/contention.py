"""cbn and PyTorch when the cores are shared: idle, beside a busy process, 4 callers.

    python bench/contention.py                    # the compare.py cases, 1 and 2 threads
    python bench/contention.py --quick            # the quick cases, fewer samples
    python bench/contention.py --cases 4x56x56x64 --modes train --scenarios busy

Scenarios: ``idle`` (nothing else runs), ``busy`` (one other process spins on a
core; this script starts it and always stops it), ``callers`` (4 Python threads
call at once, each on its own arrays). For idle and busy, the median time per call
(cbn and torch sampled in turn, as in compare.py) and the ratio of the 2-thread to
the 1-thread time; for callers, the calls per second of all 4 together and the
ratio to 1 thread per caller. Last, the CPU time the process uses in the first 2 ms,
the next 8 ms and the rest of an idle second after a burst of 2-thread calls (threads
that spin on after a call).
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from cbnbench.cases import MODES, Case, CaseData, make_data, select_cases
from cbnbench.impls import CbnLibrary, Library, TorchLibrary
from cbnbench.timing import DEFAULT, QUICK, Policy, interleaved_medians

SCENARIOS = ("idle", "busy", "callers")
CALLERS = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick case set, fewer samples")
    p.add_argument("--cases", default=None, help="comma-separated case names, 'all' or 'quick'")
    p.add_argument("--modes", default=",".join(MODES), help="infer,train,backward")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="idle,busy,callers")
    p.add_argument("--callers-seconds", type=float, default=None,
                   help="seconds each 4-caller throughput sample runs (0.3; 0.1 with --quick)")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if not set(args.modes) <= set(MODES) or not set(args.scenarios) <= set(SCENARIOS):
        p.error(f"--modes takes {', '.join(MODES)}; --scenarios takes {', '.join(SCENARIOS)}")
    if args.callers_seconds is None:
        args.callers_seconds = 0.1 if args.quick else 0.3
    return args


@contextmanager
def busy_neighbour():
    """Another process spinning on a core for the duration (killed on every exit path)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    stop = atexit.register(proc.kill)
    try:
        time.sleep(0.2)  # let it take its core
        yield
    finally:
        proc.kill()
        proc.wait()
        atexit.unregister(stop)


def bind(library: Library, data: CaseData, mode: str):
    calls = library.bind(data, mode)
    return calls["cbn-out"] if isinstance(library, CbnLibrary) else calls["torch"]


def time_per_call(libraries: list[Library], data: CaseData, mode: str, threads: int,
                  policy: Policy) -> dict[str, float]:
    for library in libraries:
        library.set_threads(threads)
    calls = {lib.name: bind(lib, data, mode) for lib in libraries}
    return interleaved_medians(calls, policy)


def throughput(library: Library, datas: list[CaseData], mode: str, seconds: float) -> float:
    """Calls per second of CALLERS threads calling at once, each on its own arrays."""
    calls = [bind(library, d, mode) for d in datas]
    for call in calls:
        call()
    counts = [0] * len(calls)
    start = threading.Barrier(len(calls) + 1)
    deadline = [0.0]

    def caller(i: int) -> None:
        start.wait()
        while time.perf_counter() < deadline[0]:
            calls[i]()
            counts[i] += 1

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(len(calls))]
    for w in workers:
        w.start()
    began = time.perf_counter()
    deadline[0] = began + seconds
    start.wait()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - began)


def callers_rates(libraries: list[Library], case: Case, mode: str, args) -> dict:
    """Median over rounds of the 4-caller rate per (library, threads per call); the
    libraries and thread counts take turns, round after round."""
    datas = [make_data(case, seed=i) for i in range(CALLERS)]
    rates: dict[tuple[str, int], list[float]] = {}
    for _ in range(3 if args.quick else 5):
        for library in libraries:
            for threads in (1, 2):
                library.set_threads(threads)
                rate = throughput(library, datas, mode, args.callers_seconds)
                rates.setdefault((library.name, threads), []).append(rate)
    return {key: statistics.median(v) for key, v in rates.items()}


def idle_cpu(seconds: float) -> float:
    """ms of process CPU time (every thread's) during `seconds` of sleep."""
    cpu = time.process_time()
    time.sleep(seconds)
    return (time.process_time() - cpu) * 1e3


#: The idle windows after a burst (s): the target is "no spinning after 2 ms".
WINDOWS = (0.002, 0.008, 0.990)
BURSTS = 7


def idle_cpu_after_burst(library: Library, data: CaseData) -> list[float]:
    """ms of process CPU time in each of the WINDOWS of sleep that follow 200
    back-to-back 2-thread training calls: medians over BURSTS bursts."""
    library.set_threads(2)
    call = bind(library, data, "train")
    samples = []
    for _ in range(BURSTS):
        for _ in range(200):
            call()
        samples.append([idle_cpu(w) for w in WINDOWS])
    return [statistics.median(s[i] for s in samples) for i in range(len(WINDOWS))]


def per_call_table(libraries, cases, args, policy) -> list[str]:
    lines = ["| scenario | case | layout | mode | " + " | ".join(
        f"{lib.name} 1 thr ms | {lib.name} 2 thr ms | {lib.name} 2/1" for lib in libraries) + " |",
        "|" + "---|" * (4 + 3 * len(libraries))]
    for scenario in [s for s in args.scenarios if s != "callers"]:
        neighbour = busy_neighbour() if scenario == "busy" else _nothing()
        with neighbour:
            for case in cases:
                data = make_data(case)
                for mode in args.modes:
                    ms = {n: time_per_call(libraries, data, mode, n, policy) for n in (1, 2)}
                    cells = []
                    for lib in libraries:
                        one, two = ms[1][lib.name] * 1e3, ms[2][lib.name] * 1e3
                        cells += [f"{one:.3f}", f"{two:.3f}", f"{two / one:.2f}"]
                    lines.append(f"| {scenario} | {case.name} | {case.layout} | {mode} | "
                                 + " | ".join(cells) + " |")
                    print(lines[-1], flush=True)
    return lines


def callers_table(libraries, cases, args) -> list[str]:
    lines = ["| case | layout | mode | " + " | ".join(
        f"{lib.name} 1 thr/caller calls/s | {lib.name} 2 thr/caller calls/s | {lib.name} 2/1"
        for lib in libraries) + " |", "|" + "---|" * (3 + 3 * len(libraries))]
    for case in cases:
        for mode in args.modes:
            rates = callers_rates(libraries, case, mode, args)
            cells = []
            for lib in libraries:
                one, two = rates[(lib.name, 1)], rates[(lib.name, 2)]
                cells += [f"{one:.0f}", f"{two:.0f}", f"{two / one:.2f}"]
            lines.append(f"| {case.name} | {case.layout} | {mode} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return lines


@contextmanager
def _nothing():
    yield


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cases = [c for c in select_cases(args.cases, args.quick) if c.name != "2x3"]
    policy = QUICK if args.quick else DEFAULT
    libraries: list[Library] = [CbnLibrary(), TorchLibrary()]
    print(f"Command: python bench/contention.py {' '.join(sys.argv[1:])}\n")
    lines = per_call_table(libraries, cases, args, policy)
    if "callers" in args.scenarios:
        lines += ["", f"{CALLERS} Python threads calling at once:", ""]
        lines += callers_table(libraries, cases, args)
    burst = make_data(cases[0])
    floor = [idle_cpu(w) for w in WINDOWS]
    spans = ", ".join(f"{a * 1e3:g}-{(a + w) * 1e3:g} ms" for a, w in
                      zip((0, *itertools.accumulate(WINDOWS)), WINDOWS, strict=False))
    lines += ["", f"Process CPU time (ms) in the idle windows {spans} after 200 2-thread "
              f"training calls of {cases[0].name} (median of {BURSTS} bursts): " + "; ".join(
                  f"{lib.name} " + " / ".join(f"{v:.2f}" for v in idle_cpu_after_burst(lib, burst))
                  for lib in libraries)
              + "; the same windows with no calls before them: "
              + " / ".join(f"{v:.2f}" for v in floor)]
    lines += ["", "cbn team: " + libraries[0].cbn.show_config(print_out=False)["team"]]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
