"""Evaluation: the task's metrics (``finetune.metrics``) on a labelled set, and accuracy under
attack.

Each rank evaluates every ``world``-th example; the predictions (each example's written by the
one rank that evaluated it) and the attack's counts are summed over ranks, so every rank holds
every prediction and computes the same metrics. Every rank runs the same number of forwards
(ZeRO-3 gathers parameters collectively), the short ones repeating a batch whose results they
discard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from alum_ds import distributed as D
from alum_ds.finetune import metrics as FM
from alum_ds.finetune.data import Encoded


def macro_f1(confusion: np.ndarray) -> float:
    """Macro F1 from ``confusion[true, pred]`` (``metrics.macro_f1_from_confusion``)."""
    return FM.macro_f1_from_confusion(confusion)


def _rank_batches(n: int, batch: int, rank: int, world: int) -> list[np.ndarray]:
    mine = np.arange(rank, n, world)
    return [mine[i : i + batch] for i in range(0, len(mine), batch)]


def _max_over_ranks(k: int, device: torch.device) -> int:
    return int(D.all_reduce(torch.tensor([float(k)], device=device), "max").item())


def evaluate(engine: Any, data: Encoded, *, num_labels: int, pad_id: int, batch: int,
             device: torch.device, robust_radii: tuple[float, ...] = (), pgd_steps: int = 0,
             metrics: tuple[str, ...] = (), regression: bool = False) -> dict[str, float]:
    """``examples``, then for classification ``accuracy``, ``macro_f1`` and, per radius r,
    ``robust_accuracy@r``; for regression ``mse``; and each of ``metrics``."""
    rank, world = D.rank(), D.world()
    batches = _rank_batches(len(data), batch, rank, world)
    n_max = _max_over_ranks(len(batches), device)
    preds = torch.zeros(len(data), dtype=torch.float64)
    robust = torch.zeros(len(robust_radii), dtype=torch.float64)
    was_training = engine.training
    engine.eval()
    for i in range(n_max):
        real = i < len(batches)
        idx = batches[i] if real else (batches[0] if batches else np.arange(min(1, len(data))))
        batch = {k: torch.from_numpy(a).to(device) for k, a in data.batch(idx, pad_id).items()}
        logits, _ = engine(**batch, mode="predict")
        if real:
            out = logits[:, 0] if regression else logits.argmax(-1)
            preds[torch.from_numpy(idx)] = out.double().cpu()
        for j, r in enumerate(robust_radii):
            correct, _ = engine(**batch, mode="robust", radius=r, steps=pgd_steps)
            if real:
                robust[j] += float(correct.sum())
    if was_training:
        engine.train()
    pred = D.all_reduce(preds.to(device), "sum").cpu().numpy()
    robust = D.all_reduce(robust.to(device), "sum").cpu().numpy()
    n = len(data)
    y = data.labels
    res: dict[str, float] = {"examples": n}
    if regression:
        res["mse"] = FM.mse(y, pred)
    else:
        pred = pred.round().astype(np.int64)
        c = FM.confusion(y, pred, num_labels)
        res.update(accuracy=float(np.trace(c) / n) if n else float("nan"), macro_f1=macro_f1(c))
        for j, r in enumerate(robust_radii):
            res[f"robust_accuracy@{r:g}"] = float(robust[j] / n) if n else float("nan")
    res.update(FM.compute(metrics, y, pred))
    return res
