"""The unigram line against hand-computed values on a hand-written data folder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from alum_ds.config import MaskingConfig
from alum_ds.data import shards as S
from alum_ds.data.stream import validation_batches
from alum_ds.data.unigram import eval_targets, token_counts, unigram_cross_entropy, unigram_line

# Vocabulary of 8: ids 0-3 special (<s> 0, <pad> 1, </s> 2, <mask> 3), 4-7 ordinary.
VOCAB = 8


def _folder(root: Path) -> Path:
    root.mkdir()
    dt = np.dtype(np.uint16)

    def shard(name: str, docs: list[list[int]]) -> dict:
        tokens = np.array([t for d in docs for t in d], dtype=dt)
        offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
        return S.write_shard(root, name, tokens, offsets)

    splits = {
        # Training tokens over two shards: 4 x3, 5 x1, 6 x1, 7 never (N = 5).
        "train": [shard("train-00000", [[4, 4], [5]]), shard("train-00001", [[4, 6]])],
        "validation": [shard("validation-00000", [[4, 7, 5], [4, 4, 6, 7, 5, 4]])],
    }
    S.write_manifest(root, {
        "tokenizer": {"dir": "tokenizer", "fingerprint": "0", "vocab_size": VOCAB, "bos_id": 0,
                      "eos_id": 2, "pad_id": 1, "mask_id": 3, "special_ids": [0, 1, 2, 3]},
        "dtype": dt.name, "splits": splits, "source": {},
    })
    return root


# Add-one smoothing over V = 8 with N = 5: p = (count + 1) / 13.
P = {4: 4 / 13, 5: 2 / 13, 6: 2 / 13, 7: 1 / 13}


def test_cross_entropy_by_hand() -> None:
    counts = np.array([0, 0, 0, 0, 3, 1, 1, 0])
    assert unigram_cross_entropy(counts, np.array([4, 7])) == pytest.approx(
        -(math.log(4 / 13) + math.log(1 / 13)) / 2, abs=1e-12)
    assert unigram_cross_entropy(counts, np.array([5])) == pytest.approx(math.log(13 / 2), abs=1e-12)
    assert math.isnan(unigram_cross_entropy(counts, np.array([], dtype=np.int64)))


def test_unigram_line_by_hand(tmp_path: Path) -> None:
    d = _folder(tmp_path / "data")
    assert token_counts(d).tolist() == [0, 0, 0, 0, 3, 1, 1, 0]
    # Every non-special token selected: with seq_len 8 (6 body tokens) the validation stream
    # 4 7 5 </s> 4 4 6 7 5 4 </s> gives one sequence, <s> 4 7 5 </s> 4 4 </s>, whose targets are
    # 4 7 5 4 4 (the rest of the stream fills no second sequence).
    masking = MaskingConfig(prob=0.999999)
    line = unigram_line(d, seq_len=8, seed=3, masking=masking, max_sequences=0)
    assert sorted(eval_targets(d, seq_len=8, seed=3, masking=masking).tolist()) == [4, 4, 4, 5, 7]
    assert line.eval_targets == 5
    assert line.eval_nats == pytest.approx(
        -(3 * math.log(P[4]) + math.log(P[7]) + math.log(P[5])) / 5, abs=1e-12)
    # All validation tokens: 4 x4, 5 x2, 6 x1, 7 x2.
    assert line.validation_tokens == 9
    assert line.validation_nats == pytest.approx(
        -(4 * math.log(P[4]) + 2 * math.log(P[5]) + math.log(P[6]) + 2 * math.log(P[7])) / 9, abs=1e-12)
    assert (line.train_tokens, line.vocab_size) == (5, VOCAB)


def test_eval_targets_are_the_evaluations_on_any_ranks(tmp_path: Path) -> None:
    """The targets equal the labels the evaluation scores, whatever its batch and ranks."""
    d = _folder(tmp_path / "data")
    masking = MaskingConfig()
    mine = np.sort(eval_targets(d, seq_len=8, seed=5, masking=masking, max_sequences=0))
    for world, batch in ((1, 1), (2, 1), (2, 3)):
        labels = [y[y != -100] for r in range(world)
                  for _, y in validation_batches(d, seq_len=8, seed=5, masking=masking, batch=batch,
                                                 rank=r, world=world)]
        assert np.array_equal(np.sort(np.concatenate(labels)), mine)
    assert mine.size >= 1
