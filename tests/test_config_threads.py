"""Threads and configuration: ``set_num_threads``/``get_num_threads``, ``show_config``,
the ``CBN_ISA`` override (each SIMD level this CPU has, in a fresh interpreter), and
concurrent calls from several Python threads, all checked against the float64 reference."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import pickle
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import cbn
import ml_dtypes
import numpy as np
import pytest
from cbn import ops

LEVELS = ["scalar", "avx2", "avx512"]


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    cbn.set_num_threads(0)


def run_python(code: str, **env_updates) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the environment changed as given
    (a value of None removes the variable)."""
    env = dict(os.environ)
    for key, value in env_updates.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------- threads


def test_set_and_get_num_threads():
    for n in (1, 2, 3, np.int64(2), np.int32(1)):  # NumPy integers count as ints, as for axis
        cbn.set_num_threads(n)
        assert cbn.get_num_threads() == n


@pytest.mark.parametrize("n", [0, -1, -8])
def test_non_positive_restores_the_default(n):
    code = f"""
        import cbn
        first = cbn.get_num_threads()
        cbn.set_num_threads(1 if first != 1 else 2)
        cbn.set_num_threads({n})
        print(first, cbn.get_num_threads())
    """
    first, restored = map(int, run_python(code).stdout.split())
    assert restored == first


def test_default_follows_omp_num_threads():
    code = """
        import cbn
        a = cbn.get_num_threads()
        cbn.set_num_threads(2)
        b = cbn.get_num_threads()
        cbn.set_num_threads(0)
        print(a, b, cbn.get_num_threads())
    """
    proc = run_python(code, OMP_NUM_THREADS="1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "2", "1"]


def test_default_is_the_available_cores_without_omp_num_threads():
    proc = run_python("import cbn; print(cbn.get_num_threads())", OMP_NUM_THREADS=None)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("n", [1.0, 2.5, "2", None, True, [2]])
def test_num_threads_must_be_an_int(n):
    cbn.set_num_threads(1)
    with pytest.raises(TypeError, match=repr(n).replace("[", r"\[").replace("]", r"\]")):
        cbn.set_num_threads(n)
    assert cbn.get_num_threads() == 1


# ---------------------------------------------------------------------------- show_config


def test_show_config_reports_version_compiler_openmp_simd_threads():
    cbn.set_num_threads(1)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        config = cbn.show_config()
    text = buf.getvalue()
    assert cbn.__version__ in text
    assert cbn.__version__ == importlib.metadata.version("cbn")
    lowered = text.lower()
    assert "openmp" in lowered
    assert any(name in lowered for name in ("gcc", "clang", "msvc", "intel")), text
    assert any(level in text for level in LEVELS), text
    assert config["simd"] in LEVELS and config["simd"] in text
    assert config["threads"] == 1 and "1" in text
    cbn.set_num_threads(2)
    with contextlib.redirect_stdout(io.StringIO()):
        assert cbn.show_config()["threads"] == 2


# ---------------------------------------------------------------------------- CBN_ISA


def cpu_levels() -> list[str]:
    """SIMD levels this CPU has, from /proc/cpuinfo (x86 Linux); scalar elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        flags = []
    levels = ["scalar"]
    if {"avx2", "fma"} <= set(flags):
        levels.append("avx2")
        if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= set(flags):
            levels.append("avx512")
    return levels


def test_best_simd_level_matches_the_cpu():
    with contextlib.redirect_stdout(io.StringIO()):
        config = cbn.show_config()
    assert config["simd_best"] == cpu_levels()[-1]
    if "CBN_ISA" not in os.environ:
        assert config["simd"] == config["simd_best"]


def isa_inputs():
    """Inputs that reach each kernel shape (rows x C, planes x L, strided), dtypes and masks:
    name -> (base array, index and axis order of the view to use, axis, mask)."""
    rng = np.random.default_rng(21)
    plain = ((), None)
    return {
        "nhwc": (rng.normal(4, 2, (8, 20, 20, 40)).astype(np.float32), plain, -1, None),
        "nchw": (rng.normal(-1, 3, (8, 24, 20, 20)).astype(np.float32), plain, 1, None),
        "strided": (rng.normal(0, 1, (40, 30, 50)).astype(np.float32),
                    ((slice(None, None, -1), slice(None), slice(None, None, 2)), (2, 1, 0)),
                    [0, 2], None),
        "masked": (rng.normal(2, 1, (16, 30, 33)).astype(np.float32), plain, -1,
                   rng.random((16, 30)) < 0.5),
        "f64": (rng.normal(1e3, 1, (500, 70)), plain, -1, None),
        "f16": (rng.normal(1, 2, (300, 70)).astype(np.float16), plain, -1, None),
        "bf16": (rng.normal(1, 2, (300, 70)).astype(ml_dtypes.bfloat16), plain, 0, None),
        "mean1e5": ((1e5 * 3.7 + 3.7 * rng.standard_normal((4096, 24))).astype(np.float32),
                    plain, -1, None),
    }


def view_of(base, view):
    index, perm = view
    return base[index] if perm is None else base[index].transpose(perm)


CHILD = """
    import contextlib, io, json, pickle, sys
    import numpy as np
    import cbn
    from cbn import ops
    with contextlib.redirect_stdout(io.StringIO()):
        config = cbn.show_config()
    cases = pickle.load(open({path!r}, "rb"))
    results = {{}}
    for name, (base, (index, perm), axis, mask) in cases.items():
        x = base[index] if perm is None else base[index].transpose(perm)
        y, mean, var = ops.batch_norm_train(x, axis=axis, mask=mask)
        y_inf = ops.batch_normalization(x, mean, var, axis=axis)
        results[name] = (y, mean, var, y_inf)
    pickle.dump(results, open({out!r}, "wb"))
    print(json.dumps(config))
"""


@pytest.mark.parametrize("level", LEVELS)
def test_cbn_isa_override_gives_correct_results(ref, tmp_path, level):
    # kernels.md "CPU dispatch": CBN_ISA picks the kernels at import; each level the CPU
    # has must give the reference results; a level it lacks fails at import, clearly.
    cases = isa_inputs()
    path, out = tmp_path / "in.pkl", tmp_path / "out.pkl"
    path.write_bytes(pickle.dumps(cases))
    proc = run_python(CHILD.format(path=str(path), out=str(out)), CBN_ISA=level,
                      OMP_NUM_THREADS="2")
    if level not in cpu_levels():
        assert proc.returncode != 0 and level in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout.strip().splitlines()[-1])
    assert config["simd"] == level
    results = pickle.loads(out.read_bytes())
    for name, (base, view, axis, mask) in cases.items():
        x = view_of(base, view)
        y, mean, var, y_inf = results[name]
        ref.assert_stats_close(mean, var, x, axis, mask)
        rmean, rvar, _ = ref.moments(x, axis, mask)
        ref.assert_normalized(y, x, rmean, rvar, None, None, axis, 1e-3)
        ref.assert_normalized(y_inf, x, mean, var, None, None, axis, 1e-3)
        if name == "mean1e5":  # R4.2 on every SIMD level
            np.testing.assert_array_less(np.abs(var - rvar), 1e-6 * rvar)


@pytest.mark.parametrize("name", ["sse9", "AVX-1024", "neon?"])
def test_unknown_cbn_isa_fails_at_import_with_a_clear_message(name):
    proc = run_python("import cbn", CBN_ISA=name)
    assert proc.returncode != 0
    assert "CBN_ISA" in proc.stderr and name.lower() in proc.stderr.lower(), proc.stderr
    assert all(level in proc.stderr for level in LEVELS), proc.stderr


# ---------------------------------------------------------------------------- Python threads


def concurrent_jobs():
    rng = np.random.default_rng(31)
    nhwc = rng.normal(5, 2, (16, 32, 32, 24)).astype(np.float32)
    nchw = rng.normal(-2, 1, (16, 24, 32, 32)).astype(np.float32)
    f64 = rng.normal(0, 3, (2000, 64))
    mask = rng.random((16, 32, 32)) < 0.7
    return [
        ("train", nhwc, -1, mask),
        ("train", nchw, 1, None),
        ("train", f64[::-1], [1], None),
        ("moments", nhwc[:, ::-1], [1, 3], None),
        ("moments", nchw, 1, mask[:, None, :, :]),
        ("infer", nchw.transpose(0, 2, 3, 1), -1, None),
    ]


def run_job(job):
    kind, x, axis, mask = job
    if kind == "train":
        return ops.batch_norm_train(x, axis=axis, mask=mask)
    if kind == "moments":
        return ops.moments(x, axis=axis, mask=mask)
    mean, var = np.full(x.shape[-1], 0.5), np.linspace(0.5, 2.0, x.shape[-1])
    return (ops.batch_normalization(x, mean, var, axis=axis),)


@pytest.mark.parametrize("threads", [1, 2])
def test_concurrent_calls_from_python_threads(ref, threads):
    # Kernels release the GIL: calls racing from several Python threads must give the
    # reference results, and the very results of the same calls made one at a time.
    cbn.set_num_threads(threads)
    jobs = concurrent_jobs()
    serial = [run_job(job) for job in jobs]
    for (kind, x, axis, mask), result in zip(jobs, serial, strict=True):
        if kind == "infer":
            mean, var = np.full(x.shape[-1], 0.5), np.linspace(0.5, 2.0, x.shape[-1])
            ref.assert_normalized(result[0], x, mean, var, None, None, axis, 1e-3)
            continue
        mean, var = result[-2:]
        ref.assert_stats_close(mean, var, x, axis, mask)
        if kind == "train":
            rmean, rvar, _ = ref.moments(x, axis, mask)
            ref.assert_normalized(result[0], x, rmean, rvar, None, None, axis, 1e-3)
    with ThreadPoolExecutor(max_workers=4) as pool:
        racing = list(pool.map(run_job, jobs * 4))
    for i, result in enumerate(racing):
        for got, want in zip(result, serial[i % len(jobs)], strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("env, expected", [
    ({}, "GOMP_SPINCOUNT=30000 (cbn's)"),
    ({"GOMP_SPINCOUNT": "5"}, "GOMP_SPINCOUNT=5 (yours)"),
    ({"OMP_WAIT_POLICY": "passive"}, "OMP_WAIT_POLICY=passive (yours)"),
])
def test_idle_spin_is_short_unless_the_user_chose_and_leaves_the_environment_alone(env, expected):
    # Issue 25: idle OpenMP helpers stop spinning soon after a call. The variable cbn sets
    # for its libgomp's load is removed again; a user's own choice stays.
    code = ("import os, cbn; print(cbn.show_config(print_out=False)['idle_spin']); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == [expected, env.get("GOMP_SPINCOUNT", "None")]
