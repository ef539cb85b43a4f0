"""The training objective as one module: masked-LM loss plus ALUM's regulariser.

DeepSpeed wraps this module. Doing the whole ALUM computation inside its ``forward`` keeps the
ascent's ``torch.autograd.grad`` away from the engine's output hooks (a gradient taken through
``engine(...)``'s output runs ZeRO's reduction epilogue) and lets the trainer call
``engine.backward`` exactly once on the total loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import RobertaForMaskedLM

from alum_ds import model as M
from alum_ds.adversarial import Target, add_perturbation, adversarial_loss, init_delta
from alum_ds.config import AlumConfig, ConfigError


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``targets`` from the clean side's ``Target`` (the log-softmax the KLs
    use as well, computed once); d/dz = (p - onehot(targets)) / rows."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, targets: torch.Tensor, logp: torch.Tensor,
                p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p, targets)
        ctx.z_dtype = z.dtype
        return -logp.gather(1, targets[:, None]).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, targets = ctx.saved_tensors
        g = p.scatter_add(1, targets[:, None], torch.full_like(p[:, :1], -1.0))
        return (g * (grad / p.shape[0])).to(ctx.z_dtype), None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, target: Target | None = None) -> torch.Tensor:
    """``F.cross_entropy(logits, targets)`` in at least fp32, reusing ``Target.of(logits)``."""
    t = target if target is not None else Target.of(logits)
    return _CrossEntropy.apply(logits, targets, t.logp, t.p)


def fused_first_pass(
    module: nn.Module,
    h0: torch.Tensor,
    alum: AlumConfig,
    generator: torch.Generator | None,
    run: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean pass and the first perturbed pass as one forward over ``[h0; h0 + delta_0]``
    (``alum.fused_first_pass``): returns ``run``'s output on the doubled batch and ``delta_0``.
    Shared by the pretraining and fine-tuning objectives.

    Refused under ZeRO-3: the fused graph is backpropagated twice (the ascent, then the final
    backward) while ZeRO-3 gathers a module's parameters for backward once per forward and
    releases them after the first traversal, so the second finds them partitioned."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        raise ConfigError(
            "alum.fused_first_pass=true does not work under ZeRO-3 (its graph is "
            "backpropagated twice and ZeRO-3 re-gathers parameters only once per forward): "
            "use ZeRO-0/1/2 or --alum.fused_first_pass=false (the same loss, unfused)"
        )
    delta0 = init_delta(h0, alum.sigma, generator).requires_grad_()
    return run(torch.cat([h0, add_perturbation(h0.detach(), delta0)])), delta0


class AlumObjective(nn.Module):
    """``forward(input_ids, labels, alum_on)`` returns ``(loss, stats)``.

    ``labels`` holds the original token at masked positions and -100 elsewhere. The LM head and
    every KL run at the masked positions only. ``any_rank`` (from the trainer) makes a skip of the
    adversarial term a collective decision; the model itself knows nothing of ranks.

    ``stats`` values are detached 0-dim tensors on the model's device (``masked_tokens`` and
    ``adv_skipped`` are ints, known on the host anyway), so building them costs no host sync; read
    them in one transfer (``torch.stack``) when logging.
    """

    def __init__(
        self,
        mlm: RobertaForMaskedLM,
        alum: AlumConfig,
        *,
        any_rank: Callable[[bool], bool] = lambda flag: flag,
    ) -> None:
        super().__init__()
        self.mlm = mlm
        self.alum = alum
        self.any_rank = any_rank
        self.skipped_total = 0
        self.generator: torch.Generator | None = None
        """Source of delta_0's noise (None: torch's global generator, seeded by the trainer)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        alum_on: bool = True,
        token_weight: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
        """Without ``token_weight`` each term is a mean over this batch's masked tokens. With it,
        each term is its sum over the masked tokens times ``token_weight``: the trainer passes
        (ranks x accumulation steps) / (masked tokens in the whole optimizer step), so the
        gradient is the mean over every masked token of the step however it is split into
        micro-batches and ranks (DeepSpeed divides by both)."""
        flat = labels.reshape(-1)
        positions = (flat != -100).nonzero().squeeze(1)
        targets = flat.index_select(0, positions)
        n = positions.numel()
        adv_on = alum_on and self.alum.enabled
        h0 = M.embed(self.mlm, input_ids)
        delta0 = first = None
        if adv_on and self.alum.fused_first_pass:
            doubled = torch.cat([positions, positions + flat.numel()])
            logits, delta0 = fused_first_pass(
                self.mlm, h0, self.alum, self.generator,
                lambda both: M.head_at(self.mlm, M.encode(self.mlm, both), doubled))
            clean, first = logits[:n], logits[n:]
        else:
            clean = M.head_at(self.mlm, M.encode(self.mlm, h0), positions)
        clean_target = Target.of(clean)  # log-softmax once: the MLM loss and both KLs use it
        mlm_loss = cross_entropy(clean, targets, clean_target)
        scale = 1.0 if token_weight is None else token_weight * n
        mlm_d = mlm_loss.detach()
        stats: dict[str, torch.Tensor | int] = {"mlm_loss": mlm_d, "masked_tokens": int(n),
                                                "mlm_sum": mlm_d * n}
        if not adv_on:
            return mlm_loss * scale, stats

        def perturbed(h: torch.Tensor) -> torch.Tensor:
            return M.head_at(self.mlm, M.encode(self.mlm, h), positions)

        adv = adversarial_loss(perturbed, h0, clean, self.alum, any_rank=self.any_rank,
                               generator=self.generator, delta0=delta0, first_logits=first,
                               clean_target=clean_target)
        if adv.skipped:
            self.skipped_total += 1
            if first is not None:
                # The fused graph holds the perturbed half, which may be what went non-finite:
                # backpropagating the MLM loss through it would still carry 0 * NaN into the
                # weight gradients. Rebuild the clean pass alone (on every rank: the skip is
                # collective); this costs a forward only on skipped steps.
                clean = M.head_at(self.mlm, M.encode(self.mlm, h0), positions)
                mlm_loss = cross_entropy(clean, targets)
                mlm_d = mlm_loss.detach()
                stats.update(mlm_loss=mlm_d, mlm_sum=mlm_d * n)
            loss = mlm_loss
        else:
            loss = mlm_loss + self.alum.alpha * adv.loss
        adv_d = adv.loss.detach()
        stats.update(
            adv_loss=adv_d,
            adv_sum=adv_d * n,
            delta_norm=adv.delta_norm,
            ascent_grad_norm=adv.grad_norm,
            adv_skipped=int(adv.skipped),
        )
        return loss * scale, stats
