"""CPU resources of inference: how many threads, how many slices a forward pass, and returning
freed heap memory to the system between batches."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import torch

# Slices per forward pass on the CPU: larger batches overflow the cache (224-pixel Swin-UNet on a
# 2-core EPYC, 1 thread: 4-8 slices 270-300 ms each, 16 slices 340, 32 slices 390-460).
CPU_BATCH = 8
TORCH_THREADS = torch.get_num_threads()  # PyTorch's own choice (one per core), or the caller's


def default_threads() -> int:
    """CPU threads for inference: PyTorch's choice, less the cores other processes keep busy now.

    PyTorch runs one thread per core. On a CPU shared with a busy process, every parallel region
    then waits for a thread whose core is taken: with one of 2 cores busy, the forward pass was
    1.6-4x slower on 2 threads than on 1. Where the kernel's CPU counters cannot be read, this is
    PyTorch's choice.
    """
    if TORCH_THREADS == 1:
        return 1
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    try:
        busy = round(busy_cores(cpus))
    except (OSError, ValueError):
        busy = 0
    return max(1, min(TORCH_THREADS, len(cpus) - busy))


def busy_cores(cpus: set[int], interval: float = 0.1) -> float:
    """How many of ``cpus`` were busy (not idle, or taken by the hypervisor) over ``interval`` s.

    Read from Linux's /proc/stat while this process sleeps, so only other processes count.
    """

    def sample() -> tuple[int, int]:
        idle = total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name[:3] == "cpu" and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                idle += ticks[3] + ticks[4]
                total += sum(ticks)
        return idle, total

    idle0, total0 = sample()
    time.sleep(interval)
    idle1, total1 = sample()
    if total1 <= total0:
        return 0.0
    return len(cpus) * (1.0 - (idle1 - idle0) / (total1 - total0))


def _malloc_trim():
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# Freed tensors of sizes that change from batch to batch (a mixture's per-expert token chunks) stay
# in glibc's heap as fragments: without trimming, the resident memory of a top-1 M4oE model grew
# by about 60 MB per batch of 8 slices; trimmed after every batch it stays flat.
MALLOC_TRIM = _malloc_trim()
