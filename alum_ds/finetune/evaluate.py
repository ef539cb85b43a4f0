"""Evaluation: accuracy and macro F1 on a labelled set, and accuracy under attack.

Each rank evaluates every ``world``-th example; confusion matrices and counts are summed over
ranks. Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively), the
short ones repeating a batch whose results they discard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alum_ds import distributed as D
from alum_ds.finetune.data import Encoded


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
