"""Dynamic masking, reproducible from (seed, epoch, sequence index) alone.

Every random decision is a counter-based hash of (seed, epoch, sequence, position, purpose), so a
sequence is masked the same way whichever rank, worker or resumed run draws it, and the whole
batch is masked in a few vectorised numpy operations.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=8)
def _allowed_and_special(vocab_size: int, special: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Non-special ids (random replacements come from them) and a per-id "is special" table.
    Cached: computing them took most of a small batch's masking time."""
    special_arr = np.asarray(special, dtype=np.int64)
    allowed = np.setdiff1d(np.arange(vocab_size), special_arr)
    table = np.zeros(max(vocab_size, int(special_arr.max(initial=0)) + 1), dtype=bool)
    table[special_arr] = True
    return allowed, table


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
    word_start: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(inputs, labels)``: labels hold the original token where selected, -100 elsewhere.

    ``prob`` of the non-special tokens are selected (at least one per sequence); of those
    ``mask_frac`` become <mask>, ``random_frac`` a random non-special token, the rest stay.

    ``cfg.whole_word``: words (a token marked in ``word_start``, see ``word_start_table``, or the
    first token after a special one, and the tokens up to the next such start) are selected
    whole with probability ``prob`` each, so about ``prob`` of the tokens are still selected, and
    each selected word is masked, randomised or kept as a unit.
    """
    length = tokens.shape[1]
    allowed, special_table = _allowed_and_special(vocab_size, tuple(int(x) for x in special_ids))
    is_special = special_table[tokens]
    candidate = ~is_special
    u_sel = uniform(seed, epoch, seq_ids, length, 0)
    u_kind = uniform(seed, epoch, seq_ids, length, 1)
    if cfg.whole_word:
        if word_start is None:
            raise ValueError("whole_word masking needs word_start (see word_start_table)")
        u_sel, u_kind = _word_draws(tokens, is_special, word_start, u_sel, u_kind)
    selected = (u_sel < cfg.prob) & candidate
    # A sequence with nothing selected would contribute no loss; select its likeliest candidate
    # (its whole word, as the draws are shared within a word).
    empty = ~selected.any(axis=1) & candidate.any(axis=1)
    if empty.any():
        rows = np.flatnonzero(empty)
        scores = np.where(candidate, u_sel, np.inf)[rows]
        if cfg.whole_word:
            selected[rows] |= scores == scores.min(axis=1, keepdims=True)
        else:
            selected[rows, scores.argmin(axis=1)] = True
    u_tok = uniform(seed, epoch, seq_ids, length, 2)
    return _corrupt(tokens, selected, u_kind, u_tok, cfg, mask_id, allowed)


def _word_draws(tokens: np.ndarray, is_special: np.ndarray, word_start: np.ndarray,
                u_sel: np.ndarray, u_kind: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each position draws with its word's first position: the word is selected, and
    masked/randomised/kept, as one."""
    starts = word_start[tokens] | is_special
    starts[:, 1:] |= is_special[:, :-1]
    starts[:, 0] = True
    first = np.maximum.accumulate(np.where(starts, np.arange(tokens.shape[1]), 0), axis=1)
    return np.take_along_axis(u_sel, first, axis=1), np.take_along_axis(u_kind, first, axis=1)


def _corrupt(tokens: np.ndarray, selected: np.ndarray, u_kind: np.ndarray, u_tok: np.ndarray,
             cfg: MaskingConfig, mask_id: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The selected positions labelled, and masked, randomised or kept by ``u_kind``."""
    inputs = tokens.astype(np.int64, copy=True)
    labels = np.full_like(inputs, -100)
    labels[selected] = inputs[selected]
    to_mask = selected & (u_kind < cfg.mask_frac)
    to_rand = selected & (u_kind >= cfg.mask_frac) & (u_kind < cfg.mask_frac + cfg.random_frac)
    inputs[to_mask] = mask_id
    # Random replacements come from the non-special ids (specials are the lowest ids in RoBERTa
    # vocabularies; any listed special is skipped by mapping over the allowed range).
    rand = allowed[(u_tok[to_rand] * allowed.size).astype(np.int64)]
    inputs[to_rand] = rand
    return inputs, labels


_WORD_SPACE = ("\u0120", "\u010a", "\u0109", "\u010d", "\u2581", " ")
"""Token prefixes that begin a word: byte-level BPE's space, newline, tab and carriage return
(Ġ Ċ ĉ č), SentencePiece's ▁, a plain space."""


def word_start_table(vocab: dict[str, int], special_ids: np.ndarray | None = None,
                     continuation_prefix: str | None = None) -> np.ndarray:
    """``[len]`` bool, True for ids whose token begins a word (fairseq's rule for byte-level BPE:
    the token's text starts with white space; special tokens count as starts). With
    ``continuation_prefix`` (WordPiece's ``##``) the rule is BERT's instead: every token that does
    not continue a word starts one."""
    size = max(vocab.values()) + 1 if vocab else 0
    table = np.zeros(size, dtype=bool)
    for text, i in vocab.items():
        if (not text.startswith(continuation_prefix) if continuation_prefix
                else text.startswith(_WORD_SPACE)):
            table[i] = True
    if special_ids is not None and len(special_ids):
        table[np.asarray(special_ids, dtype=np.int64)] = True
    return table
