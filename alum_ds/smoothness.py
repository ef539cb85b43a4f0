"""Held-out adversarial smoothness: what ALUM's regulariser optimises, measured directly.

For a batch with embedding output ``h0`` and clean logits ``f(h0)`` at the masked positions,

    S_r = max_{||delta||_inf <= r per token} symKL(f(h0 + delta), f(h0)),

each KL summed over the vocabulary and averaged over the positions (docs/ALUM.md, "Objective").
The max is approximated by PGD on delta with ALUM's own ascent (``alum_ds.adversarial``): from
delta_0 ~ N(0, sigma^2), ``steps`` steps of ``delta <- project_r(delta + r * normalize(g))`` on
the symmetric KL, the normalisation scale-free per token and the projection per token, exactly
as training's ``project`` rule with eta = epsilon = r. The value reported is the largest
symmetric KL met at any iterate (every iterate is feasible, so this is still a lower bound on
the true max). Model-free: ``f`` is any function from a perturbed embedding output to logits.
Call it with dropout off (eval mode) for a deterministic measure.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from alum_ds.adversarial import (
    Target,
    add_perturbation,
    init_delta,
    normalize,
    project,
    symmetric_kl,
)


def adversarial_smoothness(f: Callable[[torch.Tensor], torch.Tensor], h0: torch.Tensor, *,
                           radius: float, steps: int, norm: str = "linf", sigma: float = 1e-5,
                           generator: torch.Generator | None = None,
                           keep: torch.Tensor | None = None) -> torch.Tensor:
    """``S_radius`` (a detached 0-dim tensor): the largest mean symmetric KL between ``f(h0)``
    and ``f(h0 + delta)`` over the PGD iterates. ``keep`` (broadcastable to ``h0``, 0/1) leaves
    padded positions unperturbed. ``radius`` 0 or ``steps`` 0: exactly 0."""
    h = h0.detach()
    with torch.no_grad():
        clean = f(h)
    target = Target.of(clean)
    best = torch.zeros((), dtype=target.p.dtype, device=h.device)
    if radius <= 0 or steps <= 0:
        return best
    delta = project(init_delta(h, sigma, generator), radius, norm)
    for i in range(steps + 1):
        with torch.enable_grad():
            d = delta.requires_grad_(i < steps)
            z = f(add_perturbation(h, d if keep is None else d * keep))
            # The value is the symmetric KL; its gradient w.r.t. delta (clean is a constant,
            # the perturbed side's target detached) is that of KL(p_clean || p_delta), the
            # direction training's ascent follows.
            kl = symmetric_kl(clean, z, target)
            best = torch.maximum(best, kl.detach().to(best.dtype))
            if i == steps:
                break
            # A model that ignores its input leaves delta unused: its gradient is zero.
            (g,) = torch.autograd.grad(kl, d, allow_unused=True) if kl.requires_grad else (None,)
        with torch.no_grad():
            if g is None:
                g = torch.zeros_like(delta)
            g = torch.where(torch.isfinite(g), g, torch.zeros_like(g))
            delta = project(delta.detach() + radius * normalize(g, norm), radius, norm)
    return best


__all__ = ["adversarial_smoothness"]
