"""Training objectives as modules: a task loss plus ALUM's regulariser (docs/ALUM.md).

``AdversarialObjective`` owns what every task shares: the clean pass, the perturbation δ and its
ascent (``alum_ds.adversarial``), the fused first pass, the non-finite and precision guards, the
statistics, and the PGD attack used by robustness evaluation. A task says only how a batch is
embedded (``embed``), which logits it is judged on from an embedding output (``logits``: the MLM
head at the masked positions, or the classifier), and what the fused first pass's doubled batch
looks like (``doubled``). ``AlumObjective`` is masked-LM pretraining; fine-tuning's classifier
objective is in ``alum_ds.finetune.objective``.

DeepSpeed wraps the objective. Doing the whole ALUM computation inside its ``forward`` keeps the
ascent's ``torch.autograd.grad`` away from the engine's output hooks (a gradient taken through
``engine(...)``'s output runs ZeRO's reduction epilogue) and lets the trainer call
``engine.backward`` exactly once on the total loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from alum_ds import model as M
from alum_ds.adversarial import Target, add_perturbation, adversarial_loss, init_delta
from alum_ds.compiling import frozen
from alum_ds.config import AlumConfig, ConfigError
from alum_ds.distributed import zero3_partitioned


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


@dataclass(frozen=True)
class Batch:
    """One micro-batch as the objective sees it. ``targets`` are the classes the task's logits
    are judged on, one per row of ``logits`` (masked tokens, or examples)."""

    input_ids: torch.Tensor
    targets: torch.Tensor
    attention_mask: torch.Tensor | None = None
    """0/1 padding mask [B, T]; None for packed sequences (nothing padded)."""
    token_type_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    """Flat indices of the rows the MLM head runs on (the masked positions)."""


class AdversarialObjective(nn.Module):
    """Cross-entropy of the task plus ``alpha * symKL(p, p_adv)`` on the task's output
    distribution (each KL summed over classes, averaged over rows), for any task defined by the
    hooks ``embed``, ``logits`` and ``doubled``.

    ``any_rank`` (from the runtime) makes a skip of the adversarial term a collective decision;
    the model itself knows nothing of ranks. Statistics are detached 0-dim tensors on the model's
    device (``rows`` and ``adv_skipped`` are ints, known on the host anyway), so building them
    costs no host sync; ``metrics.StepWindow`` sums them.
    """

    task = "task"
    """The task loss's name in the statistics (``{task}_loss``)."""
    divergence = "kl"
    """How the regulariser compares outputs (``adversarial.adversarial_loss``): ``"kl"`` for
    distributions, ``"squared"`` for a real-valued (regression) output."""

    def __init__(self, model: nn.Module, alum: AlumConfig, *,
                 any_rank: Callable[[bool], bool] = lambda flag: flag, freeze_ascent: bool = False) -> None:
        super().__init__()
        self.model = model
        self.alum = alum
        self.any_rank = any_rank
        self.freeze_ascent = freeze_ascent
        """Run the ascent's passes with frozen parameters (``compiling.frozen``): for compiled
        models, whose backward would otherwise compute every weight gradient. Not with activation
        checkpointing, whose recomputation (with parameters live again) must save what the
        forward saved."""
        self.skipped_total = 0
        self.generator: torch.Generator | None = None
        """Source of delta_0's noise (None: torch's global generator, seeded per micro-step)."""

    # -- the task's hooks ----------------------------------------------------------------------

    def embed(self, b: Batch) -> torch.Tensor:
        """h0, the embedding output where δ is added."""
        return M.embed(self.model, b.input_ids, b.token_type_ids, b.attention_mask)

    def logits(self, h: torch.Tensor, b: Batch) -> torch.Tensor:
        """The task's logits [rows, classes] from an embedding output ``h``."""
        raise NotImplementedError

    def doubled(self, b: Batch) -> Batch:
        """``b`` as the fused first pass sees it: the embedding output is ``[h0; h0 + delta_0]``."""
        raise NotImplementedError

    def task_stats(self, clean: torch.Tensor, b: Batch) -> dict[str, torch.Tensor]:
        """Extra statistics of the clean logits (summed by the step window)."""
        return {}

    def task_loss(self, clean: torch.Tensor, b: Batch, target: Target | None) -> torch.Tensor:
        """The task's loss, a mean over rows (``target``: ``Target.of(clean)`` when the
        divergence is the KL, else None): cross-entropy."""
        return cross_entropy(clean, b.targets, target)

    # -- shared ---------------------------------------------------------------------------------

    def loss(self, b: Batch, *, alum_on: bool = True, token_weight: float | None = None,
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
        """``(loss, stats)``. Without ``token_weight`` each term is a mean over the batch's rows.
        With it, each term is its sum over the rows times ``token_weight``: the trainer passes
        (ranks x accumulation steps) / (rows in the whole optimizer step), so the gradient is the
        mean over every row of the step however it is split into micro-batches and ranks
        (DeepSpeed divides by both)."""
        n = int(b.targets.numel())
        adv_on = alum_on and self.alum.enabled
        h0 = self.embed(b)
        delta0 = first = None
        if adv_on and self.alum.fused_first_pass:
            logits, delta0 = self._fused_first_pass(h0, b)
            clean, first = logits[:n], logits[n:]
        else:
            clean = self.logits(h0, b)
        # log-softmax once: the task loss and both KLs use it
        clean_target = Target.of(clean) if self.divergence == "kl" else None
        task_loss = self.task_loss(clean, b, clean_target)
        scale = 1.0 if token_weight is None else token_weight * n
        stats: dict[str, torch.Tensor | int] = {"rows": n, **self.task_stats(clean, b)}
        self._task_stats(stats, task_loss, n)
        if not adv_on:
            return task_loss * scale, stats
        adv = adversarial_loss(lambda h: self.logits(h, b), h0, clean, self.alum,
                               any_rank=self.any_rank, generator=self.generator, delta0=delta0,
                               first_logits=first, clean_target=clean_target,
                               ascent_f=self._frozen_logits(b) if self.freeze_ascent else None,
                               divergence=self.divergence)
        if adv.skipped:
            self.skipped_total += 1
            if first is not None:
                # The fused graph holds the perturbed half, which may be what went non-finite:
                # backpropagating the task loss through it would still carry 0 * NaN into the
                # weight gradients. Rebuild the clean pass alone (on every rank: the skip is
                # collective); this costs a forward only on skipped steps.
                task_loss = self.task_loss(self.logits(h0, b), b, None)
                self._task_stats(stats, task_loss, n)
            loss = task_loss
        else:
            loss = task_loss + self.alum.alpha * adv.loss
        adv_d = adv.loss.detach()
        stats.update(adv_loss=adv_d, adv_sum=adv_d * n, delta_norm=adv.delta_norm,
                     ascent_grad_norm=adv.grad_norm, adv_skipped=int(adv.skipped))
        return loss * scale, stats

    def _frozen_logits(self, b: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(h: torch.Tensor) -> torch.Tensor:
            with frozen(self.model):
                return self.logits(h, b)

        return run

    def _task_stats(self, stats: dict[str, torch.Tensor | int], task_loss: torch.Tensor, n: int) -> None:
        d = task_loss.detach()
        stats.update({f"{self.task}_loss": d, "task_sum": d * n})

    def _fused_first_pass(self, h0: torch.Tensor, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean pass and the first perturbed pass as one forward over ``[h0; h0 + delta_0]``
        (``alum.fused_first_pass``): the logits of the doubled batch and ``delta_0``.

        Refused under ZeRO-3: the fused graph is backpropagated twice (the ascent, then the final
        backward) while ZeRO-3 gathers a module's parameters for backward once per forward and
        releases them after the first traversal, so the second finds them partitioned."""
        if zero3_partitioned(self.model):
            raise ConfigError(
                "alum.fused_first_pass=true does not work under ZeRO-3 (its graph is "
                "backpropagated twice and ZeRO-3 re-gathers parameters only once per forward): "
                "use ZeRO-0/1/2 or --alum.fused_first_pass=false (the same loss, unfused)"
            )
        delta0 = init_delta(h0, self.alum.sigma, self.generator).requires_grad_()
        both = torch.cat([h0, add_perturbation(h0.detach(), delta0)])
        return self.logits(both, self.doubled(b)), delta0

    def pgd(self, b: Batch, radius: float, steps: int) -> Iterator[torch.Tensor]:
        """The task's logits (detached) at the clean input, then at each iterate of an L-inf PGD
        attack on the embedding output: ``steps`` signed-gradient steps of ``2.5 * radius /
        steps`` maximising the cross-entropy with the targets, projected to per-element
        ``radius``; padded positions are not perturbed. ``radius`` or ``steps`` 0: the clean
        logits only. Call in eval mode (dropout off) for a deterministic attack."""
        with torch.no_grad():
            h0 = self.embed(b)
        keep = None if b.attention_mask is None else b.attention_mask.unsqueeze(-1).to(torch.float32)
        delta = torch.zeros(h0.shape, dtype=torch.float32, device=h0.device)
        steps = steps if radius > 0 else 0
        size = 2.5 * radius / max(steps, 1)
        for i in range(steps + 1):
            with torch.enable_grad():
                delta.requires_grad_(i < steps)
                logits = self.logits(add_perturbation(h0, delta if keep is None else delta * keep), b)
                if i < steps:
                    loss = F.cross_entropy(logits.float(), b.targets, reduction="sum")
                    (g,) = torch.autograd.grad(loss, delta)
            yield logits.detach()
            if i < steps:
                with torch.no_grad():
                    delta = (delta + size * g.sign()).clamp(-radius, radius)
                    delta = delta if keep is None else delta * keep


class AlumObjective(AdversarialObjective):
    """Masked-LM pretraining: ``forward(input_ids, labels, alum_on, token_weight)`` returns
    ``(loss, stats)``. ``labels`` holds the original token at masked positions and -100
    elsewhere; the LM head and every KL run at the masked positions only (``rows`` = masked
    tokens). ``mode="pgd"`` returns the summed MLM cross-entropy at the clean input and at each
    PGD iterate (``pgd``), a [steps + 1] tensor, for robustness evaluation."""

    task = "mlm"

    @property
    def mlm(self) -> nn.Module:
        return self.model

    @staticmethod
    def batch(input_ids: torch.Tensor, labels: torch.Tensor) -> Batch:
        flat = labels.reshape(-1)
        positions = (flat != -100).nonzero().squeeze(1)
        return Batch(input_ids, flat.index_select(0, positions), positions=positions)

    def logits(self, h: torch.Tensor, b: Batch) -> torch.Tensor:
        return M.head_at(self.model, M.encode(self.model, h), b.positions)

    def doubled(self, b: Batch) -> Batch:
        return replace(b, positions=torch.cat([b.positions, b.positions + b.input_ids.numel()]))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, alum_on: bool = True,
                token_weight: float | None = None, *, mode: str = "train", radius: float = 0.0,
                steps: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
        b = self.batch(input_ids, labels)
        if mode == "train":
            return self.loss(b, alum_on=alum_on, token_weight=token_weight)
        if mode == "pgd":
            sums = [F.cross_entropy(z.float(), b.targets, reduction="sum")
                    for z in self.pgd(b, radius, steps)]
            return torch.stack(sums), {"rows": int(b.targets.numel())}
        raise ValueError(f"unknown mode {mode!r}")
