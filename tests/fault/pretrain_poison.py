"""``alum-ds train`` with one injected divergence, for tests: right after optimizer step
``$POISON_STEP`` (counted in this process's engine, from its first step) one weight of the model
becomes NaN, as an overflowing update would leave it, so every later step's loss and gradients are
non-finite until the run recovers. With ``$POISON_ONCE`` set, only the first time that step is
reached in this process (a rollback then trains through it healthy).

``$POISON_LOSS_AT`` instead multiplies the loss of the steps in that comma-separated list by 1e6
(a loss spike that the update, clipped, survives), the first time each is reached (a rollback
then trains through them healthy).

The fault wraps DeepSpeed's own ``DeepSpeedEngine.step`` / ``forward`` in this process only;
alum_ds reads no test switch.
"""

import os
import sys

import torch
from deepspeed.runtime.engine import DeepSpeedEngine

from alum_ds.cli import train_main

POISON = int(os.environ.get("POISON_STEP", "0"))
ONCE = bool(os.environ.get("POISON_ONCE"))
SPIKES = {int(s) for s in os.environ.get("POISON_LOSS_AT", "").split(",") if s}
_step, _forward = DeepSpeedEngine.step, DeepSpeedEngine.forward
_done: list[int] = []
_fired: set[int] = set()


def _step_then_poison(self, *args, **kwargs):
    before = self.global_steps
    out = _step(self, *args, **kwargs)
    steps = self.global_steps
    if steps != before:  # an optimizer step (the last micro-step of the accumulation)
        if steps in SPIKES:
            _fired.add(steps)
        if POISON and steps == POISON and not (ONCE and _done):
            _done.append(steps)
            p = next(self.module.parameters())
            with torch.no_grad():
                target = getattr(p, "ds_tensor", p)
                target.view(-1)[0] = float("nan")
            print(f"fault: weight poisoned after step {steps}", file=sys.stderr, flush=True)
    return out


def _forward_spiked(self, *args, **kwargs):
    loss, stats = _forward(self, *args, **kwargs)
    if self.training and self.global_steps + 1 in SPIKES and self.global_steps + 1 not in _fired:
        loss = loss * 1e6
        stats = {**stats, "task_sum": stats["task_sum"] * 1e6}
    return loss, stats


DeepSpeedEngine.step = _step_then_poison
DeepSpeedEngine.forward = _forward_spiked

if __name__ == "__main__":
    sys.exit(train_main(prog="pretrain_poison.py"))
