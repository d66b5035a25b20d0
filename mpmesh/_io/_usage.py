"""Memory and CPU time of a process on this machine (the broker's, for ``stats()``)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

__all__ = ["process_usage"]


def process_usage(pid: int) -> dict[str, float | int | None]:
    """``{"broker_memory_bytes": RSS, "broker_cpu_seconds": user + system}`` (None if unknown)."""
    rss: int | None = None
    cpu: float | None = None
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    elif pid == os.getpid():
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        rss = usage.ru_maxrss  # bytes on macOS (a peak, the best the platform offers cheaply)
    else:
        try:
            out = subprocess.run(["ps", "-o", "rss=,time=", "-p", str(pid)], capture_output=True,
                                 text=True, timeout=5).stdout.split()
            rss = int(out[0]) * 1024
            parts = [float(p) for p in out[1].replace("-", ":").split(":")]
            cpu = sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            pass
    return {"broker_memory_bytes": rss, "broker_cpu_seconds": cpu}
