"""Data path: corpus -> learned BPE -> pre-tokenized shards -> packed, masked, resumable stream."""

from alum_ds.data.shards import DataError, check_vocab

__all__ = ["DataError", "check_vocab"]
