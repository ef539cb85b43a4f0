"""torch.compile for the pieces ALUM runs: the embeddings, each encoder layer, the MLM head.

Where it pays. Measured on the CPU (small preset, one thread, fp32, 8 x 128 tokens, passes
interleaved with eager in one process; docs/performance.md, "Compile"): per-layer
compilation with the CPU fast path's dropout as an opaque custom op is 0.94-1.12x eager for a
plain step and 0.96-1.08x for an ALUM step, within this machine's run-to-run noise, after 25-60 s
of cold compilation (3 s warm from the on-disk cache). About three quarters of a CPU step is
matrix products, which compiled code hands to the same MKL kernels; inductor's own dropout RNG
on the CPU draws a Philox number per element in a scalar loop (0.35-0.42x eager's). So "auto"
compiles on CUDA GPUs, the lever the strongest training codebases use there, and not on the CPU.

What is compiled, and why so:
- each encoder layer on its own (torchtitan's granularity): one graph serves every layer, and a
  break anywhere costs one layer, not the encoder;
- the embeddings (lookup, LayerNorm, dropout: elementwise work the perturbation is added to);
- the MLM head with dynamic shapes: its row count is the number of masked tokens, which changes
  every batch; marked dynamic it compiles once instead of once per count.
ALUM's ascent takes a gradient with respect to δ alone; a compiled backward would compute every
weight gradient too (0.57-0.63x eager for that pass), so the objective runs the ascent's pass with
parameters that do not require gradients (``frozen``): a graph of its own that returns the input
gradient only. Graphs per run: about three per encoder layer kind (input requiring gradients or
not, parameters frozen or not), one or two for the embeddings and the head; the run logs the
count.

CPU fast path and compile: both apply on a CPU run with compile on (the fast path's dropout is a
custom op, ``cpu_fastpath.dropout_scale``, that compiled graphs keep whole); on a GPU neither the
fast path (CPU only) nor anything else of it is involved.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from torch import nn

SETTINGS = ("auto", "on", "off")
KEY = "torch_compile"
"""The DeepSpeed JSON's key: ``"torch_compile": {"enabled": "auto" | true | false}``."""


class CompileError(RuntimeError):
    """Compilation was asked for (``enabled: true``) and cannot be done; one line, naming why."""


def missing_compiler() -> str:
    """Why inductor cannot build kernels here ("" when it can): its C++ compiler must run (the
    check runs ``<cxx> --version``, 0.1 s)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (RuntimeError, OSError) as e:
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ""


def decide(setting: bool | str, *, on_gpu: bool, zero_stage: int, offload: bool) -> tuple[bool, str]:
    """Whether to compile, and a note for the log ("" when nothing is worth saying). ``auto``:
    on for CUDA without ZeRO-3/offload, off elsewhere; ``true`` where it cannot work raises
    CompileError (one line). ``setting`` is already checked (``ds_config.compile_setting``)."""
    if setting is False:
        return False, ""
    explicit = setting is True
    if zero_stage == 3 or offload:
        if explicit:
            raise CompileError(f"{KEY}: compiling under ZeRO-3 or with offload is not supported (ZeRO-3 "
                               "gathers parameters in hooks a compiled graph would bypass): use "
                               f"ZeRO-0/1/2, or {KEY} enabled false")
        return False, ""
    if not explicit and not on_gpu:
        return False, ""  # measured: no gain on the CPU (module docstring)
    why = missing_compiler()
    if why:
        if explicit:
            raise CompileError(f"{KEY}: torch.compile needs a working C/C++ compiler: {why}; install "
                               f"one (e.g. gcc) or set {KEY} enabled false")
        return False, f"warning: {KEY} auto: running eager, no working C/C++ compiler ({why})"
    return True, ""


def failure(e: BaseException) -> str:
    """A one-line message for an exception raised by dynamo or inductor ("" for any other)."""
    if not type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
        return ""
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return f"{KEY}: compilation failed ({type(e).__name__}: {first}); set {KEY} enabled false to run eager"


def use_cache(folder: Path) -> None:
    """Keep inductor's compiled kernels in ``folder`` (unless TORCHINDUCTOR_CACHE_DIR is set), so a
    resumed or repeated run starts warm: 3 s instead of 25-60 s here."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))


def compile_model(model: nn.Module) -> None:
    """Compile ``model``'s embeddings, encoder layers and MLM head in place (``nn.Module.compile``:
    parameter names and checkpoints are unchanged)."""
    from alum_ds.arch import adapter_for

    adapter = adapter_for(model)
    adapter.backbone(model).embeddings.compile()
    for layer in adapter.layers(model):
        layer.compile()
    for name in adapter.mlm_head_modules(model.config) if adapter.has_mlm_head(model) else ():
        getattr(model, name).compile(dynamic=True)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_seconds() -> float:
    """Seconds this process has spent compiling (dynamo's and inductor's own timers)."""
    from torch._dynamo.utils import compilation_time_metrics

    return float(sum(sum(v) for k, v in compilation_time_metrics.items()
                     if k in ("_compile.compile_inner", "compile_fx.<locals>.bw_compiler")))


class Clock:
    """Compile time spent since the last ``take``: a logging window subtracts it from its wall
    time, so step times and tokens/s never include compilation, which is reported on its own."""

    def __init__(self) -> None:
        self.seen = compile_seconds()

    def take(self) -> float:
        now = compile_seconds()
        spent, self.seen = now - self.seen, now
        return spent


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters that do not require gradients inside the block (restored after): a pass run
    here records no weight-gradient work, in eager (less saved for the backward) and compiled
    (a graph that returns input gradients only) alike."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


__all__ = ["KEY", "SETTINGS", "Clock", "CompileError", "compile_model", "compile_seconds", "decide", "frozen",
           "graphs_compiled", "missing_compiler", "use_cache"]
