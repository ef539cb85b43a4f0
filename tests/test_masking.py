"""Pins ``alum_ds.data.masking``: 15 % selection with 80/10/10 replacement, masks that are a pure
function of (seed, epoch, sequence), never a special token, at least one label per sequence, and
whole-word masking."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alum_ds.config import MaskingConfig
from alum_ds.data.masking import mask_batch
from alum_ds.data.shards import read_manifest
from tests._data_helpers import SEED, SEQ_LEN, _stream, _unmask


def test_masking_statistics(data_dir: Path) -> None:
    s = _stream(data_dir)
    n = len(s.seqs)
    inputs, labels = s.batch_at(0, n)
    tokens = s.seqs.get(s.order(0))
    np.testing.assert_array_equal(_unmask(inputs, labels), tokens)
    special = s.special
    candidate = ~np.isin(tokens, special)
    selected = labels != -100
    assert not (selected & ~candidate).any()
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])
    assert selected.any(axis=1).all()

    frac = selected.sum() / candidate.sum()
    assert abs(frac - 0.15) < 0.01, frac
    sel_in = inputs[selected]
    masked = sel_in == s.mask_id
    kept = sel_in == labels[selected]
    rand = ~masked & ~kept
    k = selected.sum()
    assert abs(masked.sum() / k - 0.8) < 0.03
    assert abs(rand.sum() / k - 0.1) < 0.03
    assert abs(kept.sum() / k - 0.1) < 0.03
    assert not np.isin(sel_in[rand], special).any()
    assert sel_in[rand].min() >= 0 and sel_in[rand].max() < s.vocab_size


def test_masking_is_a_function_of_seed_epoch_and_sequence(data_dir: Path) -> None:
    s = _stream(data_dir)
    ids = np.arange(40, dtype=np.int64)
    tokens = s.seqs.get(ids)
    kw = dict(seed=SEED, cfg=MaskingConfig(), special_ids=s.special, mask_id=s.mask_id,
              vocab_size=s.vocab_size)
    a = mask_batch(tokens, ids, epoch=0, **kw)
    b = mask_batch(tokens.copy(), ids.copy(), epoch=0, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # Independent of the batch a sequence is drawn in.
    perm = np.random.default_rng(1).permutation(ids.size)
    c = mask_batch(tokens[perm], ids[perm], epoch=0, **kw)
    np.testing.assert_array_equal(c[0], a[0][perm])
    np.testing.assert_array_equal(c[1], a[1][perm])
    sub = mask_batch(tokens[7:9], ids[7:9], epoch=0, **kw)
    np.testing.assert_array_equal(sub[1], a[1][7:9])
    # Another epoch or seed masks differently.
    for other in (mask_batch(tokens, ids, epoch=1, **kw),
                  mask_batch(tokens, ids, epoch=0, **{**kw, "seed": SEED + 1})):
        assert not np.array_equal(other[1] != -100, a[1] != -100)


def test_masking_never_selects_specials_and_always_labels(data_dir: Path) -> None:
    s = _stream(data_dir)
    m = read_manifest(data_dir)["tokenizer"]
    bos, eos, pad = m["bos_id"], m["eos_id"], m["pad_id"]
    ids = np.arange(300, dtype=np.int64)
    tokens = s.seqs.get(ids)
    tokens[:, SEQ_LEN // 2 : -1] = pad  # padded tails
    tokens[::3, 5] = eos
    tokens[1::3, 6] = bos
    tokens[:, 1] = m["mask_id"]
    kw = dict(epoch=0, seed=SEED, special_ids=s.special, mask_id=s.mask_id, vocab_size=s.vocab_size)
    is_special = np.isin(tokens, s.special)
    for cfg in (MaskingConfig(), MaskingConfig(prob=0.001), MaskingConfig(prob=0.9)):
        inputs, labels = mask_batch(tokens, ids, cfg=cfg, **kw)
        assert (labels[is_special] == -100).all()
        np.testing.assert_array_equal(inputs[is_special], tokens[is_special])
        per_seq = (labels != -100).sum(axis=1)
        assert (per_seq >= 1).all()
        if cfg.prob < 0.01:  # the guaranteed label is nearly all there is
            assert per_seq.mean() < 1.2


def test_word_start_table() -> None:
    from alum_ds.data.masking import word_start_table

    vocab = {"<s>": 0, "Ġthe": 1, "the": 2, "ing": 3, "Ċ": 4, "▁word": 5, "'t": 6}
    np.testing.assert_array_equal(word_start_table(vocab, np.array([0])),
                                  [True, True, False, False, True, True, False])


def test_whole_word_masking_keeps_words_whole(data_dir: Path) -> None:
    s = _stream(data_dir, masking=MaskingConfig(whole_word=True))
    table = s._mask_kw["word_start"]
    n = len(s.seqs)
    inputs, labels = s.batch_at(0, n)
    tokens = s.seqs.get(s.order(0))
    np.testing.assert_array_equal(_unmask(inputs, labels), tokens)
    special = np.isin(tokens, s.special)
    starts = table[tokens] | special
    starts[:, 1:] |= special[:, :-1]
    starts[:, 0] = True
    word = np.cumsum(starts, axis=1)  # word number within the row
    selected = labels != -100
    assert not (selected & special).any() and selected.any(axis=1).all()
    multi = 0
    for r in range(n):
        for w in np.unique(word[r][selected[r]]):
            at = word[r] == w
            assert selected[r][at].all(), (r, w)  # never a part of a word
            got, orig = inputs[r][at], tokens[r][at]
            # Masked, kept or replaced as a unit.
            assert (got == s.mask_id).all() or (got == orig).all() or not (got == s.mask_id).any()
            multi += at.sum() > 1
    assert multi > 100  # the corpus has multi-token words, so the test can fail
    frac = selected.sum() / (~special).sum()
    assert abs(frac - 0.15) < 0.02, frac
    # Without the option: token-level masking, which does split words.
    plain_labels = _stream(data_dir).batch_at(0, n)[1]
    assert not np.array_equal(plain_labels, labels)
