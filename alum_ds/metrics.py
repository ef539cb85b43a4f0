"""Rank-0 metrics: console progress (a line per log step, or a tqdm bar on a terminal), JSONL,
TensorBoard and optionally Weights & Biases; step statistics, throughput, MFU and memory."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alum_ds import compiling, records

# Peak dense throughput by device name fragment (bf16/fp16 tensor cores), for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "V100": 125e12, "A10": 125e12}


def flops_per_token(non_embedding_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of one forward+backward (3 forward-equivalents): the standard
    6 x N + 12 x layers x hidden x seq_len model."""
    return 6.0 * non_embedding_params + 12.0 * layers * hidden * seq_len


def forward_equivalents(alum_on: bool, ascent_steps: int) -> float:
    """Passes per step in forward-equivalents: plain MLM is 3 (forward + backward). ALUM adds, per
    ascent step, a forward plus an activation-only backward (~1: input gradients, no weight
    gradients), then the adversarial forward plus its full backward (3): 8 for K = 1, 10 for
    K = 2 (docs/ALUM.md, "Cost")."""
    return 3.0 + (ascent_steps * 2.0 + 3.0 if alum_on else 0.0)


def peak_flops(device_name: str) -> float:
    for key, v in PEAK_FLOPS.items():
        if key in device_name:
            return v
    return math.nan


def peak_memory_gb(on_gpu: bool) -> tuple[float, float]:
    """(peak resident memory of this process, peak GPU memory allocated by torch), in GiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_gb = rss / 2**30 if sys.platform == "darwin" else rss / 2**20
    gpu_gb = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0
    return rss_gb, gpu_gb


class StepWindow:
    """Per-micro-step statistics of an objective (``alum_ds.objective``), summed on the device (no
    host sync per step) and reduced over ranks only when a log line is due. ``extra`` names
    task statistics summed as they are (e.g. the classifier's ``correct``)."""

    KEYS = ("task_sum", "adv_sum", "rows", "delta_norm", "ascent_grad_norm", "adv_skipped")

    def __init__(self, device: torch.device, extra: tuple[str, ...] = ()) -> None:
        self.device = device
        self.keys = self.KEYS + tuple(extra)
        self.sum = torch.zeros(len(self.keys) + 1, dtype=torch.float64, device=device)

    def add(self, stats: dict[str, Any]) -> None:
        vals = [torch.as_tensor(stats.get(k, 0.0), dtype=torch.float64, device=self.device).reshape(())
                for k in self.keys]
        vals.append(torch.ones((), dtype=torch.float64, device=self.device))
        self.sum += torch.stack(vals)

    def reduce(self, all_reduce, world: int, alpha: float) -> dict[str, float]:
        """Row-weighted losses (rows: masked tokens or examples), per-micro-step means of the
        perturbation statistics, sums of ``extra`` and of ``rows``, over all ranks; resets the
        window."""
        s = dict(zip((*self.keys, "micro_steps"), all_reduce(self.sum.clone(), "sum").cpu().tolist()))
        self.sum.zero_()
        rows, micro = max(s["rows"], 1.0), max(s["micro_steps"], 1.0)
        out = {"loss": (s["task_sum"] + alpha * s["adv_sum"]) / rows, "task_loss": s["task_sum"] / rows,
               "adv_loss": s["adv_sum"] / rows, "delta_norm": s["delta_norm"] / micro,
               "ascent_grad_norm": s["ascent_grad_norm"] / micro, "rows": s["rows"],
               # the skip is collective: every rank counted it
               "adv_skipped": s["adv_skipped"] / world}
        out.update({k: s[k] for k in self.keys[len(self.KEYS):]})
        return out


def window_values(r: dict[str, float], *, task: str, alum_on: bool, engine: Any,
                  skipped_total: int) -> dict[str, Any]:
    """The values every run logs from a reduced ``StepWindow``: the loss, the task's loss (as
    ``{task}_loss``), the learning rate and gradient norm, and ALUM's statistics while it is on."""
    values: dict[str, Any] = {"loss": r["loss"], f"{task}_loss": r["task_loss"],
                              "lr": float(engine.get_lr()[0])}
    if alum_on:
        values.update(adv_loss=r["adv_loss"], delta_norm=r["delta_norm"],
                      ascent_grad_norm=r["ascent_grad_norm"], adv_skipped_total=skipped_total)
    gn = engine.get_global_grad_norm()
    if gn is not None:
        values["grad_norm"] = float(gn)
    return values


class StepLogger:
    """The logging window of a training loop, the same for pretraining and fine-tuning: times the
    steps since the last line (compile time left out and reported on its own line), reduces the
    window over ranks and logs its values, the task's own (``extra``) added."""

    def __init__(self, log: MetricsLogger, window: StepWindow, *, all_reduce: Callable, world: int,
                 alpha: float, task: str, compiled: bool, record_compile: bool = True,
                 stop_on_nonfinite: bool = True) -> None:
        self.log, self.window, self.all_reduce, self.world = log, window, all_reduce, world
        self.stop_on_nonfinite = stop_on_nonfinite
        self.alpha, self.task, self.record_compile = alpha, task, record_compile
        self.clock = compiling.Clock() if compiled else None
        self.t_last, self.steps = time.time(), 0

    def step_done(self) -> None:
        self.steps += 1

    def flush(self, step: int, *, alum_on: bool, engine: Any, skipped_total: int,
              extra: Callable[[dict[str, float], int, float], dict[str, Any]]) -> None:
        """Log the window ending at ``step``; ``extra(reduced, steps, seconds)`` adds the task's
        values (throughput, memory, accuracy)."""
        seconds = time.time() - self.t_last - self._compile_time(step)
        r = self.window.reduce(self.all_reduce, self.world, self.alpha)
        values = window_values(r, task=self.task, alum_on=alum_on, engine=engine,
                               skipped_total=skipped_total)
        values.update(extra(r, self.steps, seconds))
        self.log.window(step, values, r["adv_skipped"], stop_on_nonfinite=self.stop_on_nonfinite)
        self.t_last, self.steps = time.time(), 0

    def _compile_time(self, step: int) -> float:
        """Seconds compiled since the last window (``compile_seconds``, ``graphs_compiled``)."""
        spent = self.clock.take() if self.clock is not None else 0.0
        if spent:
            graphs = compiling.graphs_compiled()
            if self.record_compile:
                self.log.log(step, {"compile_seconds": spent, "graphs_compiled": graphs})
            self.log.message(f"compiled {graphs} graph(s) so far, {spent:.1f} s before step {step} "
                             "(not counted in step times)")
        return spent


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger that does nothing.

    ``resume_step``: records after it in metrics.jsonl (and TensorBoard) belong to an abandoned
    continuation (a crash after the last checkpoint) and are dropped, so each step appears once.
    """

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int,
                 resume_step: int = 0, wandb: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.t0 = time.time()
        self.tb = self.jsonl = self.wandb = self.bar = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        path = run_dir / "metrics.jsonl"
        _truncate_after(path, resume_step)
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb is not None:
            import wandb as wandb_lib  # presence checked before the run starts

            self.wandb = wandb_lib.init(resume="allow", **wandb)
        if sys.stderr.isatty() and not os.environ.get("ALUM_DS_NO_BAR"):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **values}
        self.jsonl.write(records.dumps(rec) + "\n")  # standard JSON: a NaN is null, named
        numeric = {k: v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.tb is not None:
            for k, v in numeric.items():
                self.tb.add_scalar(k.replace(".", "/"), v, step)
        if self.wandb is not None:
            self.wandb.log(numeric, step=step)

    def progress(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        parts = []
        for key, fmt in (("loss", "{:.4f}"), ("mlm_loss", "mlm {:.4f}"), ("ce_loss", "ce {:.4f}"),
                         ("adv_loss", "adv {:.4g}"), ("train_accuracy", "train acc {:.3f}"),
                         ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s"),
                         ("examples_per_s", "{:,.0f} ex/s"),
                         ("peak_rss_gb", "rss {:.2f} GiB"), ("max_memory_gb", "gpu {:.2f} GiB")):
            if values.get(key) is not None:
                parts.append(fmt.format(values[key]))
        sources = [(k[7:], v) for k, v in values.items() if k.startswith("tokens/")]
        if sources:  # a mixture: each source's tokens and epoch
            parts.append(" ".join(f"{name} {_human(v)} tok e{values.get('epoch/' + name, 0)}"
                                  for name, v in sources))
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(" | ".join(parts[:5]), refresh=True)
            return
        elapsed = time.time() - self.t0
        print(" | ".join([f"step {step}/{self.total}", *parts, f"{elapsed:.0f}s"]),
              file=sys.stderr, flush=True)

    def window(self, step: int, values: dict[str, Any], skipped: float, *,
               stop_on_nonfinite: bool = True) -> None:
        """Log a window's values and its progress line; warn about skipped adversarial terms;
        stop on a non-finite loss (on every rank: each computes the same reduced values) unless
        ``stop_on_nonfinite`` is false (the divergence guard decides instead)."""
        if skipped:
            self.message(f"warning: adversarial term skipped on {int(skipped)} micro-step(s) "
                         f"before step {step} (non-finite ascent gradient or loss)")
        self.log(step, values)
        self.progress(step, values)
        if stop_on_nonfinite and not all(math.isfinite(v) for k, v in values.items() if k.endswith("loss")):
            raise FloatingPointError(f"training loss became non-finite at step {step}")

    def rewind(self, step: int) -> None:
        """Drop the records after ``step`` (a rollback continues from there), as a resume does."""
        if not self.enabled:
            return
        self.jsonl.close()
        _truncate_after(self.run_dir / "metrics.jsonl", step)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)
        if self.bar is not None:
            self.bar.n = step

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _truncate_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = [line for line in lines if _step_of(line) <= step]
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf  # a torn last line from a kill
