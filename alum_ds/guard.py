"""The divergence policy: non-finite steps are skipped and counted, runs of them or of loss spikes
roll the run back to its newest healthy checkpoint (or stop it), and a checkpoint is written only
while the model is finite and the loss healthy.

Costs and agreement. Every step's masked-LM loss sum is accumulated on the device (``add``, no
host read) and travels to the host in the next step's one small all-reduce (the trainer's
masked-token count), so the per-step check adds no host sync and no collective; the verdict on
step k is known at the start of step k + 1, identically on every rank (they all see the same
reduced values), so every decision is collective without a collective of its own. A save or the
end of the run settles the pending step first (one all-reduce, at saves only).

Whether the update of step k happened is DeepSpeed's decision, taken before the optimizer steps
and agreed by all ranks: its ZeRO-1/2/3 and bf16 optimizers skip a step whose gradient norm is not
finite (``engine.skipped_steps`` counts them). The plain torch optimizer that ZeRO-0 fp32 runs
does not, so ``install`` gives it the same check (its gradients are all-reduced, the same on every
rank). A skipped step still moves the learning-rate schedule, so step k always has the learning
rate of step k and the data position and the schedule stay in step.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from alum_ds.config import ConfigError, GuardConfig

EXIT_DIVERGED = 3
# Spikes are judged once the running median holds this many steps (or the whole window).
MIN_HISTORY = 10


class Diverged(RuntimeError):
    """The run stopped on divergence; the message is one line and says what to do."""


@dataclass
class Verdict:
    """What the guard decided about one settled step."""

    step: int
    loss: float
    skipped: bool
    """DeepSpeed skipped the optimizer update (non-finite gradient norm)."""
    trigger: str = ""
    """Why the policy acts now (empty: it does not)."""


class Tee:
    """Hands each micro-step's statistics to several sinks (the metrics window and the guard)."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def add(self, stats: dict[str, Any]) -> None:
        for s in self.sinks:
            s.add(stats)


class Guard:
    """The policy's state on one rank (the same on every rank)."""

    def __init__(self, cfg: GuardConfig, device: torch.device, *, count_grad_skips: bool = True) -> None:
        self.cfg, self.device = cfg, device
        # Under fp16 a skipped step is the loss scaler at work, not a divergence: only the loss counts.
        self.count_grad_skips = count_grad_skips
        self.history: deque[float] = deque(maxlen=cfg.spike_window)
        self.nonfinite_run = 0
        self.spike_run = 0
        self.skipped_total = 0
        self.rollbacks = 0
        self.last_trigger = ""
        self._task = torch.zeros((), dtype=torch.float32, device=device)
        self._rows = 0.0
        self._pending: tuple[int, bool] | None = None  # (step, update skipped)

    # -- per step --------------------------------------------------------------------------
    def add(self, stats: dict[str, Any]) -> None:
        if not self.cfg.enabled:
            return
        self._task = self._task + torch.as_tensor(stats.get("task_sum", 0.0), device=self.device).float()
        self._rows += float(stats.get("rows", 0))

    def stepped(self, step: int, engine: Any, skipped_before: int) -> None:
        """Step ``step``'s update is done (or skipped: ``engine.skipped_steps`` moved)."""
        if not self.cfg.enabled:
            return
        skipped = engine.skipped_steps > skipped_before
        if skipped and self.count_grad_skips and engine.lr_scheduler is not None:
            engine.lr_scheduler.step()  # the skipped step's learning rate is spent all the same
        self._pending = (step, skipped)

    def payload(self) -> torch.Tensor:
        """The pending step's loss sum and rows, for the next all-reduce (sum over ranks)."""
        rows = torch.tensor([self._rows], dtype=torch.float32, device=self.device)
        return torch.cat([self._task.reshape(1), rows])

    def judge(self, reduced: list[float]) -> Verdict | None:
        """The pending step's verdict from its reduced ``payload``; None when none is pending."""
        if self._pending is None:
            return None
        step, skipped = self._pending
        self._pending = None
        self._task = torch.zeros((), dtype=torch.float32, device=self.device)
        self._rows = 0.0
        loss = reduced[0] / max(reduced[1], 1.0)
        cfg = self.cfg
        bad = not math.isfinite(loss) or (skipped and self.count_grad_skips)
        v = Verdict(step, loss, skipped and self.count_grad_skips)
        if v.skipped:
            self.skipped_total += 1
        if bad:
            self.nonfinite_run += 1
            if self.nonfinite_run >= cfg.max_nonfinite:
                what = "loss" if not math.isfinite(loss) else "gradient norm"
                v.trigger = (f"{self.nonfinite_run} steps in a row with a non-finite {what} "
                             f"(steps {step - self.nonfinite_run + 1}-{step}; guard.max_nonfinite="
                             f"{cfg.max_nonfinite})")
            return self._triggered(v)
        self.nonfinite_run = 0
        limit = self.spike_limit()
        if limit is not None and loss > limit:
            self.spike_run += 1
            if self.spike_run >= cfg.spike_steps:
                v.trigger = (f"loss above {cfg.spike_factor:g} x its running median "
                             f"({limit / cfg.spike_factor:.4g}) for {self.spike_run} steps (steps "
                             f"{step - self.spike_run + 1}-{step}; guard.spike_steps={cfg.spike_steps})")
            return self._triggered(v)
        self.spike_run = 0
        self.history.append(loss)
        return v

    def _triggered(self, v: Verdict) -> Verdict:
        self.last_trigger = v.trigger
        return v

    def spike_limit(self) -> float | None:
        if not self.cfg.spike_factor or len(self.history) < min(MIN_HISTORY, self.cfg.spike_window):
            return None
        return self.cfg.spike_factor * statistics.median(self.history)

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def healthy(self) -> str:
        """Why the recent loss is not healthy ('' when it is); call after the pending step is settled."""
        if not self.cfg.enabled:
            return ""
        if self.nonfinite_run:
            return f"the last {self.nonfinite_run} step(s) had a non-finite loss or gradient norm"
        if self.spike_run:
            return f"the loss has spiked for {self.spike_run} step(s)"
        return ""

    def reset(self) -> None:
        """After a rollback: the spike and non-finite runs belong to the abandoned steps."""
        self.nonfinite_run = self.spike_run = 0
        self._pending = None
        self._task = torch.zeros((), dtype=torch.float32, device=self.device)
        self._rows = 0.0

    # -- checkpoint state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.extend(float(x) for x in state.get("history", [])[-self.cfg.spike_window:])
        self.skipped_total = int(state.get("skipped_total", 0))


def params_finite(module: torch.nn.Module) -> torch.Tensor:
    """1.0 where every parameter this rank holds is finite, else 0.0 (a 1-element tensor on the
    parameters' device; ZeRO-3 ranks look at their own partitions)."""
    params = list(module.parameters())
    flags = [torch.isfinite(getattr(p, "ds_tensor", p).detach()).all() for p in params]
    return torch.stack(flags).all().float().reshape(1) if flags else torch.ones(1)


def install(engine: Any) -> None:
    """Give the plain torch optimizer (ZeRO-0, fp32) DeepSpeed's overflow protocol: skip the update
    when the gradient norm is not finite, set ``overflow`` (the engine then counts the step as
    skipped) and ``_global_grad_norm`` (the engine reports it). DeepSpeed's own optimizers
    already do both. With gradient clipping on, the norm is the one DeepSpeed's clipping computes
    anyway (its ``clip_fp32_gradients`` drops it): the check then adds one host read, no pass
    over the gradients."""
    opt = engine.optimizer
    if not isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "overflow"):
        return
    inner = opt.step
    clipped: list[torch.Tensor] = []

    if hasattr(engine, "clip_fp32_gradients"):
        from deepspeed.runtime.utils import clip_grad_norm_

        def clip_fp32_gradients() -> None:  # DeepSpeed's, keeping the norm it returns
            clipped.append(clip_grad_norm_(parameters=engine.module.parameters(),
                                           max_norm=engine.gradient_clipping(), mpu=engine.mpu))

        engine.clip_fp32_gradients = clip_fp32_gradients

    def step(*args: Any, **kwargs: Any) -> Any:
        if clipped:
            norm = clipped.pop().reshape(())
            clipped.clear()
        else:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads
                    else torch.zeros(()))
        opt._global_grad_norm = norm
        # One host read, on this path only: the others pay the same inside DeepSpeed.
        opt.overflow = not bool(torch.isfinite(norm))
        return None if opt.overflow else inner(*args, **kwargs)

    # ``inner`` is the step the LR scheduler already wrapped to see it called; say so, or the
    # scheduler's first step warns that the optimizer's step was replaced behind its back.
    step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    opt.overflow = False
    opt.step = step


def check_ds(ds: dict[str, Any], cfg: GuardConfig) -> None:
    """Refuse a DeepSpeed JSON that would apply non-finite bf16 updates under the guard."""
    bf16 = ds.get("bf16") or ds.get("bfloat16") or {}
    if cfg.enabled and isinstance(bf16, dict) and bf16.get("enabled") is True \
            and bf16.get("check_grad_overflow") is False:
        raise ConfigError("DeepSpeed config: bf16.check_grad_overflow=false would apply updates with "
                          "a non-finite gradient norm; remove it (or set guard.enabled=false)")


__all__ = ["Guard", "Tee", "Verdict", "Diverged", "EXIT_DIVERGED", "install", "check_ds",
           "params_finite"]
