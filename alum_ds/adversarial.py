"""ALUM's virtual adversarial regulariser, independent of model, engine and ranks.

Given the embedding output ``h0``, the clean logits ``z`` and a function ``f`` that maps a
(perturbed) embedding output to logits at the same positions, compute

    max_{||delta|| <= eps} symKL(f(h0 + delta), z)

by K normalised ascent steps on delta, exactly as ../shared/ALUM.md specifies.

Reductions (fixed, so alpha and eta keep their meaning): each KL is summed over the vocabulary
and averaged over the positions ``f`` returns (the masked tokens). All softmax/KL arithmetic is
fp32 and delta is kept in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alum_ds.config import AlumConfig


class PrecisionError(RuntimeError):
    """The perturbation does not survive the model's dtype; the message names a radius that does."""


def kl_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from logits, in fp32: summed over the vocabulary, mean over positions."""
    # At least fp32; fp64 logits stay fp64 (``.float()`` rounded them, and fp32 rounding noise,
    # ~1e-7, swamps the O(delta^2) KL that fp64 gradient checks measure).
    dt = torch.promote_types(torch.promote_types(p_logits.dtype, q_logits.dtype), torch.float32)
    logp = F.log_softmax(p_logits.to(dt), dim=-1)
    logq = F.log_softmax(q_logits.to(dt), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def symmetric_kl(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """KL(sg(p_clean) || p_adv) + KL(sg(p_adv) || p_clean): each side's target is detached, so the
    gradient moves each distribution towards the other (as in the authors' code)."""
    return kl_logits(clean.detach(), adv) + kl_logits(adv.detach(), clean)


def token_norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-token norm over the hidden dimension, keeping it for broadcasting."""
    if norm == "linf":
        return x.abs().amax(dim=-1, keepdim=True)
    return x.norm(dim=-1, keepdim=True)


def normalize(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Scale each token's vector to unit norm. The stabiliser is relative to the tensor's own
    largest token norm, never an absolute 1e-6: ascent gradients are often far below 1e-6, and an
    absolute stabiliser would shrink the step by orders of magnitude instead of setting it to eta.
    Tokens whose gradient is exactly zero stay zero."""
    # Pre-scale by the largest |g| (the direction is unchanged): without it the l2 norm's squares
    # underflow to 0 for |g| below ~1e-19 in fp32 (or overflow above ~1e19), and the "unit" step
    # came out 1e8 times too long (or zero).
    g = g / g.abs().amax().clamp_min(torch.finfo(g.dtype).tiny)
    n = token_norm(g, norm)
    # Clamp after scaling: ``tiny * 1e-12`` underflows to 0 in fp32, which turned an all-zero
    # gradient (e.g. a perturbation rounded away entirely in bf16) into 0/0 = NaN.
    stab = (n.amax() * 1e-12).clamp_min(torch.finfo(n.dtype).tiny)
    return g / (n + stab)


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project each token's perturbation onto the norm ball of radius eps."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = token_norm(delta, "l2")
    return delta * torch.clamp(eps / n.clamp_min(torch.finfo(n.dtype).tiny), max=1.0)


def add_perturbation(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """h + delta, summed in at least fp32 and cast back to the model's dtype (the encoder's input
    dtype). (An fp64 ``h`` is summed in fp64: ``h.float()`` would round it to fp32 first.)"""
    wide = torch.promote_types(h.dtype, torch.float32)
    return (h.to(wide) + delta.to(wide)).to(h.dtype)


def surviving_fraction(h: torch.Tensor, delta: torch.Tensor) -> float:
    """<applied, delta> / ||delta||^2 with applied = cast(h + delta) - h: the fraction of the intended
    perturbation the encoder sees. A norm ratio ||applied|| / ||delta|| is not a measure of this:
    rounding noise adds norm (a 0.6-ulp element rounds to a full ulp), so bf16 with delta ~ 1e-3
    passed a 0.5 threshold on the norm ratio while only ~25% of delta survived. Projecting onto
    delta counts only the part of ``applied`` that points where delta does."""
    h, d = h.detach(), delta.detach().double()
    applied = add_perturbation(h, d).double() - h.double()
    dn2 = (d * d).sum()
    return float((applied * d).sum() / dn2) if dn2 > 0 else 1.0


def surviving_radius(h: torch.Tensor, norm: str = "linf") -> float:
    """A perturbation radius (in the per-token ``norm``) that survives rounding of most elements of
    ``h``: per element, twice the median unit-in-the-last-place of ``h`` in its dtype; for l2 that
    element size times sqrt(hidden), since an l2 radius is spread over the hidden dimension (the
    per-element size alone left ~60% of an l2 perturbation rounded away in bf16). Rounded up to
    one significant digit."""
    if h.dtype == torch.float32 or h.dtype == torch.float64:
        return 0.0
    mant = {torch.bfloat16: 7, torch.float16: 10}.get(h.dtype, 7)
    a = h.detach().float().abs().flatten()
    a = a[a > 0]
    if a.numel() == 0:
        return 0.0
    ulp = torch.exp2(torch.floor(torch.log2(a)) - mant)
    r = 2 * float(ulp.median())
    if norm == "l2":
        r *= math.sqrt(h.shape[-1])
    exp = math.floor(math.log10(r))
    return math.ceil(r / 10**exp) * 10**exp


@dataclass
class AdvResult:
    loss: torch.Tensor
    """alpha-free symmetric KL after the ascent (zero, detached, when skipped)."""
    skipped: bool
    delta_norm: float
    """Mean per-token norm of the final perturbation."""
    grad_norm: float
    """Mean per-token norm of the last ascent gradient (before normalisation)."""
    kl_before: float
    """Forward KL at the initial random perturbation (ascent diagnostics)."""


def adversarial_loss(
    f: Callable[[torch.Tensor], torch.Tensor],
    h0: torch.Tensor,
    clean_logits: torch.Tensor,
    cfg: AlumConfig,
    *,
    any_rank: Callable[[bool], bool] = lambda flag: flag,
    generator: torch.Generator | None = None,
) -> AdvResult:
    """ALUM's regulariser (without alpha). ``f`` must be deterministic in its parameters apart from
    dropout; ``any_rank`` turns a local skip flag into a global one so every rank runs the same
    backward graph (ZeRO-3 gathers parameters collectively in backward)."""
    h = h0.detach()
    target = clean_logits.detach()
    delta = torch.randn(h.shape, dtype=torch.float32, device=h.device, generator=generator)
    delta = delta * cfg.sigma
    skipped = False
    grad_norm = 0.0
    kl_before = float("nan")
    for step in range(cfg.ascent_steps):
        delta.requires_grad_(True)
        kl = kl_logits(target, f(add_perturbation(h, delta)))
        if step == 0:
            kl_before = float(kl.detach())
        # Scaling the KL to O(1) before the gradient keeps the ascent gradient away from fp16
        # underflow; the normalisation below makes the step independent of this scale. The scale
        # is capped at 1e8: the KL at delta ~ sigma is below fp32 rounding noise, so it is often
        # exactly 0 or slightly negative, and the former 1/max(kl, 1e-30) = 1e30 overflowed the
        # fp16 backward to inf (every step skipped, the precision guard never reached). By
        # Pinsker, |dKL/dlogits| <= sqrt(2 kl), so the scaled gradient stays below ~1.5e4.
        scale = 1.0 / kl.detach().abs().clamp_min(1e-8)
        (g,) = torch.autograd.grad(kl * scale, delta)
        g = g / scale
        if not bool(torch.isfinite(g).all()):
            # Keep looping (with a harmless zero delta): every rank must run the same passes.
            skipped = True
            delta = torch.zeros_like(h, dtype=torch.float32)
            continue
        grad_norm = float(token_norm(g, cfg.norm).mean())
        step_dir = normalize(g, cfg.norm)
        with torch.no_grad():
            if cfg.update == "project":
                delta = project(delta.detach() + cfg.eta * step_dir, cfg.epsilon, cfg.norm)
            else:
                moved = delta.detach() + cfg.eta * step_dir
                delta = normalize(moved, cfg.norm)

    if not skipped:
        frac = surviving_fraction(h, delta)
        if frac < cfg.min_surviving_fraction:
            r = surviving_radius(h, cfg.norm)
            raise PrecisionError(
                f"ALUM perturbation does not survive {str(h.dtype).removeprefix('torch.')}: only "
                f"{frac:.0%} of it reaches the encoder (alum.eta={cfg.eta:g}, "
                f"alum.epsilon={cfg.epsilon:g}). Use a radius of at least {r:g} "
                f"(--alum.eta={r:g} --alum.epsilon={r:g}) or train in fp32"
            )
    adv_logits = f(add_perturbation(h, delta.detach()))
    # The live clean logits: KL(sg(p_adv) || p_clean) trains the clean pass too (ALUM.md).
    loss = symmetric_kl(clean_logits, adv_logits)
    if not bool(torch.isfinite(loss.detach())):
        skipped = True
    if any_rank(skipped):
        return AdvResult(torch.zeros((), device=h.device), True, 0.0, grad_norm, kl_before)
    return AdvResult(
        loss=loss,
        skipped=False,
        delta_norm=float(token_norm(delta, cfg.norm).mean()),
        grad_norm=grad_norm,
        kl_before=kl_before,
    )

