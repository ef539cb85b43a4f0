"""The unigram line: what a model of token frequencies alone scores on the evaluation's targets.

A masked-LM whose eval loss sits at this line has learned the vocabulary's frequencies and no
context (fill-mask answers "the" everywhere). The frequencies are counted over the training
split's tokens and add-one smoothed over the whole vocabulary,
``p(t) = (count(t) + 1) / (N + V)``, and the line is the mean of ``-log p(t)`` (nats) over

- the targets ``evaluation.evaluate`` scores: the labels != -100 of ``validation_batches`` (the
  first ``eval.max_sequences`` packed validation sequences, masked as the evaluation masks them;
  the masks depend on the sequence index only, so this is the union over any number of ranks);
- for comparison, every non-special token of the validation split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alum_ds.config import MaskingConfig
from alum_ds.data.shards import open_split, read_manifest
from alum_ds.data.stream import validation_batches


def token_counts(data_dir: str | Path, split: str = "train") -> np.ndarray:
    """``[vocab_size]`` int64 counts of the tokens stored in ``split``'s shards (the documents'
    tokens; the ``<s>``/``</s>`` that packing adds are not stored and never targets)."""
    vocab = int(read_manifest(data_dir)["tokenizer"]["vocab_size"])
    counts = np.zeros(vocab, dtype=np.int64)
    for shard in open_split(data_dir, split):
        if shard.tokens.size:
            counts += np.bincount(shard.tokens, minlength=vocab)[:vocab]
    return counts


def unigram_log_probs(counts: np.ndarray) -> np.ndarray:
    """Add-one smoothed log-probabilities: ``log((count + 1) / (N + V))``, float64."""
    c = np.asarray(counts, dtype=np.float64)
    return np.log(c + 1.0) - np.log(c.sum() + c.size)


def unigram_cross_entropy(counts: np.ndarray, targets: np.ndarray) -> float:
    """Mean ``-log p(t)`` in nats over ``targets`` under the add-one smoothed unigram of
    ``counts``; NaN for no targets."""
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    if t.size == 0:
        return float("nan")
    return float(-unigram_log_probs(counts)[t].mean())


def eval_targets(data_dir: str | Path, *, seq_len: int, seed: int, masking: MaskingConfig,
                 max_sequences: int = 512) -> np.ndarray:
    """The token ids ``evaluation.evaluate`` scores (its ``data.seq_len``, ``data.seed``, masking and
    ``eval.max_sequences``), flat."""
    batches = validation_batches(data_dir, seq_len=seq_len, seed=seed, masking=masking, batch=256,
                                 rank=0, world=1, max_sequences=max_sequences)
    if not batches:
        return np.zeros(0, dtype=np.int64)
    labels = np.concatenate([y.reshape(-1) for _, y in batches])
    return labels[labels != -100]


@dataclass
class UnigramLine:
    eval_nats: float
    """Unigram cross-entropy over the evaluation's masked targets: compare eval_loss with it."""
    eval_targets: int
    validation_nats: float
    """Unigram cross-entropy over every non-special token of the validation split."""
    validation_tokens: int
    train_tokens: int
    vocab_size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unigram_line(data_dir: str | Path, *, seq_len: int, seed: int, masking: MaskingConfig,
                 max_sequences: int = 512) -> UnigramLine:
    """The unigram line of a prepared data folder for an evaluation of these settings (a run's
    ``data.seq_len``, ``data.seed``, ``masking`` and ``eval.max_sequences``)."""
    tok = read_manifest(data_dir)["tokenizer"]
    counts = token_counts(data_dir, "train")
    targets = eval_targets(data_dir, seq_len=seq_len, seed=seed, masking=masking,
                           max_sequences=max_sequences)
    special = np.asarray(tok["special_ids"], dtype=np.int64)
    val_counts = token_counts(data_dir, "validation")
    val_counts[special[special < val_counts.size]] = 0
    logp = unigram_log_probs(counts)
    n_val = int(val_counts.sum())
    val_nats = float(-(val_counts * logp).sum() / n_val) if n_val else float("nan")
    return UnigramLine(eval_nats=unigram_cross_entropy(counts, targets), eval_targets=int(targets.size),
                       validation_nats=val_nats, validation_tokens=n_val,
                       train_tokens=int(counts.sum()), vocab_size=int(counts.size))


__all__ = ["UnigramLine", "eval_targets", "token_counts", "unigram_cross_entropy", "unigram_line",
           "unigram_log_probs"]
