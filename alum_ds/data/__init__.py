"""Data path: corpus -> learned BPE -> pre-tokenized shards -> packed, masked, resumable stream."""

from alum_ds.data.shards import DataError

__all__ = ["DataError"]
