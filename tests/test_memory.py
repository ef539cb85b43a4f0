"""The CPU trainer's allocator setting (alum_ds.host.pin_malloc_mmap_threshold).

Run in a subprocess: the setting changes the process's allocator for good, and the test process
should keep its own."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# A freed 16 MiB block raises glibc's dynamic mmap threshold to 16 MiB, so the 8 MiB blocks that
# follow may come from the heap and stay resident after they are freed (fragmented by the small
# blocks kept between them; whether they do varies from run to run, so only the pinned side is
# asserted). With the threshold pinned they are mmapped and returned on free.
PROBE = textwrap.dedent("""
    import torch
    from alum_ds.host import pin_malloc_mmap_threshold

    def rss_mib() -> float:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    assert pin_malloc_mmap_threshold()
    first = torch.ones(4 << 20)  # 16 MiB, freed: the dynamic threshold would rise to it
    del first
    before = rss_mib()
    big, keep = [], []
    for _ in range(64):  # 512 MiB in 8 MiB blocks, a small survivor after each
        big.append(torch.ones(2 << 20))
        keep.append(torch.ones(1024))
    del big
    print(rss_mib() - before)
""")


def _retained_mib() -> float:
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc")
def test_pinned_mmap_threshold_returns_freed_tensors_to_the_os() -> None:
    pinned = _retained_mib()
    assert pinned < 64, f"{pinned:.0f} MiB of 512 MiB freed tensors still resident with the pin"


def test_only_zero3_changes_the_allocator() -> None:
    # ZeRO-0/1/2 keep glibc's default: the pin made their steps slower (alum_ds/host.py).
    from alum_ds.host import release_freed_memory

    for stage in (0, 1, 2):
        assert release_freed_memory({"zero_optimization": {"stage": stage}}) is False
