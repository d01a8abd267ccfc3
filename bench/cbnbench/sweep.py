"""The memory-bound limit: ``y = a·x + b`` over the whole tensor, compiled at run time.

A tiny C file is built with the system compiler (``$CC`` or ``cc``,
``-O3 -march=native -fopenmp``) into a temporary shared library and loaded with
ctypes: no project dependency. OpenMP static schedule with the benchmark's thread
count; below 32768 elements it runs serially (as cbn does), since waking threads
would measure the thread pool rather than memory. A second entry point uses
non-temporal stores (AVX-512 or AVX; the plain loop otherwise): out of place it
skips reading the output's cache lines, the real ceiling for large tensors.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

SOURCE = r"""
#include <stddef.h>
#include <stdint.h>

void cbnbench_axpb(const float *x, float *y, ptrdiff_t n, float a, float b, int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 32768)
    for (ptrdiff_t i = 0; i < n; ++i)
        y[i] = a * x[i] + b;
}

/* The same with non-temporal (streaming) stores: the output's cache lines are not
   read before being written, so out of place moves 2 bytes per byte of x, not 3. */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec;
enum { W = 16 };
static inline vec vset(float v) { return _mm512_set1_ps(v); }
static inline vec vaxpb(const float *p, vec a, vec b)
{ return _mm512_fmadd_ps(_mm512_loadu_ps(p), a, b); }
static inline void vstream(float *p, vec v) { _mm512_stream_ps(p, v); }
#elif defined(__AVX__)
#include <immintrin.h>
typedef __m256 vec;
enum { W = 8 };
static inline vec vset(float v) { return _mm256_set1_ps(v); }
static inline vec vaxpb(const float *p, vec a, vec b)
{ return _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(p), a), b); }
static inline void vstream(float *p, vec v) { _mm256_stream_ps(p, v); }
#endif

void cbnbench_axpb_nt(const float *x, float *y, ptrdiff_t n, float a, float b, int threads)
{
#if defined(__AVX512F__) || defined(__AVX__)
    ptrdiff_t head = (ptrdiff_t)((-(uintptr_t)y & (W * sizeof(float) - 1)) / sizeof(float));
    if ((uintptr_t)y % sizeof(float) != 0 || head > n)
        head = n;
    for (ptrdiff_t i = 0; i < head; ++i)
        y[i] = a * x[i] + b;
    const ptrdiff_t blocks = (n - head) / W;
    const vec va = vset(a), vb = vset(b);
#pragma omp parallel num_threads(threads) if (n >= 32768)
    {
#pragma omp for schedule(static)
        for (ptrdiff_t k = 0; k < blocks; ++k)
            vstream(y + head + k * W, vaxpb(x + head + k * W, va, vb));
        _mm_sfence();
    }
    for (ptrdiff_t i = head + blocks * W; i < n; ++i)
        y[i] = a * x[i] + b;
#else
    cbnbench_axpb(x, y, n, a, b, threads);
#endif
}
"""

FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
)


class SweepUnavailable(RuntimeError):
    pass


class Sweep:
    """The compiled ``y = a·x + b`` loop; ``flags`` says how it was built."""

    def __init__(self, library: ctypes.CDLL, compiler: str, flags: list[str]):
        self._plain = library.cbnbench_axpb
        self._streaming = library.cbnbench_axpb_nt
        for fn in (self._plain, self._streaming):
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ssize_t,
                           ctypes.c_float, ctypes.c_float, ctypes.c_int]
        self.description = f"{compiler} {' '.join(flags)}"

    def bind(self, x: np.ndarray, y: np.ndarray, threads: int,
             streaming: bool = False) -> Callable[[], None]:
        """A no-argument call sweeping ``x`` into ``y`` (``y is x``: in place);
        ``streaming``: non-temporal stores (out of place only)."""
        if x.dtype != np.float32 or y.dtype != np.float32 or x.size != y.size:
            raise ValueError("the sweep takes two float32 arrays of one size")
        if not (x.flags.c_contiguous and y.flags.c_contiguous):
            raise ValueError("the sweep takes C-contiguous arrays")
        fn = self._streaming if streaming else self._plain
        px, py, n = x.ctypes.data, y.ctypes.data, x.size
        return lambda: fn(px, py, n, 1.0, 0.0, threads)


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_sweep() -> Sweep:
    """Compile and load the sweep; raises :class:`SweepUnavailable` with the reason."""
    compiler = _compiler()
    if compiler is None:
        raise SweepUnavailable("no C compiler found ($CC, cc, gcc)")
    errors = []
    with tempfile.TemporaryDirectory(prefix="cbnbench-") as tmp:
        src, lib = Path(tmp) / "axpb.c", Path(tmp) / "axpb.so"
        src.write_text(SOURCE)
        for flags in FLAG_SETS:
            cmd = [compiler, *flags, "-shared", "-fPIC", str(src), "-o", str(lib)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True)
            except OSError as err:
                raise SweepUnavailable(f"cannot run the C compiler {compiler!r}: {err}") from None
            if done.returncode == 0:
                # Linux keeps a loaded library mapped after its file is removed.
                return Sweep(ctypes.CDLL(str(lib)), Path(compiler).name, flags)
            errors.append(done.stderr.strip().splitlines()[-1:] or ["failed"])
    raise SweepUnavailable(f"{compiler} could not build it: {errors}")
