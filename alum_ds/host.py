"""Settings of the host process for CPU runs (pretraining and fine-tuning alike)."""

from __future__ import annotations

import ctypes
from typing import Any

from alum_ds.ds_config import zero_stage_of

# glibc's mmap threshold for CPU runs under ZeRO-3 (see pin_malloc_mmap_threshold), chosen for
# memory: every block above glibc's own 128 KiB start is mmapped and returned on free. Not pinned
# under ZeRO-0/1/2, where it costs speed: each activation and gradient buffer is then a fresh
# mapping whose pages fault in on first touch (measured on the small preset, 2 CPU ranks: 128 KiB
# made a step 0.24 -> 0.35 s in-process; even 8 MiB, which maps ZeRO-2's flat gradient buffers
# afresh every step, made the trainer's step 0.318 -> 0.348 s).
MMAP_THRESHOLD_ZERO3 = 128 * 1024


def pin_malloc_mmap_threshold(threshold: int = MMAP_THRESHOLD_ZERO3) -> bool:
    """Make glibc return freed tensor memory above ``threshold`` bytes to the OS (CPU runs; False
    where there is no glibc).

    glibc serves a block above its mmap threshold with its own mmap and unmaps it on free, but the
    threshold is dynamic: each time such a block is freed, it rises to that block's size (up to
    32 MiB). ZeRO-3 frees a gathered parameter (4-16 MiB in the large preset) after every module
    use, so after the first step every gathered parameter, gradient bucket and activation comes
    from the heap instead, whose freed space is kept and fragmented, never given back. Measured
    on 2 CPU ranks (large preset, ZeRO-3, ALUM): about 1.1 GiB per rank of free-but-resident heap;
    pinning the threshold at 128 KiB (which also turns the dynamic adjustment off, as
    MALLOC_MMAP_THRESHOLD_ in the environment does) lowered the peak from 10.3 to 7.8 GiB per rank
    (ds_configs/README.md). Set before the model is built, so its weights are mmapped too."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS, Windows): nothing to tune
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(threshold)))


def release_freed_memory(ds: dict[str, Any]) -> bool:
    """On a CPU run under ZeRO-3, pin glibc's mmap threshold (``pin_malloc_mmap_threshold``);
    other stages keep glibc's default. Call before the model is built."""
    return zero_stage_of(ds) == 3 and pin_malloc_mmap_threshold()
