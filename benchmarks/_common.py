"""Shared helpers of the benchmark scripts: the run header, tables, peak memory in a child."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence


def header(title: str) -> str:
    """A markdown heading plus the machine, the library versions and the date of the run."""
    import lightning
    import torch
    import torchmetrics
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"### {title}\n\n"
        f"{datetime.date.today().isoformat()} · {cpu}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()} · Python {platform.python_version()}, "
        f"torch {torch.__version__}, torchmetrics {torchmetrics.__version__}, "
        f"transformers {transformers.__version__}, lightning {lightning.__version__}\n"
    )


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, *args: str) -> dict:
    """Run ``script --child args`` in a fresh interpreter; it prints one JSON line last."""
    result = subprocess.run(
        [sys.executable, script, "--child", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script} {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- peak memory of one step inside a process (Linux) -------------------------------------------


def _status_mib(field: str) -> float:
    """A ``VmXXX`` line of ``/proc/self/status``, in MiB (the kernel reports KiB)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line (not Linux?)")


def current_rss_mib() -> float:
    """This process's resident memory now."""
    return _status_mib("VmRSS")


def high_water_rss_mib() -> float:
    """This process's peak resident memory since it started or since :func:`reset_peak_rss`."""
    return _status_mib("VmHWM")


def release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the kernel (``malloc_trim``), so
    that the resident memory measured next is what is alive, not what the allocator keeps."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS: write 5 to
    ``/proc/self/clear_refs`` (Linux >= 4.0). False where that is not allowed; then VmHWM stays
    the peak since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True
