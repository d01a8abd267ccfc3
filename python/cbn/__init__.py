"""cbn: fast, exact batch normalization for CPUs.

A C++ core (OpenMP, SIMD chosen at import) behind a Keras-compatible
:class:`BatchNormalization` layer on NumPy arrays, the functional :mod:`cbn.ops`
API and :mod:`cbn.distributed` (synchronized statistics across ranks).
"""

from __future__ import annotations

import os

# Pauses libgomp's idle threads spin before they sleep: ~0.6 ms (AMD) to ~1.4 ms (Intel).
_SHORT_SPIN = "30000"


def _idle_spin_setting() -> tuple[str, bool]:
    """What sets how long idle OpenMP threads spin, and whether the user chose it."""
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        if name in os.environ:
            return f"{name}={os.environ[name]} (yours)", True
    return f"GOMP_SPINCOUNT={_SHORT_SPIN} (cbn's)", False


_IDLE_SPIN, _SPIN_CHOSEN = _idle_spin_setting()


# After a parallel call, libgomp's pool threads spin on their next task before they
# sleep: 300 000 pauses by default, 5 to 15 ms on current cores, taken from whatever else
# the process or the machine runs (a framework's own threads between two cbn calls).
# libgomp reads GOMP_SPINCOUNT when it is loaded, so unless the user chose a wait policy
# the core is loaded with a tenth of that, and the variable is removed again (child
# processes and other runtimes keep their defaults). A libgomp another module loaded
# earlier keeps its own setting.
if not _SPIN_CHOSEN:
    os.environ["GOMP_SPINCOUNT"] = _SHORT_SPIN
try:
    from . import _core
finally:
    if not _SPIN_CHOSEN:
        del os.environ["GOMP_SPINCOUNT"]

from . import distributed, ops  # noqa: E402  (after the core: see above)
from ._validate import is_integer  # noqa: E402
from .layer import BatchNormalization  # noqa: E402

__version__ = _core.version()
__all__ = [
    "BatchNormalization",
    "ops",
    "distributed",
    "set_num_threads",
    "get_num_threads",
    "set_cache_sizes",
    "get_cache_sizes",
    "show_config",
    "__version__",
]


def _apply_isa_override() -> None:
    # CBN_ISA picks the SIMD level once, at import; a level the CPU lacks is an error.
    requested = os.environ.get("CBN_ISA", "").strip().lower()
    if not requested:
        return
    try:
        _core.set_isa(requested)
    except ValueError as err:
        raise ImportError(f"CBN_ISA={requested!r}: {err}") from None


_apply_isa_override()


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in later calls; ``n <= 0`` restores the default
    (``OMP_NUM_THREADS`` or the number of cores)."""
    if not is_integer(n):
        raise TypeError(f"n must be an int; received {n!r}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """Number of threads later calls use."""
    return _core.get_num_threads()


def set_cache_sizes(l2: int | None = None, l3: int | None = None) -> None:
    """Override the cache sizes (bytes; per-core L2, shared L3) the training forward
    blocks for; ``None`` restores the size read from the system. Tensors larger
    than half the L3 are normalized in chunks of channels, each right after its
    statistics while it is still cached."""
    sizes = []
    for name, value in (("l2", l2), ("l3", l3)):
        if value is not None and not (is_integer(value) and value > 0):
            raise ValueError(f"{name} must be a positive int (bytes) or None; received {value!r}")
        sizes.append(0 if value is None else int(value))
    _core.set_cache_bytes(*sizes)


def get_cache_sizes() -> tuple[int, int]:
    """(per-core L2, shared L3) in bytes, as the training forward uses them."""
    return _core.get_cache_bytes()


def _team_summary() -> str:
    # How calls share the threads: helpers that started late (another process
    # had their core) make later calls run on the caller alone for a while.
    s = _core.team_state()
    now = f"caller alone for {s['caller_only_ms']:.0f} ms" if s["caller_only_ms"] else "full team"
    return (f"{s['policy']}, {now}; {s['parallel_calls']} team calls "
            f"({s['late_calls']} with late helpers), {s['caller_only_calls']} on the caller alone")


def show_config(print_out: bool = True) -> dict[str, str | int]:
    """The build and runtime configuration: version, compiler, OpenMP, SIMD level
    in use (and the best available), threads, the cache sizes the schedules plan for
    and where they come from (``cache_from``: detected, capped, or set), how calls shared the
    threads (``team``: calls run on the caller alone for a while after helpers
    were late), how long idle helper threads spin before they sleep (``idle_spin``).
    Printed unless ``print_out=False``."""
    config: dict[str, str | int] = {
        "version": __version__,
        "build": _core.build_info(),
        "simd": _core.isa(),
        "simd_best": _core.best_isa(),
        "threads": get_num_threads(),
        "cache_l2": get_cache_sizes()[0],
        "cache_l3": get_cache_sizes()[1],
        "cache_from": _core.cache_origin(),
        "team": _team_summary(),
        "idle_spin": _IDLE_SPIN,
    }
    if print_out:
        for key, value in config.items():
            print(f"{key:>10}: {value}")
    return config
