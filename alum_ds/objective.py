"""The training objective as one module: masked-LM loss plus ALUM's regulariser.

DeepSpeed wraps this module. Doing the whole ALUM computation inside its ``forward`` keeps the
ascent's ``torch.autograd.grad`` away from the engine's output hooks (a gradient taken through
``engine(...)``'s output runs ZeRO's reduction epilogue) and lets the trainer call
``engine.backward`` exactly once on the total loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import RobertaForMaskedLM

from alum_ds import model as M
from alum_ds.adversarial import adversarial_loss
from alum_ds.config import AlumConfig


class AlumObjective(nn.Module):
    """``forward(input_ids, labels, alum_on)`` returns ``(loss, stats)``.

    ``labels`` holds the original token at masked positions and -100 elsewhere. The LM head and
    every KL run at the masked positions only. ``any_rank`` (from the trainer) makes a skip of the
    adversarial term a collective decision; the model itself knows nothing of ranks.
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

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        alum_on: bool = True,
        token_weight: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Without ``token_weight`` each term is a mean over this batch's masked tokens. With it,
        each term is its sum over the masked tokens times ``token_weight``: the trainer passes
        (ranks x accumulation steps) / (masked tokens in the whole optimizer step), so the
        gradient is the mean over every masked token of the step however it is split into
        micro-batches and ranks (DeepSpeed divides by both)."""
        positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
        targets = labels.reshape(-1).index_select(0, positions)
        h0 = M.embed(self.mlm, input_ids)
        clean = M.head_at(self.mlm, M.encode(self.mlm, h0), positions)
        mlm_loss = F.cross_entropy(clean.float(), targets)
        n = positions.numel()
        scale = 1.0 if token_weight is None else token_weight * n
        stats = {"mlm_loss": float(mlm_loss.detach()), "masked_tokens": int(n),
                 "mlm_sum": float(mlm_loss.detach()) * n}
        if not (alum_on and self.alum.enabled):
            return mlm_loss * scale, stats

        def perturbed(h: torch.Tensor) -> torch.Tensor:
            return M.head_at(self.mlm, M.encode(self.mlm, h), positions)

        adv = adversarial_loss(perturbed, h0, clean, self.alum, any_rank=self.any_rank)
        if adv.skipped:
            self.skipped_total += 1
            loss = mlm_loss
        else:
            loss = mlm_loss + self.alum.alpha * adv.loss
        loss = loss * scale
        stats.update(
            adv_loss=float(adv.loss.detach()),
            adv_sum=float(adv.loss.detach()) * n,
            delta_norm=adv.delta_norm,
            ascent_grad_norm=adv.grad_norm,
            adv_skipped=int(adv.skipped),
        )
        return loss, stats
