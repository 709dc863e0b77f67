"""Host memory allocation for XLA:CPU: keep freed buffers in the process instead of returning them to the kernel.

XLA:CPU allocates each step's temporaries with malloc. Under glibc's defaults every buffer of more than a few MB is
an mmap of its own (and each thread has an arena whose free tail is given back), so every step gets fresh pages from
the kernel and pays a page fault per 4 KiB: a world-tiny pretraining step (a 1.1M-parameter Llama, 32 x 128 tokens,
2 cores) made ~110k minor page faults, ~20% of the process's CPU time in the kernel. Three `mallopt` settings keep
the memory for reuse: one arena (`M_ARENA_MAX`), no mmap'd chunks (`M_MMAP_MAX`) and a 2 GiB trim threshold
(`M_TRIM_THRESHOLD`); one arena alone, or any two of the three, changed nothing measurable. Measured in one session
on 2 cores (`benchmarks/bench_train.py --steps 20 --layers 4 --hidden 128 --ffn 384 --heads 4 --vocab 2048 --batch
32 --seq 128 --modes full --skip-torch`): 0.54 -> 0.43 s per step, 2.26M -> 0.37M page faults, peak RSS 1.38 -> 1.63
GB (tcmalloc through LD_PRELOAD: 0.40 s). Details in docs/DESIGN.md "Speed on CPU".

The `kt-jax` program applies it before JAX starts its threads (threads keep the arena they first used; `cli.main`
called from Python, as the tests do, leaves the caller's process alone);
`KT_JAX_HOST_MALLOC=system` keeps glibc's defaults. It does nothing where libc is not glibc, or under another
allocator (an LD_PRELOAD of tcmalloc or jemalloc takes the malloc calls, and its mallopt does not exist or is a no-op).
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "KT_JAX_HOST_MALLOC"
# glibc's malloc.h parameter numbers
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1))
_kept = False


def keep_freed_memory() -> bool:
    """Apply the settings above to this process's glibc malloc; True when every setting was accepted."""
    if os.environ.get(ENV, "").strip().lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or "malloc" in os.environ.get(
            "LD_PRELOAD", ""):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    global _kept
    _kept = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _kept


def describe() -> str:
    """What this process's host malloc does, for run reports."""
    return "freed memory kept (kt_jax.host_memory)" if _kept else "system defaults"
