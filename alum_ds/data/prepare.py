"""``alum-ds prepare``: read a corpus, learn or load a tokenizer, write shards and a manifest."""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from alum_ds.data import shards as S
from alum_ds.data.corpus import documents_fingerprint, embedded_documents
from alum_ds.data.tokenizer import learn_bpe, load_tokenizer

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")
SHARD_TOKENS = 1 << 26  # 64M tokens (128 MiB of uint16) per shard


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 text with each undecodable span replaced by U+FFFD (as ``errors="replace"``), and
    the number of bytes replaced."""
    # Counted here rather than in a registered codecs error handler: such a handler is
    # process-global, so its count leaked from one prepare call into the next.
    view = memoryview(data)
    parts: list[str] = []
    replaced = pos = 0
    while True:
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            return "".join(parts), replaced
        except UnicodeDecodeError as e:
            parts.append(codecs.utf_8_decode(view[pos : pos + e.start], "strict", True)[0])
            parts.append("\ufffd")
            replaced += e.end - e.start
            pos += e.end


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files named directly, found under folders, or matched by globs; sorted for determinism."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(g) for g in glob.glob(item, recursive=True) if Path(g).is_file())
        if not found:
            raise S.DataError(f"input {item} matches no .txt/.jsonl file")
        files.extend(found)
    return files


def read_documents(
    files: list[Path], text_field: str = "text", stats: dict[str, int] | None = None
) -> Iterator[str]:
    """Documents from text files (blank-line separated) and JSON lines (one per line).
    Undecodable bytes are replaced and added up in ``stats["replaced_bytes"]``."""
    for f in files:
        text, replaced = decode_utf8(f.read_bytes())
        if stats is not None:
            stats["replaced_bytes"] = stats.get("replaced_bytes", 0) + replaced
        if f.suffix in (".jsonl", ".json"):
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    raise S.DataError(f"{f}:{n} is not valid JSON") from None
                if not isinstance(obj, dict) or text_field not in obj:
                    raise S.DataError(f"{f}:{n} has no {text_field!r} field (use --text-field)")
                if str(obj[text_field]).strip():
                    yield str(obj[text_field])
        else:
            # Windows line ends would otherwise hide every blank line: one file, one document.
            for para in text.replace("\r\n", "\n").split("\n\n"):
                if para.strip():
                    yield para.strip()


def _is_validation(i: int, seed: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def prepare(
    *,
    documents: list[str],
    out_dir: str | Path,
    vocab_size: int = 8192,
    tokenizer: str = "",
    val_fraction: float = 0.05,
    seed: int = 1234,
    source: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``documents`` into shards under ``out_dir``; return the manifest."""
    out = Path(out_dir)
    if not documents:
        raise S.DataError("the corpus is empty: no document with text was found in the inputs")
    out.mkdir(parents=True, exist_ok=True)
    (out / S.MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the end
    t0 = time.time()
    val_idx = {i for i in range(len(documents)) if _is_validation(i, seed, val_fraction)}
    if not val_idx and len(documents) > 1 and val_fraction > 0:
        val_idx = {len(documents) - 1}
    train_docs = [d for i, d in enumerate(documents) if i not in val_idx]
    val_docs = [documents[i] for i in sorted(val_idx)]

    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        tok = learn_bpe(train_docs, vocab_size)
    tok_dir = out / "tokenizer"
    tmp_tok = out / "tokenizer.tmp"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    tok.save_pretrained(str(tmp_tok))
    shutil.rmtree(tok_dir, ignore_errors=True)
    tmp_tok.rename(tok_dir)
    vocab = len(tok)
    dtype = S.token_dtype(vocab)
    backend = tok.backend_tokenizer
    # Corpus text such as "<s>" (HTML) or "</s>" is text: as special ids it would fake document
    # boundaries and masks inside a sequence. Set after save_pretrained, so the saved tokenizer
    # keeps the usual behaviour.
    backend.encode_special_tokens = True

    splits: dict[str, list[dict[str, Any]]] = {}
    total_tokens = 0
    for split, docs in (("train", train_docs), ("validation", val_docs)):
        entries = []
        buf: list[np.ndarray] = []
        buf_tokens = 0
        batch = 1024
        for start in range(0, len(docs), batch):
            # The Rust tokenizer encodes a batch on every core.
            enc = backend.encode_batch(docs[start : start + batch], add_special_tokens=False)
            for e in enc:
                buf.append(np.asarray(e.ids, dtype=dtype))
                buf_tokens += len(e.ids)
            if buf_tokens >= SHARD_TOKENS:
                entries.append(_flush(out, split, len(entries), buf))
                buf, buf_tokens = [], 0
            total_tokens += sum(len(e.ids) for e in enc)
            if progress and sys.stderr.isatty():
                rate = total_tokens / max(time.time() - t0, 1e-9)
                print(f"\rprepare: {split} {start + len(enc)}/{len(docs)} docs, "
                      f"{total_tokens:,} tokens, {rate:,.0f} tok/s", end="", file=sys.stderr)
        if buf or not entries:
            entries.append(_flush(out, split, len(entries), buf))
        splits[split] = entries
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    if sum(e["tokens"] for e in splits["train"]) == 0:
        raise S.DataError("the corpus yields no training tokens")

    manifest = {
        "tokenizer": {
            "dir": "tokenizer",
            "fingerprint": S.sha256_file(tok_dir / "tokenizer.json")[:16],
            "vocab_size": vocab,
            "bos_id": tok.bos_token_id,
            "eos_id": tok.eos_token_id,
            "pad_id": tok.pad_token_id,
            "mask_id": tok.mask_token_id,
            "special_ids": sorted(set(tok.all_special_ids)),
        },
        "dtype": dtype.name,
        "splits": splits,
        "source": {"replaced_bytes": 0, **(source or {}), "documents": len(documents)},
        "seconds": round(time.time() - t0, 3),
    }
    S.write_manifest(out, manifest)
    return S.read_manifest(out)


def _flush(out: Path, split: str, n: int, buf: list[np.ndarray]) -> dict[str, Any]:
    lengths = np.fromiter((b.size for b in buf), dtype=np.int64, count=len(buf))
    offsets = np.zeros(len(buf) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.concatenate(buf) if buf else np.zeros(0, dtype=np.uint16)
    return S.write_shard(out, f"{split}-{n:05d}", tokens, offsets)


def prepare_inputs(inputs: list[str], out_dir: str, **kwargs: Any) -> dict[str, Any]:
    """``alum-ds prepare INPUT... --out DIR``."""
    text_field = kwargs.pop("text_field", "text")
    files = expand_inputs(inputs)
    stats = {"replaced_bytes": 0}
    docs = list(read_documents(files, text_field, stats))
    if not docs:
        # prepare() sees only documents; name the files here so the message says what to fix.
        names = ", ".join(str(f) for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise S.DataError(f"the corpus is empty: no document with text in {names}")
    return prepare(documents=docs, out_dir=out_dir,
                   source={"inputs": [str(f) for f in files], **stats}, **kwargs)


def ensure_embedded(cache_dir: str | Path, *, vocab_size: int, seed: int) -> Path:
    """Prepare the embedded default corpus once per (corpus, options) and reuse it after."""
    docs = embedded_documents()
    key = f"{documents_fingerprint(docs)}-v{vocab_size}-s{seed}-f{S.VERSION}"
    out = Path(cache_dir) / f"embedded-{key}"
    if (out / S.MANIFEST).is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    prepare(documents=docs, out_dir=tmp, vocab_size=vocab_size, seed=seed,
            source={"inputs": ["embedded:pydoc_data.topics"]}, progress=False)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / S.MANIFEST).is_file():  # another process finished first: keep theirs
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
