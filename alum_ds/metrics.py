"""Rank-0 metrics: console progress, JSONL and TensorBoard; throughput and MFU estimates."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# Peak dense throughput by device name fragment (bf16/fp16 tensor cores), for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "V100": 125e12, "A10": 125e12}


def flops_per_token(non_embedding_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token of one forward+backward (3 forward-equivalents): the standard
    6 x N + 12 x layers x hidden x seq_len model."""
    return 6.0 * non_embedding_params + 12.0 * layers * hidden * seq_len


def forward_equivalents(alum_on: bool, ascent_steps: int) -> float:
    """Passes per step in forward-equivalents: plain MLM is 3 (forward + backward); ALUM adds,
    per ascent step, a forward plus an activation-only backward (~3) and then a forward plus a
    full backward (3): 8 for K = 1 (ALUM.md, "Cost")."""
    return 3.0 + (ascent_steps * 3.0 + 2.0 if alum_on else 0.0)


def peak_flops(device_name: str) -> float:
    for key, v in PEAK_FLOPS.items():
        if key in device_name:
            return v
    return math.nan


class MetricsLogger:
    """Writes on rank 0 only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, total_steps: int):
        self.enabled = enabled
        self.total = total_steps
        self.t0 = time.time()
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **values}
        self.jsonl.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace(".", "/"), v, step)

    def progress(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        parts = [f"step {step}/{self.total}"]
        for key, fmt in (("loss", "{:.4f}"), ("mlm_loss", "mlm {:.4f}"), ("adv_loss", "adv {:.4f}"),
                         ("lr", "lr {:.2e}"), ("tokens_per_s", "{:,.0f} tok/s")):
            if key in values and values[key] is not None:
                parts.append(fmt.format(values[key]))
        parts.append(f"{elapsed:.0f}s")
        print(" | ".join(parts), file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
