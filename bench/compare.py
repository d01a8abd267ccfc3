"""cbn against its peers and against the machine's memory-bound limit.

    python bench/compare.py                     # every case, 1 and 2 threads (< 10 min)
    python bench/compare.py --quick             # a few cases, fewer samples (< 2 min)
    python bench/compare.py --threads 2 --cases 32x56x56x64,64x256x56x56

Everything runs in one process; the implementations of each (case, mode, threads)
group are sampled in turn, and medians are reported. The tables are printed and
written to bench/RESULTS.md (``--out``) with a description of the machine. See
bench/README.md for what the columns mean.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cbnbench import report
from cbnbench.cases import MODES, TINY, Case, CaseData, make_data, select_cases
from cbnbench.impls import Call, CbnLibrary, Library, load_libraries
from cbnbench.machine import LoadMonitor, describe
from cbnbench.timing import DEFAULT, QUICK, Policy, interleaved_medians

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="the quick case set and fewer samples (under 2 minutes)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (1,2)")
    p.add_argument("--cases", default=None,
                   help="comma-separated case names such as 32x56x56x64, or 'all' / 'quick'")
    p.add_argument("--modes", default=",".join(MODES), help="infer,train,backward")
    p.add_argument("--skip", default="",
                   help="libraries not to run: torch,onnxruntime,tensorflow,keras,numpy,limit")
    p.add_argument("--import-timeout", type=float, default=120.0,
                   help="seconds TensorFlow may take to import before it is skipped")
    p.add_argument("--against", type=Path, default=None,
                   help="the installed cbn package directory of another build, timed "
                        "interleaved with this one (columns prev-*, speed-ups xprev-*)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every case this many times, minutes apart, and report each "
                        "cell's median over the rounds (tames the bandwidth's swings)")
    p.add_argument("--l3", type=int, default=None,
                   help="bytes: plan cbn's schedules for this L3 (cbn.set_cache_sizes), e.g. "
                        "314572800 to see what a VM reporting its host's 300 MiB would get")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="Markdown report")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    if not args.threads or min(args.threads) < 1:
        p.error("--threads takes positive integers")
    if args.rounds < 1:
        p.error("--rounds takes a positive integer")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.modes) <= set(MODES):
        p.error(f"--modes takes {', '.join(MODES)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def bind_all(libraries: list[Library], data: CaseData, mode: str,
             notes: list[str]) -> dict[str, Call]:
    """Every library's callables for one case and mode; a library that fails to
    bind is noted and left out rather than stopping the run."""
    calls: dict[str, Call] = {}
    for library in libraries:
        try:
            calls.update(library.bind(data, mode))
        except Exception as err:  # a peer's failure must not end the run
            notes.append(f"{library.name} failed on {data.case.name} {mode}: {err!r}")
    return calls


def set_threads(libraries: list[Library], n: int) -> None:
    for library in libraries:
        library.set_threads(n)


def run_case(case: Case, threads: list[int], modes: list[str], libraries: list[Library],
             policy: Policy, notes: list[str], reverse: bool = False) -> list[report.Row]:
    """All groups of one case; its arrays are allocated once and shared. With
    ``reverse`` the implementations are sampled in the opposite turn order (what
    the previous sample left in the caches and the write-back queue then falls
    on another implementation)."""
    data = make_data(case)
    rows = []
    for n in threads:
        set_threads(libraries, n)
        for mode in modes:
            start = time.monotonic()
            calls = bind_all(libraries, data, mode, notes)
            if reverse:
                calls = dict(reversed(calls.items()))
            load = LoadMonitor()
            seconds = interleaved_medians(calls, policy)
            del calls
            row = report.Row(case, mode, n, seconds, load.other_cpus())
            rows.append(row)
            cbn_ms = seconds.get("cbn-out", float("nan")) * 1e3
            print(f"  {case.name:>16} {case.layout:<4} {mode:<5} {n} thr: cbn-out "
                  f"{cbn_ms:8.3f} ms  ({len(seconds)} impls, {time.monotonic() - start:.1f} s, "
                  f"others busy {row.other_cpus or 0:.1f} CPUs)", flush=True)
    del data
    gc.collect()
    return rows


def run_overhead(threads: list[int], libraries: list[Library],
                 policy: Policy, notes: list[str]) -> dict[int, dict[str, float]]:
    """µs per tiny inference call of every library, per thread count."""
    data = make_data(TINY)
    results = {}
    for n in threads:
        set_threads(libraries, n)
        calls: dict[str, Call] = {}
        for library in libraries:
            try:
                calls.update(library.overhead_calls(data))
            except Exception as err:  # as in bind_all
                notes.append(f"{library.name} failed on the overhead calls: {err!r}")
        results[n] = interleaved_medians(calls, policy)
    return results


def setup_lines(libraries: list[Library], skipped: dict[str, str]) -> list[str]:
    cbn = next(lib for lib in libraries if isinstance(lib, CbnLibrary))
    config = cbn.cbn.show_config(print_out=False)
    lines = [f"cbn: {', '.join(f'{k} {v}' for k, v in config.items())}"]
    lines += [f"{lib.name}: {lib.version()}" for lib in libraries if lib is not cbn]
    lines += [f"{name}: not run — {reason}" for name, reason in skipped.items()]
    return lines


def render(args: argparse.Namespace, command: str, setup: list[str], rows: list[report.Row],
           overhead: dict[int, dict[str, float]], notes: list[str], other_cpus: float | None,
           wall_s: float) -> str:
    load = ("unknown" if other_cpus is None else
            f"{other_cpus:.2f} CPUs on average (0 on an idle machine; above ~0.1 the "
            "timings are disturbed)")
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# cbn benchmark results",
        "",
        f"Command: `{command}` — {stamp}, {wall_s:.0f} s, "
        f"{'quick' if args.quick else 'default'} sampling"
        + (f", each cell the median of {args.rounds} rounds." if args.rounds > 1 else "."),
        "",
        "## Machine and libraries",
        "",
        *(f"- {line}" for line in describe()),
        f"- Other processes kept busy during the run: {load}",
        *(f"- {line}" for line in setup),
        *(f"- Note: {note}" for note in dict.fromkeys(notes)),  # once, though every round adds it
        "",
        "## Columns",
        "",
        report.legend(),
        "",
        "## Times (ms per call, median)",
        "",
        report.times_table(rows),
        "",
        "## Bandwidth, share of the limit, speed-ups (x<peer> > 1: cbn is faster)",
        "",
        report.derived_table(rows),
    ]
    if overhead:
        parts += ["", "## Per-call overhead (tiny input)", "", report.overhead_table(overhead)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = " ".join(["python", *map(shlex.quote, sys.argv if argv is None else argv)])
    policy = QUICK if args.quick else DEFAULT
    cases = select_cases(args.cases, args.quick)
    monitor, start = LoadMonitor(), time.monotonic()

    libraries, skipped = load_libraries(args.skip, args.import_timeout, args.against)
    if args.l3 is not None:
        cbn = next(lib for lib in libraries if isinstance(lib, CbnLibrary)).cbn
        cbn.set_cache_sizes(l3=args.l3)
    setup = setup_lines(libraries, skipped)
    print("\n".join(setup), flush=True)

    notes: list[str] = []
    rounds: list[list[report.Row]] = []
    for number in range(args.rounds):
        if args.rounds > 1:
            print(f"round {number + 1} of {args.rounds}", flush=True)
        rounds.append([row for case in cases for row in
                       run_case(case, args.threads, args.modes, libraries, policy, notes,
                                reverse=number % 2 == 1)])
    rows = report.median_over_rounds(rounds)
    print("  per-call overhead ...", flush=True)
    overhead = run_overhead(args.threads, libraries, policy, notes)

    text = render(args, command, setup, report.sorted_rows(rows, cases), overhead, notes,
                  monitor.other_cpus(), time.monotonic() - start)
    print()
    print(text)
    args.out.write_text(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
