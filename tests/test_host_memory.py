"""kt_jax.host_memory: after `keep_freed_memory`, a freed 64 MiB buffer is reused without new page faults."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc settings")

# A fresh process each time: arenas and malloc parameters are per process, and threads keep their first arena.
SECOND_ALLOCATION_FAULTS = """
import ctypes, resource, sys
from kt_jax.host_memory import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 64 << 20
def fill_and_free():
    buf = libc.malloc(size)
    ctypes.memset(buf, 1, size)
    libc.free(buf)
fill_and_free()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill_and_free()
print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


PAGES = (64 << 20) // os.sysconf("SC_PAGE_SIZE")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("KT_JAX_HOST_MALLOC", "LD_PRELOAD")}


def _second_allocation(setting: str | None) -> tuple[bool, int]:
    env = _clean_env()
    if setting is not None:
        env["KT_JAX_HOST_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", SECOND_ALLOCATION_FAULTS], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return bool(int(out[0])), int(out[1])


def test_freed_memory_is_reused_without_page_faults() -> None:
    applied, faults = _second_allocation(None)
    assert applied
    assert faults < PAGES // 20, faults  # the same pages again


def test_system_setting_keeps_glibc_defaults() -> None:
    applied, faults = _second_allocation("system")
    assert not applied
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        return  # fresh mappings come as 2 MiB pages: few faults either way
    assert faults > PAGES // 2, faults  # glibc mmaps a buffer this large and unmaps it on free: every page again


def test_the_program_keeps_freed_memory_and_a_python_caller_is_left_alone() -> None:
    code = ("import sys; from kt_jax import cli, host_memory; sys.argv = ['kt-jax', '--version']; "
            "cli.main(['--version']); print(host_memory.describe()); cli.main(); print(host_memory.describe())")
    lines = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert lines[1] == "system defaults" and lines[3].startswith("freed memory kept"), lines
