"""Transparent huge pages for the large host buffers XLA:CPU allocates on every step.

XLA:CPU takes each execution's temporaries in one large ``malloc``; glibc serves it with a fresh
``mmap``, so every step faults its pages in again, 4 KiB at a time. Where the kernel gives huge
pages only on request (``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, the usual
default), glibc >= 2.35 asks for them when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
Measured on a 2-core CPU: ViT-S/14 train step on a 4096-token row, 643k -> 2k page faults a
step, 2.64 s -> 2.24 s; the demo run (three bucket shapes in turn) ~3,000 -> ~3,500 tokens/s.
One case went the other way: two large executables called in strict alternation (a benchmark
harness) spent ~1.5 s a call in the kernel (``ru_stime``) with it. glibc reads the variable
only at start-up, so the entry points re-execute themselves once with it set. Nothing happens
when ``GLIBC_TUNABLES`` is already set, when ``MMV_HUGEPAGES=0``, off Linux, or when the
kernel's setting is not ``madvise``.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode(path: str = THP_SETTING) -> str | None:
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def reexec_with_hugepages(environ=os.environ, execve=os.execve,
                          thp_path: str = THP_SETTING) -> None:
    """Replaces this process by the same command with ``GLIBC_TUNABLES`` set, when it helps."""
    if (not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in environ
            or environ.get("MMV_HUGEPAGES", "1") == "0" or _thp_mode(thp_path) != "madvise"):
        return
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        execve(sys.executable, argv, {**environ, "GLIBC_TUNABLES": TUNABLE})
    except OSError:
        return  # keep going without huge pages
