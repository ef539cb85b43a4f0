"""The packed, masked, resumable training stream.

Documents are concatenated with ``</s>`` after each one and cut into sequences of
``seq_len - 2`` tokens, each wrapped in ``<s> ... </s>`` (RoBERTa's FULL-SENTENCES packing:
sequences cross document boundaries, nothing is padded; a BERT-style tokenizer's manifest names
[CLS] and [SEP] as ``bos_id``/``eos_id``, giving ``[CLS] ... [SEP]``). Epoch ``e`` visits every sequence once,
in the order of a permutation seeded by ``(seed, e)``.

The stream's only state is the global count of sequences consumed. A micro-step of ``world``
ranks takes the next ``world * micro_batch`` global positions, rank ``r`` the ``r``-th contiguous
block, so the sequence seen at each global position, and its mask, depend on neither the number
of ranks nor on where a run was stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alum_ds.config import MaskingConfig
from alum_ds.data.masking import mask_batch, word_start_table
from alum_ds.data.shards import DataError, open_split, read_manifest


def split_sequences(manifest: dict, split: str, seq_len: int) -> int:
    """Packed sequences of ``seq_len`` in ``split``, from the manifest's counts alone (each
    document adds one </s>): what ``PackedSequences`` will find."""
    entries = manifest["splits"].get(split, [])
    return sum(int(e["tokens"]) + int(e["documents"]) for e in entries) // max(1, seq_len - 2)


def check_splits(data_dir: str | Path, seq_len: int) -> None:
    """Refuse, before a run starts, a data folder whose training or validation split holds no
    sequence of ``seq_len`` (the run evaluates on the validation split at its end: an empty one
    failed there, after the whole schedule)."""
    m = read_manifest(data_dir)
    for split, fix in (("train", "add text"), ("validation", "prepare it again with more text or "
                                                             "a larger --val-fraction")):
        if split_sequences(m, split, seq_len) == 0:
            entries = m["splits"].get(split, [])
            tokens = sum(int(e["tokens"]) for e in entries)
            docs = sum(int(e["documents"]) for e in entries)
            raise DataError(f"{data_dir}: the {split} split holds {docs} documents ({tokens} tokens), "
                            f"not one sequence of data.seq_len={seq_len}: {fix}, or lower data.seq_len")


class PackedSequences:
    """Random access to the packed sequences of one split, reading shards by memory map."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int) -> None:
        m = read_manifest(data_dir)
        tok = m["tokenizer"]
        self.bos, self.eos = int(tok["bos_id"]), int(tok["eos_id"])
        self.seq_len = seq_len
        self.body = seq_len - 2
        self.shards = open_split(data_dir, split)
        # Stream position of each document's first token: tokens before it plus one </s> per
        # earlier document.
        self._doc_starts = [s.offsets[:-1] + np.arange(s.offsets.size - 1) for s in self.shards]
        lengths = [int(s.tokens.size + s.offsets.size - 1) for s in self.shards]
        self._shard_starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.stream_tokens = int(self._shard_starts[-1])
        self.num_sequences = self.stream_tokens // self.body
        if self.num_sequences == 0:
            raise DataError(
                f"{data_dir}: the {split} split holds {self.stream_tokens} tokens, fewer than one "
                f"sequence of {seq_len}: use a larger corpus or a smaller data.seq_len"
            )

    def __len__(self) -> int:
        return self.num_sequences

    def get(self, seq_ids: np.ndarray) -> np.ndarray:
        """Token arrays [len(seq_ids), seq_len] for the given sequence indices."""
        pos = (seq_ids.astype(np.int64)[:, None] * self.body) + np.arange(self.body)[None, :]
        flat = pos.reshape(-1)
        out = np.empty(flat.size, dtype=np.int64)
        shard_of = np.searchsorted(self._shard_starts, flat, side="right") - 1
        for k in _distinct(shard_of):
            sel = shard_of == k
            local = flat[sel] - self._shard_starts[k]
            starts, shard = self._doc_starts[k], self.shards[k]
            doc = np.searchsorted(starts, local, side="right") - 1
            within = local - starts[doc]
            doc_len = shard.offsets[doc + 1] - shard.offsets[doc]
            is_tok = within < doc_len
            vals = np.full(local.size, self.eos, dtype=np.int64)
            vals[is_tok] = shard.tokens[(shard.offsets[doc] + within)[is_tok]]
            out[sel] = vals
        body = out.reshape(len(seq_ids), self.body)
        seqs = np.empty((len(seq_ids), self.seq_len), dtype=np.int64)
        seqs[:, 0] = self.bos
        seqs[:, 1:-1] = body
        seqs[:, -1] = self.eos
        return seqs


@dataclass
class StreamState:
    consumed: int = 0
    """Global count of training sequences consumed (across all ranks and epochs)."""


def _distinct(values: np.ndarray) -> np.ndarray:
    """``np.unique``, without its sort in the common one-value case."""
    if values.size == 0 or values.min() == values.max():
        return values[:1]
    return np.unique(values)


def _masking_kwargs(data_dir: str | Path, masking: MaskingConfig) -> dict[str, object]:
    m = read_manifest(data_dir)["tokenizer"]
    special = np.asarray(m["special_ids"], dtype=np.int64)
    kw: dict[str, object] = {"special_ids": special, "mask_id": int(m["mask_id"]),
                             "vocab_size": int(m["vocab_size"])}
    if masking.whole_word:
        kw.update(word_start=_word_start(Path(data_dir) / m["dir"], special,
                                                          int(m["vocab_size"])))
    return kw


def _word_start(tok_dir: Path, special: np.ndarray, vocab_size: int) -> np.ndarray:
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece

    path = tok_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{path} is missing (whole-word masking reads the vocabulary); rerun "
                        "`alum-ds prepare`")
    tok = Tokenizer.from_file(str(path))
    # WordPiece marks continuations (##), byte-level BPE marks word starts (a leading space).
    prefix = tok.model.continuing_subword_prefix if isinstance(tok.model, WordPiece) else None
    table = word_start_table(tok.get_vocab(with_added_tokens=True), special, continuation_prefix=prefix)
    out = np.zeros(max(vocab_size, table.size), dtype=bool)
    out[: table.size] = table
    return out


class TrainStream:
    """Deterministic global order per epoch; batches addressed by global position.

    ``batch_at`` and ``at`` only read, so a prefetching thread may call them while another
    thread uses the stream."""

    def __init__(
        self, data_dir: str | Path, *, seq_len: int, seed: int, masking: MaskingConfig
    ) -> None:
        self.data_dir = Path(data_dir)
        self.seq_len = seq_len
        self.seqs = PackedSequences(data_dir, "train", seq_len)
        self._mask_kw = _masking_kwargs(data_dir, masking)
        self.special = self._mask_kw["special_ids"]
        self.mask_id = int(self._mask_kw["mask_id"])
        self.vocab_size = int(self._mask_kw["vocab_size"])
        self.seed = seed
        self.masking = masking
        self.state = StreamState()
        # One tuple, replaced whole: a reader in another thread never sees an epoch paired with
        # another epoch's permutation.
        self._perm: tuple[int, np.ndarray] = (-1, np.zeros(0, dtype=np.int64))

    def order(self, epoch: int) -> np.ndarray:
        cached = self._perm
        if cached[0] == epoch:
            return cached[1]
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.seqs))
        self._perm = (epoch, perm)
        return perm

    def at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(epoch, sequence index) for global positions."""
        n = len(self.seqs)
        epochs = positions // n
        ids = np.empty_like(positions)
        for e in _distinct(epochs):
            sel = epochs == e
            ids[sel] = self.order(int(e))[positions[sel] % n]
        return epochs, ids, positions

    def batch_at(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Masked ``(inputs, labels)`` for global positions ``[start, start + count)``."""
        return self.batch_for(np.arange(start, start + count, dtype=np.int64))

    def batch_for(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masked ``(inputs, labels)`` for any global positions (a mixture's source reads the
        positions the schedule gives it)."""
        epochs, ids, _ = self.at(positions)
        tokens = self.seqs.get(ids)
        inputs = np.empty_like(tokens)
        labels = np.empty_like(tokens)
        for e in _distinct(epochs):
            sel = epochs == e
            inputs[sel], labels[sel] = mask_batch(
                tokens[sel], ids[sel], epoch=int(e), seed=self.seed, cfg=self.masking,
                **self._mask_kw,
            )
        return inputs, labels

    def next_for_rank(
        self, *, rank: int, world: int, micro_batch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """This rank's part of the next micro-step; advances the global count for all ranks."""
        start = self.state.consumed + rank * micro_batch
        batch = self.batch_at(start, micro_batch)
        self.state.consumed += world * micro_batch
        return batch

    @property
    def epoch(self) -> int:
        return self.state.consumed // len(self.seqs)

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.state.consumed, "seed": self.seed,
                "num_sequences": len(self.seqs)}

    def load_state_dict(self, d: dict[str, int]) -> None:
        if d.get("num_sequences") not in (None, len(self.seqs)):
            raise DataError(
                f"the checkpoint's data had {d['num_sequences']} sequences per epoch, this data "
                f"has {len(self.seqs)}: resume with the same data folder and data.seq_len"
            )
        self.state.consumed = int(d["consumed"])


def validation_batches(
    data_dir: str | Path, *, seq_len: int, seed: int, masking: MaskingConfig, batch: int,
    rank: int, world: int, max_sequences: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """This rank's share of the held-out sequences, masked identically on every evaluation."""
    vs = PackedSequences(data_dir, "validation", seq_len)
    kw = _masking_kwargs(data_dir, masking)
    n = len(vs) if not max_sequences else min(len(vs), max_sequences)
    mine = np.arange(rank, n, world, dtype=np.int64)
    out = []
    for i in range(0, mine.size, batch):
        ids = mine[i : i + batch]
        inputs, labels = mask_batch(vs.get(ids), ids, epoch=0, seed=seed + 7919, cfg=masking, **kw)
        out.append((inputs, labels))
    return out
