"""Fine-tuning's objective: the task is the classifier's output distribution.

Everything adversarial (clean pass, δ on the embedding output, ascent, guards, statistics, PGD)
is ``alum_ds.objective.AdversarialObjective``'s; this module says only how a padded batch of
examples is classified from an embedding output. Batches are padded to their longest example, so
the encoder gets the attention mask the stock model would build from the padding mask.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from alum_ds import model as M
from alum_ds.adversarial import Target
from alum_ds.objective import AdversarialObjective, Batch


def classify(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Classifier logits [B, C] from an embedding output [B, T, H] and a 0/1 padding mask."""
    return M.classify(model, M.encode(model, hidden, attention_mask), attention_mask)


class ClassifierObjective(AdversarialObjective):
    """``forward(input_ids, attention_mask, labels, mode=...)``:

    - ``"train"``: ``(loss, stats)``; the loss is the mean cross-entropy plus
      ``alpha * symKL(p, p_adv)`` (each KL summed over classes, averaged over examples) when
      ``alum_on``. ``stats`` adds ``correct`` (examples classified right).
    - ``"predict"``: ``(logits, {})`` without gradients.
    - ``"robust"``: ``(correct, {})``, a bool per example: right on the clean input and at every
      iterate of the L-inf PGD attack of per-element ``radius`` (``AdversarialObjective.pgd``).
    """

    task = "ce"

    def logits(self, h: torch.Tensor, b: Batch) -> torch.Tensor:
        return classify(self.model, h, b.attention_mask)

    def doubled(self, b: Batch) -> Batch:
        return replace(b, attention_mask=torch.cat([b.attention_mask, b.attention_mask]))

    def task_stats(self, clean: torch.Tensor, b: Batch) -> dict[str, torch.Tensor]:
        return {"correct": (clean.detach().argmax(-1) == b.targets).sum().float()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, *, mode: str = "train",
                alum_on: bool = True, radius: float = 0.0, steps: int = 0,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
        b = Batch(input_ids, labels, attention_mask=attention_mask, token_type_ids=token_type_ids)
        if mode == "train":  # alpha 0 is plain fine-tuning, without the regulariser's passes
            return self.loss(b, alum_on=alum_on and self.alum.alpha > 0)
        if mode == "predict":
            with torch.no_grad():
                return self.logits(self.embed(b), b), {}
        if mode == "robust":
            correct = None
            for logits in self.pgd(b, radius, steps):
                ok = logits.argmax(-1) == labels
                correct = ok if correct is None else correct & ok
            return correct, {}
        raise ValueError(f"unknown mode {mode!r}")


class RegressionObjective(ClassifierObjective):
    """One real-valued output per example (STS-B style; the model's ``num_labels`` is 1). The
    loss is the mean squared error, plus ``alpha`` times the squared difference of the clean and
    perturbed outputs when ``alum_on``: a single output is no distribution, so the symmetric KL
    gives way to the squared difference, SMART's and MT-DNN's regulariser for regression
    (docs/ALUM.md, "Fine-tuning"). ``"predict"`` returns the outputs [B, 1]; there is no
    ``"robust"`` mode (robust accuracy needs classes)."""

    task = "mse"
    divergence = "squared"

    def task_loss(self, clean: torch.Tensor, b: Batch, target: Target | None) -> torch.Tensor:
        return F.mse_loss(clean[:, 0].float(), b.targets.float())

    def task_stats(self, clean: torch.Tensor, b: Batch) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, *, mode: str = "train",
                alum_on: bool = True, radius: float = 0.0, steps: int = 0,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
        if mode == "robust":
            raise ValueError("robust accuracy needs a classification task")
        return super().forward(input_ids, attention_mask, labels, token_type_ids, mode=mode,
                               alum_on=alum_on, radius=radius, steps=steps)
