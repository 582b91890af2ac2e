"""``cud.runtime.memory.retain_freed_memory``: freed memory stays in the process, so a tensor
allocated again after a free costs no page faults (glibc only; run in fresh processes, set up
as the ``cud`` command sets itself up: its modules imported first, which matters, since glibc
falls back to mmap for blocks the initial heap cannot grow into)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
import cud.cli  # as the cud command does: everything imported, then the malloc settings
if sys.argv[1] == "retain":
    from cud.runtime.memory import retain_freed_memory
    assert retain_freed_memory()
for _ in range(4):  # the heap settles (an aligned block does not fit its own freed space)
    x = torch.ones(16 * 2 ** 20)  # 64 MiB, touched
    del x
# the steady state of a long run: every pass allocates and frees the same large tensors
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    x = torch.ones(16 * 2 ** 20)
    del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_memory_is_reused_without_page_faults():
    given_back = page_faults("default")
    assert given_back > 50_000  # 5 x 16,384 pages of 4 KiB: glibc unmapped every freed block
    assert page_faults("retain") < 1_000
