"""ALUM's virtual adversarial regulariser, independent of model, engine and ranks.

Given the embedding output ``h0``, the clean logits ``z`` and a function ``f`` that maps a
(perturbed) embedding output to logits at the same positions, compute

    max_{||delta|| <= eps} symKL(f(h0 + delta), z)

by K normalised ascent steps on delta, exactly as docs/ALUM.md specifies.

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


def _kl_dtype(*logits: torch.Tensor) -> torch.dtype:
    """At least fp32; fp64 logits stay fp64 (``.float()`` rounded them, and fp32 rounding noise,
    ~1e-7, swamps the O(delta^2) KL that fp64 gradient checks measure)."""
    dt = torch.float32
    for x in logits:
        dt = torch.promote_types(dt, x.dtype)
    return dt


@dataclass(frozen=True)
class Target:
    """A detached distribution over the vocabulary, computed once and reused: log-probabilities
    and probabilities (at least fp32), one row per position."""

    logp: torch.Tensor
    p: torch.Tensor

    @staticmethod
    def of(logits: torch.Tensor) -> Target:
        with torch.no_grad():
            logp = F.log_softmax(logits.detach().to(_kl_dtype(logits)), dim=-1)
            return Target(logp, logp.exp())


# The KLs of a step are elementwise work on [masked tokens, vocabulary] tensors: on the small
# preset (vocabulary 8192) autograd's form cost ~9% of a CPU ALUM step, mostly log_softmax
# recomputed for every use and log_softmax's backward. Both KLs have closed-form gradients
# w.r.t. the logits, so they are written as autograd Functions that reuse the clean side's
# ``Target`` and save one tensor for the backward.


class _KLToTarget(torch.autograd.Function):
    """KL(sg(p) || softmax(q)), mean over rows; d/dq = (softmax(q) - p) / rows."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, logp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(q.to(logp.dtype), dim=-1)
        ctx.save_for_backward(logq, p)
        ctx.q_dtype = q.dtype
        return (p * (logp - logq)).sum(-1).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logq, p = ctx.saved_tensors
        g = (logq.exp() - p) * (grad / logq.shape[0])
        return g.to(ctx.q_dtype), None, None


class _SymmetricKL(torch.autograd.Function):
    """KL(sg(p_c) || p_a) + KL(sg(p_a) || p_c) = sum (p_c - p_a)(log p_c - log p_a), mean over
    rows; d/dc = (p_c - p_a) / rows, d/da = -(p_c - p_a) / rows."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, a: torch.Tensor, logp_c: torch.Tensor,
                p_c: torch.Tensor) -> torch.Tensor:
        logp_a = F.log_softmax(a.to(logp_c.dtype), dim=-1)
        d = p_c - logp_a.exp()
        ctx.save_for_backward(d)
        ctx.dtypes = (c.dtype, a.dtype)
        return (d * (logp_c - logp_a)).sum(-1).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (d,) = ctx.saved_tensors
        g = d * (grad / d.shape[0])
        return g.to(ctx.dtypes[0]), (-g).to(ctx.dtypes[1]), None, None


def kl_to_target(target: Target, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(target || softmax(q_logits)), summed over the vocabulary, mean over positions; the
    gradient reaches ``q_logits`` only. Equals the plain autograd KL
    (``tests/_alum_helpers.kl_logits``) of ``target_logits`` and ``q_logits``."""
    dt = _kl_dtype(target.logp, q_logits)
    return _KLToTarget.apply(q_logits, target.logp.to(dt), target.p.to(dt))


def symmetric_kl(clean: torch.Tensor, adv: torch.Tensor, clean_target: Target | None = None) -> torch.Tensor:
    """KL(sg(p_clean) || p_adv) + KL(sg(p_adv) || p_clean): each side's target is detached, so the
    gradient moves each distribution towards the other (as in the authors' code). Equals
    ``kl_logits(clean.detach(), adv) + kl_logits(adv.detach(), clean)`` with its gradients (the
    plain autograd KL of ``tests/_alum_helpers``);
    ``clean_target`` (``Target.of(clean)``) saves recomputing the clean side."""
    t = clean_target if clean_target is not None else Target.of(clean)
    dt = _kl_dtype(t.logp, adv)
    return _SymmetricKL.apply(clean, adv, t.logp.to(dt), t.p.to(dt))


def squared_to_target(target: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(q - sg(target))^2 summed over outputs, mean over rows, in at least fp32: the regression
    counterpart of ``kl_to_target`` (the ascent's objective for a real-valued output)."""
    dt = _kl_dtype(target, q)
    d = q.to(dt) - target.detach().to(dt)
    return (d * d).sum(-1).mean()


def squared_difference(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """(clean - adv)^2 summed over outputs, mean over rows, both sides live: the regression
    counterpart of ``symmetric_kl`` (SMART's and MT-DNN's choice for regression tasks; the
    gradient pulls each output towards the other, as the symmetric KL does)."""
    dt = _kl_dtype(clean, adv)
    d = clean.to(dt) - adv.to(dt)
    return (d * d).sum(-1).mean()


DIVERGENCES = ("kl", "squared")


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


def _surviving_fraction(h: torch.Tensor, delta: torch.Tensor,
                        perturbed: torch.Tensor | None = None) -> torch.Tensor:
    """``surviving_fraction`` as a 0-dim tensor on ``h``'s device (no host sync). ``perturbed`` is
    ``add_perturbation(h, delta)`` if the caller has it. In at least fp32 (fp64 for an fp64 ``h``):
    cast(h + delta) - h is exact there (two nearby floats), and the two sums only feed a threshold;
    fp64 arithmetic had cost ~1.5% of a CPU ALUM step."""
    wide = torch.promote_types(h.dtype, torch.float32)
    if perturbed is None:
        perturbed = add_perturbation(h.detach(), delta.detach())
    d = delta.detach().to(wide)
    applied = perturbed.detach().to(wide) - h.detach().to(wide)
    dn2 = (d * d).sum()
    return torch.where(dn2 > 0, (applied * d).sum() / dn2.clamp_min(torch.finfo(wide).tiny),
                       torch.ones_like(dn2))


def surviving_fraction(h: torch.Tensor, delta: torch.Tensor) -> float:
    """<applied, delta> / ||delta||^2 with applied = cast(h + delta) - h: the fraction of the intended
    perturbation the encoder sees. A norm ratio ||applied|| / ||delta|| is not a measure of this:
    rounding noise adds norm (a 0.6-ulp element rounds to a full ulp), so bf16 with delta ~ 1e-3
    passed a 0.5 threshold on the norm ratio while only ~25% of delta survived. Projecting onto
    delta counts only the part of ``applied`` that points where delta does."""
    return float(_surviving_fraction(h, delta))


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


# The median |h| above which the embedding output is taken for a diverged model's. h is the
# embedding LayerNorm's output (ELECTRA's: a projection of it), so its scale is the LayerNorm
# weight: it starts at 1 and trained encoders keep the median |h| O(1) (a few outlier features
# reach ~10-20; the median ignores them). A median of 100 needs weights two orders of magnitude
# past that, as a few steps at a far too high learning rate leave them; a radius that survives
# rounding there would be as large as a healthy model's whole activation.
DIVERGED_MEDIAN = 100.0


def _lost_perturbation(h: torch.Tensor, delta: torch.Tensor, frac: float, cfg: AlumConfig) -> str:
    """The precision guard's message, from what the guard measured. Non-finite values, or an
    embedding output grown past ``DIVERGED_MEDIAN``: the model has diverged, and the message says
    so without naming a radius (the perturbation's precision is not the cause). Otherwise in
    fp16/bf16 it names a radius the dtype keeps; in fp32 (no dtype limit) the radius is below the
    rounding of the largest activations."""
    dtype = str(h.dtype).removeprefix("torch.")
    lost = (f"only {frac:.0%} of the ALUM perturbation reaches the encoder (alum.eta={cfg.eta:g}, "
            f"alum.epsilon={cfg.epsilon:g})")
    hd = h.detach()
    if not (bool(torch.isfinite(hd).all()) and bool(torch.isfinite(delta.detach()).all())):
        return (f"{lost}: the embedding output or the perturbation is not finite, so the run has "
                "diverged (it is not the perturbation's precision): lower optim.lr, or resume from "
                "an earlier checkpoint")
    median = float(hd.float().abs().median())
    if median > DIVERGED_MEDIAN:
        return (f"{lost}: the embedding output has grown to a median |h| of {median:.3g} (a "
                f"healthy model's embedding LayerNorm output is about 1), so the run has diverged "
                f"(it is not the perturbation's precision): lower optim.lr or lengthen the warm-up, "
                f"and resume from an earlier checkpoint")
    r = surviving_radius(h, cfg.norm)
    if r > 0:
        return (f"ALUM perturbation does not survive {dtype}: {lost}. Use a radius of at least "
                f"{r:g} (--alum.eta={r:g} --alum.epsilon={r:g}) or train in fp32")
    big = float(hd.float().abs().max())
    return (f"{lost} in {dtype}: the embedding output reaches |h| = {big:.3g}, so a step that small "
            f"rounds away: raise alum.eta and alum.epsilon above "
            f"{big * float(torch.finfo(h.dtype).eps):.1g}")


def init_delta(h: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The initial perturbation delta_0 ~ N(0, sigma^2), fp32, shaped like ``h``."""
    return torch.randn(h.shape, dtype=torch.float32, device=h.device, generator=generator) * sigma


@dataclass
class AdvResult:
    """Every number is a detached 0-dim tensor on the model's device, so reading the result costs
    no host sync; only ``skipped`` (which decides the backward graph) is a Python bool."""

    loss: torch.Tensor
    """alpha-free symmetric KL after the ascent (zero, detached, when skipped)."""
    skipped: bool
    delta_norm: torch.Tensor
    """Mean per-token norm of the final perturbation (zero when skipped)."""
    grad_norm: torch.Tensor
    """Mean per-token norm of the last ascent gradient (before normalisation; non-finite
    entries count as zero)."""


def adversarial_loss(
    f: Callable[[torch.Tensor], torch.Tensor],
    h0: torch.Tensor,
    clean_logits: torch.Tensor,
    cfg: AlumConfig,
    *,
    any_rank: Callable[[bool], bool] = lambda flag: flag,
    generator: torch.Generator | None = None,
    delta0: torch.Tensor | None = None,
    first_logits: torch.Tensor | None = None,
    clean_target: Target | None = None,
    ascent_f: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ascent_steps: int | None = None,
    divergence: str = "kl",
) -> AdvResult:
    """ALUM's regulariser (without alpha). ``f`` must be deterministic in its parameters apart from
    dropout; ``any_rank`` turns a local skip flag into a global one so every rank runs the same
    backward graph (ZeRO-3 gathers parameters collectively in backward).

    Fused first pass: ``first_logits`` are the logits of ``f(add_perturbation(h0.detach(),
    delta0))`` already computed (with ``delta0`` a leaf that requires grad) in the same graph as
    the clean logits, e.g. one forward over a doubled batch. The first ascent gradient is then
    taken through that graph with ``retain_graph=True``, so the clean half stays intact for the
    final backward; since the ascent KL's target is detached, only the perturbed half feeds the
    gradient w.r.t. delta.

    Host syncs: the finite checks of every ascent gradient, of the adversarial loss and the
    precision guard are combined on the device and read in one transfer; ``any_rank`` adds the
    collective one. Nothing else leaves the device.

    ``clean_target`` is ``Target.of(clean_logits)`` if the caller has it already. ``ascent_f``
    computes the same function as ``f`` for the ascent's passes (e.g. with parameters frozen, so
    that a compiled graph returns the input gradient only); default ``f``. ``ascent_steps``
    overrides ``cfg.ascent_steps``: 0 runs the adversarial pass at ``delta0`` as given (the
    warm-started perturbation; a ``delta0`` that requires grad receives the final backward's
    gradient).

    ``divergence``: ``"kl"`` (distributions: the symmetric KL above) or ``"squared"`` (a
    real-valued output, regression: the squared difference of the outputs in place of each KL).
    """
    h = h0.detach()
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}")
    kl_on = divergence == "kl"
    target = (clean_target if clean_target is not None else Target.of(clean_logits)) if kl_on else None
    if first_logits is not None and delta0 is None:
        raise ValueError("first_logits needs the delta0 it was computed from")
    if delta0 is None:
        delta0 = init_delta(h, cfg.sigma, generator)
    delta = delta0
    ok = torch.ones((), dtype=torch.bool, device=h.device)
    grad_norm = torch.zeros((), device=h.device)
    if cfg.perturbation == "random" and first_logits is not None:
        raise ValueError("the random-perturbation control takes no ascent pass to fuse")
    for step in range(cfg.ascent_steps if ascent_steps is None else ascent_steps):
        if cfg.perturbation == "random":
            delta = _random_step(delta, cfg, generator)
            continue
        fused = step == 0 and first_logits is not None
        if not fused:
            delta.requires_grad_(True)
        adv = first_logits if fused else (ascent_f or f)(add_perturbation(h, delta))
        kl = kl_to_target(target, adv) if kl_on else squared_to_target(clean_logits, adv)
        delta, ok, grad_norm = _ascent_step(kl, delta, ok, cfg, retain_graph=fused)

    h_adv = add_perturbation(h, delta)
    frac = _surviving_fraction(h, delta, h_adv)
    adv_logits = f(h_adv)
    # The live clean logits: KL(sg(p_adv) || p_clean) trains the clean pass too (docs/ALUM.md).
    loss = symmetric_kl(clean_logits, adv_logits, target) if kl_on else \
        squared_difference(clean_logits, adv_logits)
    # The one local host read of the step: [ascent finite, loss finite, fraction surviving].
    ascent_ok, loss_ok, frac_v = torch.stack(
        [ok.to(frac.dtype), torch.isfinite(loss.detach()).to(frac.dtype), frac]).tolist()
    if ascent_ok and frac_v < cfg.min_surviving_fraction:
        raise PrecisionError(_lost_perturbation(h, delta, frac_v, cfg))
    skipped = not (ascent_ok and loss_ok)
    zero = torch.zeros((), device=h.device)
    if any_rank(skipped):
        return AdvResult(zero, True, zero, grad_norm)
    return AdvResult(loss=loss, skipped=False, delta_norm=token_norm(delta.detach(), cfg.norm).mean(),
                     grad_norm=grad_norm)


def _random_step(delta: torch.Tensor, cfg: AlumConfig, generator: torch.Generator | None) -> torch.Tensor:
    """The control arm's step: the ascent's direction replaced by Gaussian noise, then normalised
    and projected exactly as an ascent step, so delta has ALUM's radius; no pass runs and no
    gradient is taken."""
    noise = torch.randn(delta.shape, dtype=torch.float32, device=delta.device, generator=generator)
    with torch.no_grad():
        moved = delta.detach() + cfg.eta * normalize(noise, cfg.norm)
        return project(moved, cfg.epsilon, cfg.norm) if cfg.update == "project" else \
            normalize(moved, cfg.norm)


def _ascent_step(kl: torch.Tensor, delta: torch.Tensor, ok: torch.Tensor, cfg: AlumConfig, *,
                 retain_graph: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One normalised gradient-ascent step on delta: (the new delta, whether every ascent
    gradient so far was finite, this gradient's mean per-token norm)."""
    # Scaling the KL to O(1) before the gradient keeps the ascent gradient away from fp16
    # underflow; the normalisation below makes the step independent of this scale. The scale
    # is capped at 1e8: the KL at delta ~ sigma is below fp32 rounding noise, so it is often
    # exactly 0 or slightly negative, and a scale of 1/1e-30 = 1e30 overflows the fp16
    # backward to inf (every step skipped, the precision guard never reached). By
    # Pinsker, |dKL/dlogits| <= sqrt(2 kl), so the scaled gradient stays below ~1.5e4.
    scale = 1.0 / kl.detach().abs().clamp_min(1e-8)
    (g,) = torch.autograd.grad(kl * scale, delta, retain_graph=retain_graph)
    with torch.no_grad():
        g = g / scale
        # A non-finite gradient zeroes delta from here on (the remaining passes still run, on
        # every rank, with a harmless zero perturbation) and marks the step skipped. Decided
        # on the device: ``where`` never lets the NaN through.
        finite = torch.isfinite(g).all()
        ok = ok & finite
        g = torch.where(finite, g, torch.zeros_like(g))
        grad_norm = token_norm(g, cfg.norm).mean()
        moved = delta.detach() + cfg.eta * normalize(g, cfg.norm)
        moved = project(moved, cfg.epsilon, cfg.norm) if cfg.update == "project" else \
            normalize(moved, cfg.norm)
        return torch.where(ok, moved, torch.zeros_like(moved)), ok, grad_norm
