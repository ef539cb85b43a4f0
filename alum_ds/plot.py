"""``alum-ds plot RUN_DIR``: loss, learning-rate and throughput curves from ``metrics.jsonl``.

matplotlib is an optional extra (``pip install 'alum_ds[plot]'``), imported only here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alum_ds import records
from alum_ds.config import ConfigError


def read_metrics(run_dir: str | Path) -> tuple[dict[int, dict[str, Any]], dict[int, float], float | None]:
    """(training record per step, eval loss per step, the unigram line or None); a step logged
    twice (a resumed run that repeated it) keeps its last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (is {run_dir} a run folder?)")
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    unigram = None
    for line in path.read_text().splitlines():
        try:
            rec = records.loads(line)  # a skipped step's null loss is NaN again
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
        if "loss" in rec:
            train[int(rec["step"])] = rec
        if "eval_loss" in rec:
            evals[int(rec["step"])] = float(rec["eval_loss"])
        if rec.get("unigram_loss") is not None:
            unigram = float(rec["unigram_loss"])
    return train, evals, unigram


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves to ``out`` (default RUN_DIR/curves.png) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("alum-ds plot needs matplotlib: pip install 'alum_ds[plot]'") from None
    train, evals, unigram = read_metrics(run_dir)
    if not train:
        raise ConfigError(f"{Path(run_dir) / 'metrics.jsonl'} holds no training steps yet")
    steps = sorted(train)
    fig, (ax_loss, ax_lr, ax_tps) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    ax_loss.plot(steps, [train[s]["loss"] for s in steps], label="loss (MLM + alpha x adv)")
    ax_loss.plot(steps, [train[s]["mlm_loss"] for s in steps], label="masked-LM loss")
    if evals:
        es = sorted(evals)
        ax_loss.plot(es, [evals[s] for s in es], "o-", label="eval masked-LM loss")
    if unigram is not None and unigram == unigram:
        ax_loss.axhline(unigram, color="grey", linestyle="--",
                        label=f"unigram line {unigram:.2f} (token frequencies alone)")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_lr.plot(steps, [train[s]["lr"] for s in steps])
    ax_lr.set_ylabel("learning rate")
    ax_tps.plot(steps, [train[s]["tokens_per_s"] for s in steps])
    ax_tps.set_ylabel("tokens / s")
    ax_tps.set_xlabel("optimizer step")
    for ax in (ax_loss, ax_lr, ax_tps):
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
