"""Pre-tokenized shards: flat token arrays plus document offsets, joined by a manifest.

A prepared folder holds ``tokenizer/`` (a Hugging Face tokenizer folder), ``*.bin`` (tokens in
the smallest unsigned dtype that holds the vocabulary), ``*.idx`` (int64 document start offsets,
one more than the documents) and ``manifest.json``, written last. Every file is written to a
temporary name and renamed, so a folder without a manifest is never mistaken for a complete one.
The manifest is input: shard names that climb out of the folder are refused, and sizes (always)
and checksums (on ``verify``) are checked before a shard is trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "alum_ds.shards"
VERSION = 1
MANIFEST = "manifest.json"


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_shard(
    out_dir: Path, name: str, tokens: np.ndarray, offsets: np.ndarray
) -> dict[str, Any]:
    """Write ``name.bin`` and ``name.idx`` atomically; return the manifest entry."""
    bin_path, idx_path = out_dir / f"{name}.bin", out_dir / f"{name}.idx"
    tok_bytes = np.ascontiguousarray(tokens).tobytes()
    idx_bytes = np.ascontiguousarray(offsets, dtype=np.int64).tobytes()
    atomic_write_bytes(bin_path, tok_bytes)
    atomic_write_bytes(idx_path, idx_bytes)
    return {
        "name": name,
        "tokens": int(tokens.size),
        "documents": int(offsets.size - 1),
        "bytes": len(tok_bytes),
        "sha256": hashlib.sha256(tok_bytes).hexdigest(),
        "index_sha256": hashlib.sha256(idx_bytes).hexdigest(),
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=2).encode())


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    d = Path(data_dir)
    path = d / MANIFEST
    if not d.is_dir():
        raise DataError(f"data folder {d} not found: prepare it with `alum-ds prepare INPUT --out {d}`")
    if not path.is_file():
        raise DataError(
            f"{path} not found: {d} is not a prepared data folder (or its prepare was "
            f"interrupted; rerun `alum-ds prepare` to finish it)"
        )
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); rerun `alum-ds prepare`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path} is not an alum_ds manifest")
    if m.get("version") != VERSION:
        raise DataError(
            f"{path} has format version {m.get('version')}, this alum_ds reads version "
            f"{VERSION}: prepare the data again with this version"
        )
    problem = _manifest_problem(m)
    if problem:
        raise DataError(f"{path} is damaged: {problem}; rerun `alum-ds prepare` for {d}")
    return m


_ENTRY_COUNTS = ("tokens", "documents", "bytes")
_ENTRY_TEXTS = ("name", "sha256", "index_sha256")
_TOKEN_IDS = ("bos_id", "eos_id", "pad_id", "mask_id")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _manifest_problem(m: dict[str, Any]) -> str:
    """What makes a manifest unusable (a missing key, a value of the wrong type or out of range),
    or "": every reader of a manifest may then index it without a KeyError or TypeError."""
    if m.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {m.get('dtype')!r} is not uint16 or uint32"
    tok = m.get("tokenizer")
    if not isinstance(tok, dict):
        return "it has no tokenizer object"
    vocab = tok.get("vocab_size")
    if not _count(vocab) or vocab == 0 or vocab > np.iinfo(m["dtype"]).max + 1:
        return f"tokenizer.vocab_size {vocab!r} is not a vocabulary size its dtype {m['dtype']} holds"
    for key in ("dir", "fingerprint"):
        if not isinstance(tok.get(key), str) or not tok[key]:
            return f"tokenizer.{key} {tok.get(key)!r} is not a string"
    for key, v in ((k, tok.get(k)) for k in _TOKEN_IDS):
        if not _count(v) or v >= vocab:
            return f"tokenizer.{key} {v!r} is not a token id below vocab_size {vocab}"
    special = tok.get("special_ids")
    if not isinstance(special, list) or not all(_count(v) and v < vocab for v in special):
        return "tokenizer.special_ids is not a list of token ids below vocab_size"
    splits = m.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(splits.get(s), list)
                                               for s in ("train", "validation")):
        return "splits must hold a list of shards for train and for validation"
    for split, entries in splits.items():
        if not isinstance(entries, list):
            return f"splits.{split} is not a list of shards"
        for i, e in enumerate(entries):
            where = f"splits.{split}[{i}]"
            if not isinstance(e, dict):
                return f"{where} is not an object"
            for key in _ENTRY_COUNTS:
                if not _count(e.get(key)):
                    return f"{where}.{key} {e.get(key)!r} is not a count"
            for key in _ENTRY_TEXTS:
                if not isinstance(e.get(key), str) or not e[key]:
                    return f"{where}.{key} {e.get(key)!r} is not a string"
    return ""


def _safe_path(data_dir: Path, name: str, manifest_path: Path) -> Path:
    p = Path(name)
    if not isinstance(name, str) or p.is_absolute() or ".." in p.parts or not name:
        raise DataError(f"{manifest_path}: shard name {name!r} leaves the data folder; refused")
    return data_dir / p


@dataclass
class Shard:
    name: str
    tokens: np.ndarray
    """Memory-mapped token array."""
    offsets: np.ndarray
    """Document start offsets into ``tokens``, plus the end."""


def open_split(data_dir: str | Path, split: str, *, verify: bool = False) -> list[Shard]:
    """Memory-map every shard of ``split``. Sizes are always checked; checksums with ``verify``."""
    d = Path(data_dir)
    m = read_manifest(d)
    mpath = d / MANIFEST
    dtype = np.dtype(m["dtype"])
    entries = m.get("splits", {}).get(split)
    if entries is None:
        raise DataError(f"{mpath} has no {split!r} split")
    shards = []
    for e in entries:
        bin_path = _safe_path(d, e["name"] + ".bin", mpath)
        idx_path = _safe_path(d, e["name"] + ".idx", mpath)
        for p in (bin_path, idx_path):
            if not p.is_file():
                raise DataError(f"shard file {p} is missing: rerun `alum-ds prepare` for {d}")
        size = bin_path.stat().st_size
        if size != e["bytes"] or size != e["tokens"] * dtype.itemsize:
            raise DataError(
                f"shard {bin_path} has {size} bytes, the manifest says {e['bytes']}: the file is "
                f"truncated or replaced; rerun `alum-ds prepare` for {d}"
            )
        if idx_path.stat().st_size != (e["documents"] + 1) * 8:
            raise DataError(f"shard index {idx_path} has the wrong size; rerun `alum-ds prepare`")
        if verify:
            for p, key in ((bin_path, "sha256"), (idx_path, "index_sha256")):
                if sha256_file(p) != e[key]:
                    raise DataError(
                        f"shard file {p} fails its sha256 check (corrupted); rerun `alum-ds "
                        f"prepare` for {d}"
                    )
        tokens = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        offsets = np.fromfile(idx_path, dtype=np.int64)
        if offsets[0] != 0 or offsets[-1] != e["tokens"] or np.any(np.diff(offsets) < 0):
            raise DataError(f"shard index {idx_path} is inconsistent; rerun `alum-ds prepare`")
        shards.append(Shard(e["name"], tokens, offsets))
    return shards


def verify_folder(data_dir: str | Path) -> dict[str, Any]:
    """Check a prepared folder fully (manifest, sizes, checksums, tokenizer); return a summary."""
    d = Path(data_dir)
    m = read_manifest(d)
    summary: dict[str, Any] = {"dir": str(d)}
    for split in m.get("splits", {}):
        shards = open_split(d, split, verify=True)
        summary[split] = {
            "shards": len(shards),
            "tokens": int(sum(s.tokens.size for s in shards)),
            "documents": int(sum(s.offsets.size - 1 for s in shards)),
        }
        vocab = m["tokenizer"]["vocab_size"]
        for s in shards:
            if s.tokens.size and int(s.tokens.max()) >= vocab:
                raise DataError(f"shard {s.name} holds token ids >= the vocabulary size {vocab}")
    tok_json = d / "tokenizer" / "tokenizer.json"
    if not tok_json.is_file():
        raise DataError(f"{tok_json} is missing; rerun `alum-ds prepare`")
    if sha256_file(tok_json)[:16] != m["tokenizer"]["fingerprint"]:
        raise DataError(f"{tok_json} does not match the manifest's tokenizer fingerprint")
    return summary


def _tokenizer_size(tok_json: Path) -> int:
    """Distinct ids of a ``tokenizer.json`` (model vocabulary plus added tokens)."""
    try:
        t = json.loads(tok_json.read_text(encoding="utf-8"))
        ids = set(t["model"]["vocab"].values()) | {a["id"] for a in t.get("added_tokens", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{tok_json} does not read as a tokenizer ({type(e).__name__}); rerun "
                        "`alum-ds prepare`") from None
    return len(ids)


def check_vocab(data_dir: str | Path, model_vocab_size: int, padded_rows: int = 0) -> None:
    """Refuse data whose tokenizer does not match a model's vocabulary (token ids would index
    the wrong embeddings, or past the end). ``padded_rows``: how many rows the model's table may
    have beyond the tokenizer (DeBERTa-v3 and ModernBERT round theirs up; ids never reach them)."""
    d = Path(data_dir)
    m = read_manifest(d)
    vocab = int(m["tokenizer"]["vocab_size"])
    tok_json = _safe_path(d, m["tokenizer"].get("dir", "tokenizer"), d / MANIFEST) / "tokenizer.json"
    if not tok_json.is_file():
        raise DataError(f"{tok_json} is missing; rerun `alum-ds prepare` for {d}")
    size = _tokenizer_size(tok_json)
    if size != vocab:
        raise DataError(f"{tok_json} holds {size} tokens, the manifest says {vocab}: the tokenizer "
                        f"was replaced after prepare; rerun `alum-ds prepare` for {d}")
    if not 0 <= model_vocab_size - vocab <= padded_rows:
        raise DataError(
            f"{d}: the data's tokenizer has {vocab} tokens, the model's vocabulary {model_vocab_size}: "
            f"prepare the data with the model's tokenizer (`alum-ds prepare INPUT --tokenizer "
            f"MODEL_DIR --out DIR`) or build the model for this data"
        )
