"""The fine-tuning objective as one module: cross-entropy plus ALUM's regulariser on the
classifier's output distribution, and the evaluation passes (clean and PGD-perturbed).

As in pretraining (``alum_ds/objective.py``) DeepSpeed wraps this module and every gradient
taken with respect to the perturbation (the ALUM ascent, the PGD attack) happens inside its
``forward``; the trainer calls ``engine.backward`` once on the total loss. The perturbation is
added to the embedding layer's output (``alum_ds.model.embed``) and the sum goes straight into the
encoder. Batches are padded, so the encoder gets the attention mask RobertaModel would build
(``create_bidirectional_mask``; padded keys masked out); packed pretraining needs none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import RobertaForSequenceClassification
from transformers.masking_utils import create_bidirectional_mask

from alum_ds import model as M
from alum_ds.adversarial import add_perturbation, adversarial_loss
from alum_ds.config import AlumConfig
from alum_ds.objective import fused_first_pass


def classify(model: RobertaForSequenceClassification, hidden: torch.Tensor,
             attention_mask: torch.Tensor) -> torch.Tensor:
    """Classifier logits [B, C] from an embedding output [B, T, H] and a 0/1 padding mask."""
    mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                     attention_mask=attention_mask)
    seq = model.roberta.encoder(hidden, attention_mask=mask).last_hidden_state
    return model.classifier(seq)


class ClassifierObjective(nn.Module):
    """``forward(input_ids, attention_mask, labels, mode=...)``:

    - ``"train"``: ``(loss, stats)``; the loss is the mean cross-entropy plus
      ``alpha * symKL(p, p_adv)`` (each KL summed over classes, averaged over examples) when
      ``alum_on``.
    - ``"predict"``: ``(logits, {})`` without gradients.
    - ``"robust"``: ``(correct, {})``, a bool per example: right on the clean input and at every
      iterate of an L-inf PGD attack of per-element ``radius`` on the embedding output
      (``steps`` signed-gradient steps of 2.5 * radius / steps maximising the cross-entropy with
      the true label; padded positions are not perturbed).
    """

    def __init__(self, model: RobertaForSequenceClassification, alum: AlumConfig, *,
                 any_rank: Callable[[bool], bool] = lambda flag: flag) -> None:
        super().__init__()
        self.model = model
        self.alum = alum
        self.any_rank = any_rank
        self.skipped_total = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                mode: str = "train", alum_on: bool = True, radius: float = 0.0,
                steps: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if mode == "predict":
            with torch.no_grad():
                return classify(self.model, M.embed(self.model, input_ids), attention_mask), {}
        if mode == "robust":
            return self._robust_correct(input_ids, attention_mask, labels, radius, steps), {}
        if mode != "train":
            raise ValueError(f"unknown mode {mode!r}")
        adv_on = alum_on and self.alum.enabled and self.alum.alpha > 0
        h0 = M.embed(self.model, input_ids)
        delta0 = first = None
        if adv_on and getattr(self.alum, "fused_first_pass", False):
            doubled_mask = torch.cat([attention_mask, attention_mask])
            logits, delta0 = fused_first_pass(
                self.model, h0, self.alum, None,
                lambda both: classify(self.model, both, doubled_mask))
            clean, first = logits[: len(labels)], logits[len(labels):]
        else:
            clean = classify(self.model, h0, attention_mask)
        ce = F.cross_entropy(clean.float(), labels)
        # Detached 0-dim tensors: the trainer reads them once per logging window (no host sync).
        stats: dict[str, torch.Tensor] = {
            "ce_loss": ce.detach(),
            "train_correct": (clean.detach().argmax(-1) == labels).sum().float(),
        }
        if not adv_on:
            return ce, stats

        def perturbed(h: torch.Tensor) -> torch.Tensor:
            return classify(self.model, h, attention_mask)

        kw = {"delta0": delta0, "first_logits": first} if delta0 is not None else {}
        adv = adversarial_loss(perturbed, h0, clean, self.alum, any_rank=self.any_rank, **kw)
        if adv.skipped:
            self.skipped_total += 1
            if first is not None:
                # As in pretraining: the fused graph holds the perturbed half, which may be what
                # went non-finite; rebuild the clean pass alone so 0 * NaN cannot reach weights.
                clean = classify(self.model, h0, attention_mask)
                ce = F.cross_entropy(clean.float(), labels)
                stats["ce_loss"] = ce.detach()
            loss = ce
        else:
            loss = ce + self.alum.alpha * adv.loss
        stats.update(adv_loss=torch.as_tensor(adv.loss).detach().float(),
                     delta_norm=torch.as_tensor(adv.delta_norm).float(),
                     adv_skipped=torch.as_tensor(float(adv.skipped)))
        return loss, stats

    def _robust_correct(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor, radius: float, steps: int) -> torch.Tensor:
        with torch.no_grad():
            h0 = M.embed(self.model, input_ids)
            correct = classify(self.model, h0, attention_mask).argmax(-1) == labels
        if radius <= 0 or steps <= 0:
            return correct
        keep = attention_mask.unsqueeze(-1).float()
        delta = torch.zeros(h0.shape, dtype=torch.float32, device=h0.device)
        size = 2.5 * radius / steps
        for i in range(steps + 1):
            with torch.enable_grad():
                delta.requires_grad_(i < steps)
                logits = classify(self.model, add_perturbation(h0, delta * keep), attention_mask)
                if i < steps:
                    loss = F.cross_entropy(logits.float(), labels, reduction="sum")
                    (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                correct &= logits.argmax(-1) == labels
                if i < steps:
                    delta = ((delta + size * g.sign()).clamp(-radius, radius) * keep).detach()
        return correct
