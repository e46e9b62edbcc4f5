"""Transparent huge pages for the large host buffers XLA:CPU allocates on every step.

XLA:CPU takes each execution's temporaries in one large ``malloc``; glibc serves it with a fresh
``mmap``, so every step faults its pages in again, 4 KiB at a time. Where the kernel gives huge
pages only on request (``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, the usual
default), glibc >= 2.35 asks for them when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
The page faults saved are most of a CPU train step's system time (README, "CPU benchmarks");
two large executables called in strict alternation (a benchmark harness) were the one case
that ran slower with it. glibc reads the variable only at start-up, so the entry points
re-execute themselves once with it set. Nothing happens when ``GLIBC_TUNABLES`` is already set,
when ``MMV_HUGEPAGES=0``, off Linux, when the kernel's setting is not ``madvise``, or on a GPU or
TPU host (``JAX_PLATFORMS`` names an accelerator first, or an accelerator's device file is
there): there the step's buffers live on the device and the host allocator is not the cost.
"""

from __future__ import annotations

import glob
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
# NVIDIA's control device; TPU chips (/dev/accel*: v4, v5e; /dev/vfio/<n>: v5p, v6e)
ACCELERATOR_FILES = ("/dev/nvidiactl", "/dev/accel*", "/dev/vfio/[0-9]*")


def accelerator_host(environ=os.environ, patterns=ACCELERATOR_FILES) -> bool:
    """Whether JAX will run on a GPU or TPU here, decided before JAX is imported."""
    platforms = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if platforms:
        return platforms != "cpu"
    return any(glob.glob(p) for p in patterns)


def _thp_mode(path: str = THP_SETTING) -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def reexec_with_hugepages(
    environ=os.environ,
    execve=os.execve,
    thp_path: str = THP_SETTING,
    accelerator_files=ACCELERATOR_FILES,
) -> None:
    """Replaces this process by the same command with ``GLIBC_TUNABLES`` set, when it helps."""
    if (
        not sys.platform.startswith("linux")
        or "GLIBC_TUNABLES" in environ
        or environ.get("MMV_HUGEPAGES", "1") == "0"
        or _thp_mode(thp_path) != "madvise"
        or accelerator_host(environ, accelerator_files)
    ):
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        execve(sys.executable, argv, {**environ, "GLIBC_TUNABLES": TUNABLE})
    except OSError:
        return  # keep going without huge pages
