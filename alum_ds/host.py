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

# glibc's largest mmap threshold (4 MiB * sizeof(long)) and trim threshold (an int): under
# ZeRO-0/1/2 (keep_freed_memory) freed heap stays in the process for the next step.
MMAP_THRESHOLD_KEEP = 32 * 1024 * 1024
TRIM_THRESHOLD_KEEP = 2**31 - 1

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def _mallopt(param: int, value: int) -> bool:
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no mallopt (macOS, Windows): nothing to tune
        return False
    return bool(mallopt(ctypes.c_int(param), ctypes.c_int(value)))


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
    return _mallopt(_M_MMAP_THRESHOLD, threshold)


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process instead of giving it back between steps (CPU
    runs; False where there is no glibc).

    With glibc's defaults the heap's free top is trimmed (returned to the kernel) once it exceeds
    twice the dynamic mmap threshold, so a step whose peak is above the level it ends at maps its
    activations afresh every time, and each new page faults in on first touch. An ALUM step,
    holding three graphs, peaks well above where it ends: measured on the small preset (one CPU
    thread, 8 x 128 tokens) ~13k page faults per ALUM step and none per plain step; with both
    thresholds fixed high, none, and the ALUM step of 2 CPU ranks under ZeRO-2 went 0.75 -> 0.71 s
    (plain 0.31 -> 0.30 s). The resident size stays near the step's peak, which every step
    reaches anyway (bench_scale: 0.04-0.19 GiB more per rank on base and large). Setting either
    threshold turns glibc's dynamic adjustment off, so both are set."""
    return _mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_KEEP) and _mallopt(
        _M_TRIM_THRESHOLD, TRIM_THRESHOLD_KEEP)


def tune_allocator(ds: dict[str, Any]) -> str:
    """The allocator policy of a CPU run, set before the model is built (so its weights count
    too): under ZeRO-3 freed memory is returned (``pin_malloc_mmap_threshold``), under ZeRO-0/1/2
    it is kept for the next step (``keep_freed_memory``). Returns ``"release"``, ``"keep"``, or
    ``""`` where glibc's allocator is not there to tune."""
    if zero_stage_of(ds) == 3:
        return "release" if pin_malloc_mmap_threshold() else ""
    return "keep" if keep_freed_memory() else ""
