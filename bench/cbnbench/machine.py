"""What the benchmark ran on, and how busy the rest of the machine was meanwhile."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

CPU_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo."""
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


def _physical_cores() -> int | None:
    cores = set()
    base = Path("/sys/devices/system/cpu")
    for topo in base.glob("cpu[0-9]*/topology"):
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(),
                       (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(cores) or None


def _caches() -> list[str]:
    """``L1d 32K (per 1 CPU)``-style lines from cpu0's sysfs cache entries."""
    lines = []
    for entry in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size, shared = (
                (entry / name).read_text().strip()
                for name in ("level", "type", "size", "shared_cpu_list"))
        except OSError:
            continue
        suffix = {"Data": "d", "Instruction": "i"}.get(kind, "")
        lines.append(f"L{level}{suffix} {size} (shared by CPUs {shared})")
    return lines


def _memory() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def describe() -> list[str]:
    """Markdown bullet lines describing the CPU, caches, memory and OS."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    model = info.get("model name", platform.processor() or "unknown")
    family = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    wanted = [f for f in CPU_FLAGS_OF_INTEREST if f in flags]
    return [
        f"CPU: {model} ({family}); {os.cpu_count()} logical CPUs, "
        f"{_physical_cores() or '?'} physical cores; SIMD flags: {' '.join(wanted) or 'none'}",
        f"Caches: {'; '.join(_caches()) or 'unknown'}",
        f"Memory: {_memory()}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}",
    ]


def _busy_cpu_seconds() -> float:
    """CPU-seconds the whole machine has spent busy (user, nice, system, irq, softirq)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMonitor:
    """Measures how many CPUs other processes kept busy while the benchmark ran:
    anything well above 0 means the timings are disturbed."""

    def __init__(self) -> None:
        self.available = Path("/proc/stat").exists()
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        busy = _busy_cpu_seconds() if self.available else 0.0
        return time.monotonic(), busy, _own_cpu_seconds()

    def other_cpus(self) -> float | None:
        if not self.available:
            return None
        (t0, busy0, own0), (t1, busy1, own1) = self._start, self._sample()
        return max(0.0, ((busy1 - busy0) - (own1 - own0)) / max(t1 - t0, 1e-9))
