"""The memory-bound limit: ``y = a·x + b`` over the whole tensor (one read, one write),
and ``z = a·x + b·y`` (two reads, one write: the traffic of a backward pass's dx from x
and dy), compiled at run time.

A tiny C file is built with the system compiler (``$CC`` or ``cc``,
``-O3 -march=native -fopenmp``) into a temporary shared library and loaded with
ctypes: no project dependency. OpenMP static schedule with the benchmark's thread
count; below 32768 elements it runs serially (as cbn does), since waking threads
would measure the thread pool rather than memory. Each loop also has a version with
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

void cbnbench_axpby(const float *x, const float *y, float *z, ptrdiff_t n, float a, float b,
                    int threads)
{
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= 32768)
    for (ptrdiff_t i = 0; i < n; ++i)
        z[i] = a * x[i] + b * y[i];
}

/* The same with non-temporal (streaming) stores: the output's cache lines are not
   read before being written, so out of place moves 2 bytes per byte of x, not 3
   (z = a*x + b*y: 3 instead of 4). */
#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vec;
enum { W = 16 };
static inline vec vset(float v) { return _mm512_set1_ps(v); }
static inline vec vload(const float *p) { return _mm512_loadu_ps(p); }
static inline vec vfma(vec a, vec x, vec b) { return _mm512_fmadd_ps(a, x, b); }
static inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
static inline void vstream(float *p, vec v) { _mm512_stream_ps(p, v); }
#elif defined(__AVX__)
#include <immintrin.h>
typedef __m256 vec;
enum { W = 8 };
static inline vec vset(float v) { return _mm256_set1_ps(v); }
static inline vec vload(const float *p) { return _mm256_loadu_ps(p); }
static inline vec vfma(vec a, vec x, vec b) { return _mm256_add_ps(_mm256_mul_ps(a, x), b); }
static inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
static inline void vstream(float *p, vec v) { _mm256_stream_ps(p, v); }
#endif

#if defined(__AVX512F__) || defined(__AVX__)
/* Elements before the output's first 64-byte boundary (n when it is not float-aligned,
   or the array ends first): the streaming loop starts there. */
static ptrdiff_t head_of(const float *out, ptrdiff_t n)
{
    ptrdiff_t head = (ptrdiff_t)((-(uintptr_t)out & (W * sizeof(float) - 1)) / sizeof(float));
    return ((uintptr_t)out % sizeof(float) != 0 || head > n) ? n : head;
}
#endif

void cbnbench_axpb_nt(const float *x, float *y, ptrdiff_t n, float a, float b, int threads)
{
#if defined(__AVX512F__) || defined(__AVX__)
    const ptrdiff_t head = head_of(y, n);
    for (ptrdiff_t i = 0; i < head; ++i)
        y[i] = a * x[i] + b;
    const ptrdiff_t blocks = (n - head) / W;
    const vec va = vset(a), vb = vset(b);
#pragma omp parallel num_threads(threads) if (n >= 32768)
    {
#pragma omp for schedule(static)
        for (ptrdiff_t k = 0; k < blocks; ++k)
            vstream(y + head + k * W, vfma(va, vload(x + head + k * W), vb));
        _mm_sfence();
    }
    for (ptrdiff_t i = head + blocks * W; i < n; ++i)
        y[i] = a * x[i] + b;
#else
    cbnbench_axpb(x, y, n, a, b, threads);
#endif
}

void cbnbench_axpby_nt(const float *x, const float *y, float *z, ptrdiff_t n, float a,
                       float b, int threads)
{
#if defined(__AVX512F__) || defined(__AVX__)
    const ptrdiff_t head = head_of(z, n);
    for (ptrdiff_t i = 0; i < head; ++i)
        z[i] = a * x[i] + b * y[i];
    const ptrdiff_t blocks = (n - head) / W;
    const vec va = vset(a), vb = vset(b);
#pragma omp parallel num_threads(threads) if (n >= 32768)
    {
#pragma omp for schedule(static)
        for (ptrdiff_t k = 0; k < blocks; ++k) {
            const ptrdiff_t i = head + k * W;
            vstream(z + i, vfma(va, vload(x + i), vmul(vb, vload(y + i))));
        }
        _mm_sfence();
    }
    for (ptrdiff_t i = head + blocks * W; i < n; ++i)
        z[i] = a * x[i] + b * y[i];
#else
    cbnbench_axpby(x, y, z, n, a, b, threads);
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
    """The compiled loops; ``flags`` says how they were built."""

    def __init__(self, library: ctypes.CDLL, compiler: str, flags: list[str]):
        self._one_input = {False: library.cbnbench_axpb, True: library.cbnbench_axpb_nt}
        self._two_inputs = {False: library.cbnbench_axpby, True: library.cbnbench_axpby_nt}
        pointer, size, real = ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_float
        for fn in self._one_input.values():
            fn.restype = None
            fn.argtypes = [pointer, pointer, size, real, real, ctypes.c_int]
        for fn in self._two_inputs.values():
            fn.restype = None
            fn.argtypes = [pointer, pointer, pointer, size, real, real, ctypes.c_int]
        self.description = f"{compiler} {' '.join(flags)}"

    def bind(self, x: np.ndarray, y: np.ndarray, threads: int,
             streaming: bool = False) -> Callable[[], None]:
        """A no-argument call of ``y = 1·x + 0`` (``y is x``: in place);
        ``streaming``: non-temporal stores (out of place only)."""
        _check_arrays(x, y)
        fn, px, py, n = self._one_input[streaming], x.ctypes.data, y.ctypes.data, x.size
        return lambda: fn(px, py, n, 1.0, 0.0, threads)

    def bind_two_inputs(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, threads: int,
                        streaming: bool = False) -> Callable[[], None]:
        """A no-argument call of ``z = 1·x + 0·y`` (both inputs are still read);
        ``streaming``: non-temporal stores."""
        _check_arrays(x, y, z)
        fn, n = self._two_inputs[streaming], x.size
        px, py, pz = x.ctypes.data, y.ctypes.data, z.ctypes.data
        return lambda: fn(px, py, pz, n, 1.0, 0.0, threads)


def _check_arrays(*arrays: np.ndarray) -> None:
    if any(a.dtype != np.float32 or a.size != arrays[0].size for a in arrays):
        raise ValueError("the sweep takes float32 arrays of one size")
    if not all(a.flags.c_contiguous for a in arrays):
        raise ValueError("the sweep takes C-contiguous arrays")


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_sweep() -> Sweep:
    """Compile and load the sweeps; raises :class:`SweepUnavailable` with the reason."""
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
