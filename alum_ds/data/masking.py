"""Dynamic masking, reproducible from (seed, epoch, sequence index) alone.

Every random decision is a counter-based hash of (seed, epoch, sequence, position, purpose), so a
sequence is masked the same way whichever rank, worker or resumed run draws it, and the whole
batch is masked in a few vectorised numpy operations.
"""

from __future__ import annotations

import numpy as np

from alum_ds.config import MaskingConfig

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-mixed map of uint64."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epoch: int, seq: np.ndarray, length: int, purpose: int) -> np.ndarray:
    """[len(seq), length] uniforms in [0, 1) from the hash of each coordinate."""
    with np.errstate(over="ignore"):
        base = _mix(np.uint64(seed) * _GOLD + np.uint64(epoch * 4 + purpose))
        s = _mix(base ^ (seq.astype(np.uint64) * _GOLD))[:, None]
        x = _mix(s + np.arange(length, dtype=np.uint64)[None, :] * _GOLD)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def mask_batch(
    tokens: np.ndarray,
    seq_ids: np.ndarray,
    *,
    epoch: int,
    seed: int,
    cfg: MaskingConfig,
    special_ids: np.ndarray,
    mask_id: int,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(inputs, labels)``: labels hold the original token where selected, -100 elsewhere.

    ``prob`` of the non-special tokens are selected (at least one per sequence); of those
    ``mask_frac`` become <mask>, ``random_frac`` a random non-special token, the rest stay.
    """
    n, length = tokens.shape
    candidate = ~np.isin(tokens, special_ids)
    u_sel = uniform(seed, epoch, seq_ids, length, 0)
    selected = (u_sel < cfg.prob) & candidate
    # A sequence with nothing selected would contribute no loss; select its likeliest candidate.
    empty = ~selected.any(axis=1) & candidate.any(axis=1)
    if empty.any():
        pick = np.where(candidate, u_sel, np.inf)[empty].argmin(axis=1)
        selected[np.flatnonzero(empty), pick] = True
    u_kind = uniform(seed, epoch, seq_ids, length, 1)
    u_tok = uniform(seed, epoch, seq_ids, length, 2)
    inputs = tokens.astype(np.int64, copy=True)
    labels = np.full_like(inputs, -100)
    labels[selected] = inputs[selected]
    to_mask = selected & (u_kind < cfg.mask_frac)
    to_rand = selected & (u_kind >= cfg.mask_frac) & (u_kind < cfg.mask_frac + cfg.random_frac)
    inputs[to_mask] = mask_id
    # Random replacements come from the non-special ids (specials are the lowest ids in RoBERTa
    # vocabularies; any listed special is skipped by mapping over the allowed range).
    allowed = np.setdiff1d(np.arange(vocab_size), special_ids)
    rand = allowed[(u_tok[to_rand] * allowed.size).astype(np.int64)]
    inputs[to_rand] = rand
    return inputs, labels
