"""Evaluation: the task's metrics (``finetune.metrics``) on a labelled set, and accuracy under
attack; the run's periodic and final evaluation (``Validator``).

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
from alum_ds.finetune.config import FinetuneConfig
from alum_ds.finetune.data import Encoded
from alum_ds.metrics import MetricsLogger


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


class Validator:
    """The periodic and final evaluation of a fine-tuning run, logged."""

    def __init__(self, engine: Any, cfg: FinetuneConfig, validation: Encoded,
                 extra: dict[str, Encoded], *, num_labels: int, pad_id: int, device: torch.device,
                 log: MetricsLogger, regression: bool = False) -> None:
        self.engine, self.cfg, self.validation, self.extra, self.log = engine, cfg, validation, extra, log
        self.regression = regression
        self.kw = dict(num_labels=num_labels, pad_id=pad_id, batch=cfg.eval.batch, device=device,
                       metrics=tuple(cfg.task.metrics or FM.defaults(cfg.task.type)), regression=regression)

    def run(self, step: int) -> dict[str, float]:
        ev = evaluate(self.engine, self.validation, **self.kw)
        self.log.log(step, {f"eval_{k}": v for k, v in ev.items()})
        self.log.message(f"eval at step {step}: {_scores(ev)}")
        return ev

    def final(self, step: int) -> dict[str, Any]:
        """The validation set (with the PGD attack, where set) and every adversarial set, logged."""
        steps = self.cfg.eval.pgd_steps
        # Robust accuracy needs classes: none for a regression task.
        radii = tuple(r for r in self.cfg.eval.robust_radius if r > 0) if steps and not self.regression \
            else ()
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
        flat.update({f"adversarial{i}_{k}": v for k, v in ev.items() if k != "examples"})
    return flat


def _scores(ev: dict[str, Any]) -> str:
    return ", ".join(f"{FM.NAMES.get(k, k)} {v:.4f}" for k, v in ev.items()
                     if k != "examples" and not k.startswith("robust_accuracy@"))


def _result_lines(results: dict[str, Any]) -> list[str]:
    v = results["validation"]
    line = f"validation ({v['examples']} examples): {_scores(v)}"
    for k, x in v.items():
        if k.startswith("robust_accuracy@"):
            line += f", robust accuracy (PGD-{results['pgd']['steps']}, radius {k.split('@')[1]}) {x:.4f}"
    lines = [line]
    for name, ev in results["adversarial"].items():
        lines.append(f"evaluation set {name} ({ev['examples']} examples): {_scores(ev)}")
    return lines
