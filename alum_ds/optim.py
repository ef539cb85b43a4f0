"""Optimizer and learning-rate schedule from the run config (RoBERTa's recipe)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from alum_ds.config import OptimConfig, RunConfig, ScheduleBase


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], optim: OptimConfig, ds: dict,
                   on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW without decay on biases and LayerNorm weights (RoBERTa's recipe). On a GPU,
    DeepSpeed's fused Adam (or its CPU Adam when the optimizer is offloaded)."""
    decay = [p for n, p in params if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "LayerNorm" not in n)]
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=optim.lr, betas=optim.betas, eps=optim.eps)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if on_gpu and offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if on_gpu:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    # The fused CPU kernel: one pass over the flat ZeRO partition instead of a dozen elementwise
    # ops (measured: the small preset's plain step 0.318 -> 0.308 s on 2 CPU ranks).
    return torch.optim.AdamW(groups, fused=True, **kw)


def planned_steps(cfg: RunConfig, global_batch: int) -> int:
    """The run's last optimizer step: schedule.steps, or earlier where the token budget
    (schedule.max_tokens) is reached. The decay ends there."""
    steps = cfg.schedule.steps
    if cfg.schedule.max_tokens:
        per_step = global_batch * cfg.data.seq_len
        steps = min(steps, math.ceil(cfg.schedule.max_tokens / per_step))
    return steps


def lr_lambda(schedule: ScheduleBase, total: int) -> Callable[[int], float]:
    """Multiplier of optim.lr at optimizer step ``step`` (0-based): linear warmup, then linear,
    polynomial ((1 - progress) ** power, as fairseq's RoBERTa recipe with end lr 0) or no decay,
    reaching 0 at step ``total``."""
    warm, decay, power = schedule.warmup_for(total), schedule.decay, schedule.power

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if decay == "constant":
            return 1.0
        remaining = max(0.0, (total - step) / max(1, total - warm))
        return remaining if decay == "linear" else remaining**power

    return f
