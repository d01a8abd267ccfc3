"""The result tables (Markdown, also printed as they are)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .cases import MODES, Case
from .impls import COLUMN, COLUMNS, PEERS

MISSING = "—"


@dataclass
class Row:
    """Median seconds per call of every column that ran for one case, mode, thread count."""

    case: Case
    mode: str
    threads: int
    seconds: dict[str, float]
    other_cpus: float | None = None  # CPUs other processes kept busy meanwhile

    @property
    def key(self) -> tuple[str, str, int]:
        return self.case.name, self.mode, self.threads


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A pipe table padded to line up; the first column left-aligned, the rest right."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = ["-" * w if i == 0 else "-" * (w - 1) + ":" for i, w in enumerate(widths)]
    return "\n".join([line(headers), "| " + " | ".join(rule) + " |", *map(line, rows)])


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return MISSING
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.2f}"
    return f"{ms:.2g}"


def _ratio(numerator: float | None, denominator: float | None, fmt: str) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return MISSING
    return format(numerator / denominator, fmt)


def _row_id(row: Row) -> list[str]:
    busy = MISSING if row.other_cpus is None else f"{row.other_cpus:.1f}"
    return [row.case.name, row.case.layout, row.mode, str(row.threads), busy]


ROW_ID_HEADERS = ["case", "layout", "mode", "thr", "busy"]


def median_over_rounds(rounds: list[list[Row]]) -> list[Row]:
    """One row per case, mode and thread count: each column's median over the
    rounds that ran it (the rounds run the same groups in the same order)."""
    merged = []
    for group in zip(*rounds, strict=True):
        first = group[0]
        columns = {key for row in group for key in row.seconds}
        seconds = {key: statistics.median(row.seconds[key] for row in group if key in row.seconds)
                   for key in columns}
        busy = [row.other_cpus for row in group if row.other_cpus is not None]
        merged.append(Row(first.case, first.mode, first.threads, seconds,
                          max(busy) if busy else None))
    return merged


def sorted_rows(rows: list[Row], case_order: list[Case]) -> list[Row]:
    index = {c.name: i for i, c in enumerate(case_order)}
    return sorted(rows, key=lambda r: (index[r.case.name], MODES.index(r.mode), r.threads))


def times_table(rows: list[Row]) -> str:
    """Median ms per call for every column that ran at least once."""
    keys = [c.key for c in COLUMNS if any(c.key in r.seconds for r in rows)]
    body = [_row_id(r) + [_fmt_ms(r.seconds.get(k)) for k in keys] for r in rows]
    return markdown_table(ROW_ID_HEADERS + keys, body)


def _limit_cells(s: dict[str, float]) -> list[str]:
    """%lim, %best, %lim-ip of one row's times."""
    out = s.get("cbn-out")
    sweeps = [s[k] for k in ("lim-out", "lim-nt") if k in s]
    return [_ratio(s.get("lim-out"), out, ".0%"),
            _ratio(min(sweeps) if sweeps else None, out, ".0%"),
            _ratio(s.get("lim-ip"), s.get("cbn-ip"), ".0%")]


def derived_table(rows: list[Row]) -> str:
    """cbn's bandwidth, its share of the limit, training cost over inference, backward
    cost over the two-input sweep, and each peer's time over cbn's (the cbn column
    named in the peer's ``baseline``)."""
    infer = {(r.case.name, r.threads): r.seconds for r in rows if r.mode == "infer"}
    peers = [c for c in PEERS if any(c.key in r.seconds for r in rows)]
    body = []
    for r in rows:
        s, out = r.seconds, r.seconds.get("cbn-out")
        gbps = _ratio(r.case.traffic_bytes(r.mode) / 1e9, out, ".1f")
        inference = infer.get((r.case.name, r.threads), {})
        train = r.mode == "train"
        tr_inf = _ratio(out, inference.get("cbn-out"), ".2f") if train else MISSING
        tr_inf_ip = _ratio(s.get("cbn-ip"), inference.get("cbn-ip"), ".2f") if train else MISSING
        bw_lim = _ratio(out, s.get("lim-out"), ".2f") if r.mode == "backward" else MISSING
        speedups = [_ratio(s.get(c.key), s.get(c.baseline), ".2f") for c in peers]
        body.append(_row_id(r) + [gbps, *_limit_cells(s), tr_inf, tr_inf_ip, bw_lim, *speedups])
    headers = ROW_ID_HEADERS + ["GB/s", "%lim", "%best", "%lim-ip", "tr/inf", "tr/inf-ip",
                                "bw/lim"]
    return markdown_table(headers + [f"x{c.key}" for c in peers], body)


def overhead_table(overhead: dict[int, dict[str, float]]) -> str:
    """µs per tiny call, one column per thread count."""
    threads = sorted(overhead)
    labels = list(dict.fromkeys(k for t in threads for k in overhead[t]))
    body = [[label] + [_fmt_us(overhead[t].get(label)) for t in threads] for label in labels]
    return markdown_table(["call (2x3 float32, inference)"] + [f"µs, {t} thr" for t in threads],
                          body)


def _fmt_us(seconds: float | None) -> str:
    return MISSING if seconds is None else f"{seconds * 1e6:.2f}"


def legend() -> str:
    """What every column means."""
    lines = [
        "Times are medians of interleaved samples, in ms per call (`—`: not run). "
        "Output kinds: **in-place** writes over the input, **out=** into a buffer allocated "
        "once (no page faults), **fresh** allocates its result every call (for tensors "
        "above glibc's mmap threshold that means page faults on every call).",
        "",
    ]
    lines += [f"- `{c.key}` ({c.output}): {c.doc}" for c in COLUMNS]
    lines += [
        "",
        "`busy`: CPUs that other processes kept busy while the row was measured (from "
        "/proc/stat); well above 0 the row is disturbed, above all with as many threads as "
        "cores, where every OpenMP barrier waits for a descheduled thread.",
        "",
        "Derived columns:",
        "- `GB/s`: (bytes of the input + bytes of the output) / `cbn-out` time — what a perfect "
        "kernel must move; training counts the same bytes, so it shows how close the fused "
        "stats+normalize pass gets to one read and one write; backward counts x, dy and dx.",
        "- `%lim`: `lim-out` / `cbn-out` (≥ 90% is the target for tensors ≥ 4 MB; training rows "
        "compare against the same out-of-place sweep, backward rows against the two-input "
        "sweep); `%best`: the faster of `lim-out` and `lim-nt` / `cbn-out` (streaming stores "
        "win above the cache sizes and lose below); `%lim-ip`: `lim-ip` / `cbn-ip`.",
        "- `tr/inf`: `cbn-out` training time / `cbn-out` inference time, same case and threads; "
        "`tr/inf-ip`: the same with `cbn-ip` (in place; the issue's target is <= 1.25 on the "
        "205 MB tensors).",
        "- `bw/lim`: backward `cbn-out` time / the two-input sweep's `lim-out` time (target "
        "≤ 2: the sums need x and dy once, dx needs them again unless they are still cached).",
        "- `x<peer>`: the peer's time / the time of the cbn call doing the same job "
        + "(" + ", ".join(f"`{c.key}` vs `{c.baseline}`" for c in PEERS) + "); "
        "above 1 means cbn is faster.",
    ]
    assert all(c.baseline in COLUMN for c in PEERS)
    return "\n".join(lines)
