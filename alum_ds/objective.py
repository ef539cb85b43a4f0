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
from alum_ds.adversarial import Target, add_perturbation, adversarial_loss, init_delta, normalize, project
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
                 any_rank: Callable[[bool], bool] = lambda flag: flag, freeze_ascent: bool = False,
                 reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
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
        self.reduce_sum = reduce_sum
        """Sums a tensor over ranks (the runtime's all-reduce): keeps the perturbation table the
        same on every rank."""
        self.delta_table: torch.Tensor | None = None
        """``alum.perturbation=table``: one fp32 perturbation per token id [vocabulary, hidden],
        replicated on every rank (created at first use; ``extra_state``)."""

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

    def subset(self, b: Batch, seqs: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """The batch of sequences ``seqs`` (sorted indices) and the indices of its rows among
        ``b``'s rows (for ``alum.row_fraction``)."""
        raise ConfigError(f"alum.row_fraction below 1 is not supported for the {self.task} task")

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
        ab, ah, ac, at = b, h0, clean, clean_target  # what the adversarial passes see
        if self.alum.row_fraction < 1:
            ab, ah, ac, at, seqs = self._rows(b, h0, clean, clean_target)
            # The one statistic that is not a scalar: which sequences the adversarial passes ran
            # on (sorted indices into the micro-batch; the step window leaves it out).
            stats["adv_sequences"] = seqs
        steps = None
        if self.alum.perturbation == "table":
            delta0, steps = self._table_delta(ab, ah), 0
        adv = adversarial_loss(lambda h: self.logits(h, ab), ah, ac, self.alum,
                               any_rank=self.any_rank, generator=self.generator, delta0=delta0,
                               first_logits=first, clean_target=at,
                               ascent_f=self._frozen_logits(ab) if self.freeze_ascent else None,
                               ascent_steps=steps, divergence=self.divergence)
        stats["adv_rows"] = int(ac.shape[0])
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

    def _rows(self, b: Batch, h0: torch.Tensor, clean: torch.Tensor, target: Target):
        """``alum.row_fraction``: a random subset of the micro-batch's sequences (the global
        generator, seeded per micro-step), their embedding outputs, clean logits (live: the
        clean side of the symmetric KL still trains the clean pass) and targets."""
        n_seq = b.input_ids.shape[0]
        k = max(1, min(n_seq, round(self.alum.row_fraction * n_seq)))
        seqs = torch.randperm(n_seq, generator=self.generator, device="cpu")[:k].sort().values
        seqs = seqs.to(h0.device)
        sb, rows = self.subset(b, seqs)
        return (sb, h0.index_select(0, seqs), clean.index_select(0, rows),
                Target(target.logp.index_select(0, rows), target.p.index_select(0, rows)), seqs)

    def _table_delta(self, b: Batch, h: torch.Tensor) -> torch.Tensor:
        """``alum.perturbation=table``: delta_0 = the table's rows for the batch's token ids plus
        N(0, sigma^2), projected to the epsilon ball (``project`` rule), as a leaf whose gradient
        from the step's one backward updates the table (``_update_table``)."""
        cfg = self.alum
        if self.delta_table is None:
            self.delta_table = torch.zeros(self.model.config.vocab_size, h.shape[-1],
                                           dtype=torch.float32, device=h.device)
        ids = b.input_ids
        d = self.delta_table.index_select(0, ids.reshape(-1)).reshape(h.shape) + \
            init_delta(h, cfg.sigma, self.generator)
        if cfg.update == "project":
            d = project(d, cfg.epsilon, cfg.norm)
        d = d.requires_grad_(True)
        at = d.detach()  # not ``d`` itself: its hook would hold it in a reference cycle
        d.register_hook(lambda g: self._update_table(ids, at, g))
        return d

    def _update_table(self, ids: torch.Tensor, delta: torch.Tensor, g: torch.Tensor) -> None:
        """The free ascent step, in the final backward: each row moved by eta along its
        normalised gradient (``project``: back into the ball), then the table's row of a token id
        set to the mean over its occurrences in the micro-batch on every rank (summed over ranks,
        so the table stays replicated). A non-finite gradient leaves this rank's rows out.
        Called on every rank: the adversarial term's skip is collective."""
        cfg, table = self.alum, self.delta_table
        assert table is not None
        with torch.no_grad():
            finite = torch.isfinite(g).all()
            g = torch.where(finite, g, torch.zeros_like(g)).to(torch.float32)
            moved = delta + cfg.eta * normalize(g, cfg.norm)
            moved = project(moved, cfg.epsilon, cfg.norm) if cfg.update == "project" else \
                normalize(moved, cfg.norm)
            w = finite.to(torch.float32)
            flat = ids.reshape(-1)
            packed = torch.zeros(table.shape[0], table.shape[1] + 1, dtype=torch.float32, device=table.device)
            packed.index_add_(0, flat, torch.cat([moved.reshape(flat.numel(), -1) * w,
                                                  w.expand(flat.numel(), 1)], 1))
            packed = self.reduce_sum(packed)
            counts = packed[:, -1:]
            seen = counts > 0
            table.copy_(torch.where(seen, packed[:, :-1] / counts.clamp_min(1.0), table))
        return None

    def extra_state(self) -> dict[str, torch.Tensor]:
        """State that a checkpoint must keep beside the engine's: the perturbation table
        (replicated, so rank 0's copy is the state of every rank, on any number of ranks)."""
        return {} if self.delta_table is None else {"delta_table": self.delta_table.detach().cpu()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if "delta_table" in state:
            dev = next(self.model.parameters()).device
            self.delta_table = state["delta_table"].to(device=dev, dtype=torch.float32).clone()

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

    def smoothness(self, b: Batch, radii: tuple[float, ...], steps: int, seed: int = 0) -> torch.Tensor:
        """Held-out adversarial smoothness at each radius (``alum_ds.smoothness``), a [len(radii)]
        tensor of means over the batch's rows, with the run's ALUM norm and sigma; delta_0 drawn
        from a generator seeded with ``seed``, so the measure is a function of model and batch.
        Call in eval mode (dropout off)."""
        from alum_ds.smoothness import adversarial_smoothness

        with torch.no_grad():
            h0 = self.embed(b)
        keep = None if b.attention_mask is None else b.attention_mask.unsqueeze(-1).to(torch.float32)
        out = []
        for r in radii:
            g = torch.Generator(device=h0.device).manual_seed(seed)
            out.append(adversarial_smoothness(lambda h: self.logits(h, b), h0, radius=r, steps=steps,
                                              norm=self.alum.norm, sigma=self.alum.sigma,
                                              generator=g, keep=keep))
        return torch.stack(out) if out else torch.zeros(0, device=h0.device)

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
    PGD iterate (``pgd``), a [steps + 1] tensor, for robustness evaluation; ``mode="adv_kl"``
    the adversarial smoothness at each of ``radii`` (``smoothness``), means over the masked
    tokens, a [len(radii)] tensor."""

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

    def subset(self, b: Batch, seqs: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        n_seq, t = b.input_ids.shape
        seq_of = b.positions // t
        keep = torch.zeros(n_seq, dtype=torch.bool, device=seqs.device)
        keep[seqs] = True
        rows = keep[seq_of].nonzero().squeeze(1)
        new_index = torch.full((n_seq,), -1, dtype=torch.long, device=seqs.device)
        new_index[seqs] = torch.arange(seqs.numel(), device=seqs.device)
        picked = b.positions.index_select(0, rows)
        positions = new_index[picked // t] * t + picked % t
        return Batch(b.input_ids.index_select(0, seqs), b.targets.index_select(0, rows),
                     positions=positions), rows

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, alum_on: bool = True,
                token_weight: float | None = None, *, mode: str = "train", radius: float = 0.0,
                steps: int = 0, radii: tuple[float, ...] = (),
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor | int]]:
        b = self.batch(input_ids, labels)
        if mode == "train":
            return self.loss(b, alum_on=alum_on, token_weight=token_weight)
        if mode == "pgd":
            sums = [F.cross_entropy(z.float(), b.targets, reduction="sum")
                    for z in self.pgd(b, radius, steps)]
            return torch.stack(sums), {"rows": int(b.targets.numel())}
        if mode == "adv_kl":
            return self.smoothness(b, tuple(radii), steps), {"rows": int(b.targets.numel())}
        raise ValueError(f"unknown mode {mode!r}")
