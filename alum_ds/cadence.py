"""When a loop's periodic work is due: each cadence is a small object the loop asks with the step
just finished, so ``Loop.run`` reads as train step -> log -> evaluate -> stop -> save."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """Due at every ``n``-th step (``n`` 0: never). At the run's ``last`` step, ``final`` decides:
    True (always due there: the last log line), False (never: the final evaluation runs after the
    loop), None (as at any other step)."""

    n: int
    last: int
    final: bool | None = None

    def due(self, step: int) -> bool:
        if step == self.last and self.final is not None:
            return self.final
        return bool(self.n) and step % self.n == 0


@dataclass(frozen=True)
class StopAfter:
    """``run.stop_after``: due once ``n`` steps (0: never) have run in this invocation, unless
    the run has reached its last step anyway."""

    n: int
    first: int
    last: int

    def due(self, step: int) -> bool:
        return bool(self.n) and step - self.first >= self.n and step < self.last
