"""Evaluation: accuracy and macro F1 on a labelled set, and accuracy under attack; the run's
periodic and final evaluation (``Validator``).

Each rank evaluates every ``world``-th example; confusion matrices and counts are summed over
ranks. Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively), the
short ones repeating a batch whose results they discard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alum_ds import distributed as D
from alum_ds.finetune.config import FinetuneConfig
from alum_ds.finetune.data import Encoded
from alum_ds.metrics import MetricsLogger


def macro_f1(confusion: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (scikit-learn's
    ``f1_score(average="macro")`` with its default label set). ``confusion[true, pred]``."""
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(1)
    predicted = confusion.sum(0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    f1 = 2 * tp / np.maximum(support + predicted, 1)
    return float(f1[present].mean())


def _rank_batches(n: int, batch: int, rank: int, world: int) -> list[np.ndarray]:
    mine = np.arange(rank, n, world)
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


def _max_over_ranks(k: int, device: torch.device) -> int:
    return int(D.all_reduce(torch.tensor([float(k)], device=device), "max").item())


def evaluate(engine: Any, data: Encoded, *, num_labels: int, pad_id: int, batch: int,
             device: torch.device, robust_radii: tuple[float, ...] = (), pgd_steps: int = 0,
             ) -> dict[str, float]:
    """``accuracy``, ``macro_f1``, ``examples`` and, per radius r, ``robust_accuracy@r``."""
    rank, world = D.rank(), D.world()
    batches = _rank_batches(len(data), batch, rank, world)
    n_max = _max_over_ranks(len(batches), device)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    robust = torch.zeros(len(robust_radii), dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    for i in range(n_max):
        real = i < len(batches)
        idx = batches[i] if real else (batches[0] if batches else np.arange(min(1, len(data))))
        batch = {k: torch.from_numpy(a).to(device) for k, a in data.batch(idx, pad_id).items()}
        y = batch["labels"]
        logits, _ = engine(**batch, mode="predict")
        if real:
            pred = logits.argmax(-1).cpu()
            np.add.at(confusion.numpy(), (y.cpu().numpy(), pred.numpy()), 1)
        for j, r in enumerate(robust_radii):
            correct, _ = engine(**batch, mode="robust", radius=r, steps=pgd_steps)
            if real:
                robust[j] += float(correct.sum())
    if was_training:
        engine.train()
    confusion = D.all_reduce(confusion.to(device), "sum").cpu().numpy()
    robust = D.all_reduce(robust.to(device), "sum").cpu().numpy()
    n = float(confusion.sum())
    out = {"examples": int(n), "accuracy": float(np.trace(confusion) / n) if n else float("nan"),
           "macro_f1": macro_f1(confusion)}
    for j, r in enumerate(robust_radii):
        out[f"robust_accuracy@{r:g}"] = float(robust[j] / n) if n else float("nan")
    return out


class Validator:
    """The periodic and final evaluation of a fine-tuning run, logged."""

    def __init__(self, engine: Any, cfg: FinetuneConfig, validation: Encoded,
                 extra: dict[str, Encoded], *, num_labels: int, pad_id: int, device: torch.device,
                 log: MetricsLogger) -> None:
        self.engine, self.cfg, self.validation, self.extra, self.log = engine, cfg, validation, extra, log
        self.kw = dict(num_labels=num_labels, pad_id=pad_id, batch=cfg.eval.batch, device=device)

    def run(self, step: int) -> dict[str, float]:
        ev = evaluate(self.engine, self.validation, **self.kw)
        self.log.log(step, {f"eval_{k}": v for k, v in ev.items()})
        self.log.message(f"eval at step {step}: accuracy {ev['accuracy']:.4f}, "
                         f"macro F1 {ev['macro_f1']:.4f}")
        return ev

    def final(self, step: int) -> dict[str, Any]:
        """The validation set (with the PGD attack, where set) and every adversarial set, logged."""
        steps = self.cfg.eval.pgd_steps
        radii = tuple(r for r in self.cfg.eval.robust_radius if r > 0) if steps else ()
        out: dict[str, Any] = {"validation": evaluate(self.engine, self.validation, robust_radii=radii,
                                                      pgd_steps=steps, **self.kw)}
        out["pgd"] = {"steps": steps, "radii": list(radii), "norm": "linf per element"}
        out["adversarial"] = {name: evaluate(self.engine, enc, **self.kw)
                              for name, enc in self.extra.items()}
        self.log.log(step, {f"eval_{k}": v for k, v in _flat(out).items()})
        for line in _result_lines(out):
            self.log.message(line)
        return out


def _flat(results: dict[str, Any]) -> dict[str, float]:
    flat = {k: v for k, v in results["validation"].items() if k != "examples"}
    for i, ev in enumerate(results["adversarial"].values()):
        flat[f"adversarial{i}_accuracy"] = ev["accuracy"]
    return flat


def _result_lines(results: dict[str, Any]) -> list[str]:
    v = results["validation"]
    line = (f"validation ({v['examples']} examples): accuracy {v['accuracy']:.4f}, "
            f"macro F1 {v['macro_f1']:.4f}")
    for k, x in v.items():
        if k.startswith("robust_accuracy@"):
            line += f", robust accuracy (PGD-{results['pgd']['steps']}, radius {k.split('@')[1]}) {x:.4f}"
    lines = [line]
    for name, ev in results["adversarial"].items():
        lines.append(f"adversarial set {name} ({ev['examples']} examples): accuracy {ev['accuracy']:.4f}, "
                     f"macro F1 {ev['macro_f1']:.4f}")
    return lines
