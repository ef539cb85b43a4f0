"""``alum-ds prepare``: read a corpus, learn or load a tokenizer, write shards and a manifest.

Memory stays bounded whatever the corpus size: the BPE is learned from the training documents
(or their first ``tokenizer_sample_bytes``) streamed through the trainer, then the corpus is read
again in chunks by one thread, encoded in another (byte-level BPE tokenizers by the word cache of
``tokenizer.WordCacheEncoder`` in a pool of worker processes, one per core, see ``encoding``;
others by the Rust tokenizer on every core), and written shard by shard by the caller's. Shard
cuts depend only on document token counts, never on chunking or on the number of workers, so the
same input and options give byte-identical shards on any path.

Both splits are cut together (when either buffer reaches ``SHARD_TOKENS``), so after each cut
nothing is buffered and the input position of the next document is a complete resume point.
``progress.json`` records every cut (shards with checksums, input position) atomically; a rerun
with the same inputs and options (the fingerprint) verifies the recorded shards and continues
after the last good cut; other inputs or options start afresh.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from alum_ds.data import shards as S
from alum_ds.data.corpus import embedded_documents, embedded_fingerprint
from alum_ds.data.encoding import Batch, EncoderPool, default_workers, encoding_backend, in_thread
from alum_ds.data.progress import Progress, background
from alum_ds.data.sources import Chunk, Corpus, DocumentList, Position, decode_utf8, expand_inputs
from alum_ds.data.sources import read_documents as read_documents
from alum_ds.data.tokenizer import (
    TOKENIZER_KINDS,
    WordCacheEncoder,
    learn_tokenizer,
    load_tokenizer,
    sequence_ids,
)

__all__ = ["decode_utf8", "expand_inputs", "prepare", "prepare_inputs", "read_documents"]

SHARD_TOKENS = 1 << 26  # 64M tokens (128 MiB of uint16) per shard
ENCODE_CHARS = 1 << 20  # text per encode_batch call: enough for every core, bounded memory
TOKENIZER_SAMPLE_BYTES = 1 << 30
PROGRESS = "progress.json"
PROGRESS_FORMAT = "alum_ds.prepare-progress"
PREPARE_VERSION = 2  # bump when the same inputs would give other shards
_SHARD_FILE = re.compile(r"^(train|validation)-\d{5}\.(bin|idx)(\.tmp)?$")
SPLITS = ("train", "validation")


def _is_validation(i: int, seed: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def training_documents(
    corpus: Corpus, *, seed: int, val_fraction: float, limit_bytes: int = 0,
    prog: Progress | None = None, what: str = "BPE",
) -> Iterator[str]:
    """The training documents in order (the split rule of ``_Writer``), stopping once
    ``limit_bytes`` of UTF-8 text were given (0: all)."""
    held: str | None = None
    any_val, n, used = False, 0, 0
    with background(corpus.chunks(), depth=2) as chunks:
        for chunk in chunks:
            for d in chunk.docs:
                out = None
                if _is_validation(n, seed, val_fraction):
                    any_val, out, held = True, held, None
                elif not any_val and val_fraction > 0:
                    out, held = held, d
                else:
                    out = d
                n += 1
                if out is not None:
                    yield out
                    used += len(out.encode("utf-8", "surrogatepass"))
                    if limit_bytes and used >= limit_bytes:
                        return
            if prog is not None:
                prog.line(f"learning {what}", docs=n, nbytes=used)
    if held is not None and n == 1:
        yield held


class _Writer:
    """Assigns documents to splits and cuts shards. A document is training or validation by a
    seeded hash of its index; if none is validation, the last one is (held back until the next
    arrives, so the rule needs no second pass)."""

    def __init__(self, out: Path, dtype: np.dtype, *, seed: int, val_fraction: float,
                 entries: dict[str, list[dict[str, Any]]], any_val: bool) -> None:
        self.out, self.dtype, self.seed, self.val_fraction = out, dtype, seed, val_fraction
        self.entries = entries
        self.any_val = any_val
        self.bufs: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self.buf_tokens = dict.fromkeys(SPLITS, 0)
        self.held: tuple[int, np.ndarray] | None = None

    def _append(self, split: str, ids: np.ndarray) -> None:
        self.bufs[split].append(ids)
        self.buf_tokens[split] += ids.size

    def add(self, i: int, ids: np.ndarray) -> int | None:
        """Take document ``i``; after a cut, return the index of the first document not in a
        shard (where a rerun continues)."""
        if _is_validation(i, self.seed, self.val_fraction):
            self.any_val = True
            if self.held is not None:
                self._append("train", self.held[1])
                self.held = None
            self._append("validation", ids)
        elif not self.any_val and self.val_fraction > 0:
            if self.held is not None:
                self._append("train", self.held[1])
            self.held = (i, ids)
        else:
            self._append("train", ids)
        if self.buf_tokens["train"] < SHARD_TOKENS and self.buf_tokens["validation"] < SHARD_TOKENS:
            return None
        for split in SPLITS:
            if self.bufs[split]:
                self._flush(split)
        return self.held[0] if self.held is not None else i + 1

    def add_batch(self, first: int, flat: np.ndarray, lengths: list[int]) -> Iterator[int]:
        """``add`` documents ``first, first + 1, ...`` (``lengths`` ids each, concatenated in
        ``flat``); yield each cut's resume index (before the next document is taken)."""
        pos = 0
        for j, n in enumerate(lengths):
            resume = self.add(first + j, flat[pos : pos + n])
            pos += n
            if resume is not None:
                yield resume

    def finish(self, n_docs: int) -> None:
        if self.held is not None:
            self._append("validation" if n_docs > 1 else "train", self.held[1])
            self.held = None
        for split in SPLITS:
            if self.bufs[split] or not self.entries[split]:
                self._flush(split)

    def _flush(self, split: str) -> None:
        buf = self.bufs[split]
        lengths = np.fromiter((b.size for b in buf), dtype=np.int64, count=len(buf))
        offsets = np.zeros(len(buf) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.concatenate(buf) if buf else np.zeros(0, dtype=self.dtype)
        name = f"{split}-{len(self.entries[split]):05d}"
        self.entries[split].append(S.write_shard(self.out, name, tokens, offsets))
        self.bufs[split], self.buf_tokens[split] = [], 0


def _dir_digest(path: str) -> str:
    p = Path(path)
    if not p.is_dir():
        return path  # load_tokenizer names the problem
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _fingerprint(corpus: Corpus, opts: dict[str, Any]) -> str:
    key = {"corpus": corpus.stamp(), "options": opts, "format": S.VERSION,
           "prepare": PREPARE_VERSION, "shard_tokens": SHARD_TOKENS}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _write_progress(out: Path, progress: dict[str, Any]) -> None:
    S.atomic_write_bytes(out / PROGRESS, json.dumps(progress, indent=1).encode())


def _entry_ok(out: Path, e: dict[str, Any]) -> bool:
    for suffix, key in ((".bin", "sha256"), (".idx", "index_sha256")):
        p = out / f"{e['name']}{suffix}"
        if not p.is_file() or S.sha256_file(p) != e[key]:
            return False
    return True


def _resume_state(out: Path, fingerprint: str, prog: Progress) -> dict[str, Any] | None:
    """The recorded progress of an earlier prepare of the same inputs and options, cut back to
    its last cut whose shards all verify; ``None`` to start afresh."""
    try:
        p = json.loads((out / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(p, dict) or p.get("format") != PROGRESS_FORMAT or p.get("fingerprint") != fingerprint:
        return None
    tok_json = out / "tokenizer" / "tokenizer.json"
    if not tok_json.is_file() or S.sha256_file(tok_json) != p.get("tokenizer_sha256"):
        return None
    try:
        # The file is input: each entry must name the shard it stands for, nothing else.
        if any(e["name"] != f"{s}-{i:05d}" for s in SPLITS for i, e in enumerate(p["splits"][s])):
            return None
        good = {s: 0 for s in SPLITS}
        for s in SPLITS:
            while good[s] < len(p["splits"][s]) and _entry_ok(out, p["splits"][s][good[s]]):
                good[s] += 1
        cuts = [c for c in p["cuts"] if all(c[s] <= good[s] for s in SPLITS)]
    except (KeyError, TypeError, AttributeError):
        return None
    if p.get("complete") and all(good[s] == len(p["splits"][s]) for s in SPLITS):
        return p
    p["complete"] = False
    p["cuts"] = cuts
    last = cuts[-1] if cuts else {s: 0 for s in SPLITS}
    for s in SPLITS:
        p["splits"][s] = p["splits"][s][: last[s]]
    kept = sum(len(v) for v in p["splits"].values())
    if cuts:
        prog.message(f"continuing an interrupted prepare after {kept} verified shard file(s), "
                     f"{last['documents']:,} documents")
    return p


def _clean(out: Path, keep: set[str]) -> None:
    """Remove shard files of earlier prepares that the current one does not list."""
    for f in out.iterdir():
        if _SHARD_FILE.match(f.name) and f.name.split(".")[0] not in keep:
            f.unlink()


_KIND_NAMES = {"bpe": ("byte-level BPE", "BPE"), "wordpiece": ("WordPiece", "WordPiece")}


def _save_tokenizer(out: Path, tokenizer: str, corpus: Corpus, *, vocab_size: int, seed: int,
                    val_fraction: float, sample_bytes: int, prog: Progress,
                    kind: str = "bpe") -> Any:
    if tokenizer:
        tok = load_tokenizer(tokenizer)
    else:
        long_name, short = _KIND_NAMES[kind]
        prog.message(f"learning a {vocab_size}-token {long_name} from the training documents"
                     + (f" (first {sample_bytes / 2**20:,.0f} MiB)" if sample_bytes else ""))
        passes = iter([f"{short} alphabet", short] if kind == "wordpiece" else [short])

        def docs() -> Iterator[str]:  # WordPiece reads them twice: its alphabet first
            return training_documents(corpus, seed=seed, val_fraction=val_fraction,
                                      limit_bytes=sample_bytes, prog=prog, what=next(passes))

        tok = learn_tokenizer(kind, docs, vocab_size)
        prog.close_line()
    tmp_tok = out / "tokenizer.tmp"
    shutil.rmtree(tmp_tok, ignore_errors=True)
    tok.save_pretrained(str(tmp_tok))
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    tmp_tok.rename(out / "tokenizer")
    return tok


def _require_documents(corpus: Corpus) -> None:
    for chunk in corpus.chunks():
        if any(chunk.docs):
            return
    names = corpus.labels()
    listed = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise S.DataError(f"the corpus is empty: no document with text in {listed or 'the inputs'}")


def prepare(
    *,
    documents: list[str] | None = None,
    corpus: Corpus | None = None,
    out_dir: str | Path,
    vocab_size: int = 8192,
    tokenizer: str = "",
    val_fraction: float = 0.05,
    seed: int = 1234,
    source: dict[str, Any] | None = None,
    progress: bool = True,
    tokenizer_sample_bytes: int = TOKENIZER_SAMPLE_BYTES,
    fresh: bool = False,
    encode_workers: int | None = None,
    tokenizer_kind: str = "bpe",
) -> dict[str, Any]:
    """Tokenize ``documents`` (or a streamed ``corpus``) into shards under ``out_dir``; return
    the manifest. An interrupted earlier call with the same inputs and options is continued.

    ``tokenizer_kind``: the tokenizer learned when no ``tokenizer`` folder is given, ``bpe``
    (byte-level, RoBERTa's) or ``wordpiece`` (BERT's). Sequences are framed by the tokenizer's
    bos/eos, or [CLS]/[SEP] where it has none (the manifest's ``bos_id``/``eos_id``).

    ``encode_workers``: processes for the word-cache encoder (0: in this process's encoding
    thread); default ``encoding.default_workers()``, one per usable core on a machine of several.
    The shards do not depend on it."""
    if corpus is None:
        corpus = Corpus([DocumentList(documents or [])])
    out = Path(out_dir)
    prog = Progress(progress)
    t0 = time.time()
    _check_tokenizer_choice(tokenizer, tokenizer_kind)
    opts = {"vocab_size": vocab_size, "tokenizer": _dir_digest(tokenizer) if tokenizer else "",
            "val_fraction": val_fraction, "seed": seed,
            "sample_bytes": 0 if tokenizer else tokenizer_sample_bytes}
    if tokenizer_kind != "bpe":  # absent for bpe: earlier prepares keep their fingerprint
        opts["tokenizer_kind"] = tokenizer_kind
    fp = _fingerprint(corpus, opts)
    state = None if fresh or not out.is_dir() else _resume_state(out, fp, prog)
    if state is not None and state.get("complete"):
        if not (out / S.MANIFEST).is_file():
            S.write_manifest(out, {**state["manifest"], "seconds": round(time.time() - t0, 3)})
        prog.message(f"{out} is already prepared from these inputs (shards verified)")
        return S.read_manifest(out)
    if state is None:
        _require_documents(corpus)
    out.mkdir(parents=True, exist_ok=True)
    (out / S.MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the end
    if state is None:
        (out / PROGRESS).unlink(missing_ok=True)
        _clean(out, set())
        tok = _save_tokenizer(out, tokenizer, corpus, vocab_size=vocab_size, seed=seed,
                              val_fraction=val_fraction, sample_bytes=opts["sample_bytes"], prog=prog,
                              kind=tokenizer_kind)
        state = {"format": PROGRESS_FORMAT, "fingerprint": fp, "complete": False,
                 "tokenizer_sha256": S.sha256_file(out / "tokenizer" / "tokenizer.json"),
                 "splits": {s: [] for s in SPLITS}, "cuts": []}
        _write_progress(out, state)
    else:
        tok = load_tokenizer(out / "tokenizer")
    dtype = S.token_dtype(len(tok))
    cut = state["cuts"][-1] if state["cuts"] else None
    writer = _Writer(out, dtype, seed=seed, val_fraction=val_fraction, entries=state["splits"],
                     any_val=bool(cut and cut["any_val"]))
    n_docs, replaced = _encode_corpus(corpus, out, dtype, writer, state, cut, prog, encode_workers)
    writer.finish(n_docs)
    _clean(out, {e["name"] for s in SPLITS for e in state["splits"][s]})
    _require_tokens(state, corpus, n_docs, val_fraction)

    manifest = {
        "tokenizer": {
            "dir": "tokenizer",
            "fingerprint": S.sha256_file(out / "tokenizer" / "tokenizer.json")[:16],
            **tokenizer_ids(tok),
        },
        "dtype": dtype.name,
        "splits": state["splits"],
        "source": {"replaced_bytes": replaced, **(source or {}), "documents": n_docs},
    }
    state.update(complete=True, manifest=manifest)  # no timing: the file is deterministic
    _write_progress(out, state)
    S.write_manifest(out, {**manifest, "seconds": round(time.time() - t0, 3)})
    tokens = sum(e["tokens"] for s in SPLITS for e in state["splits"][s])
    prog.message(f"wrote {sum(len(v) for v in state['splits'].values())} shard(s), {n_docs:,} "
                 f"documents, {tokens:,} tokens to {out} in {time.time() - t0:,.1f} s")
    return S.read_manifest(out)


def _check_tokenizer_choice(tokenizer: str, kind: str) -> None:
    if kind not in TOKENIZER_KINDS:
        raise S.DataError(f"--tokenizer-kind {kind}: choose from {', '.join(TOKENIZER_KINDS)}")
    if tokenizer and kind != "bpe":
        raise S.DataError(f"--tokenizer-kind {kind} chooses the tokenizer to learn; "
                          f"--tokenizer {tokenizer} loads one instead: give one of the two")


def _encode_corpus(corpus: Corpus, out: Path, dtype: Any, writer: _Writer, state: dict[str, Any],
                   cut: dict[str, Any] | None, prog: Progress,
                   encode_workers: int | None) -> tuple[int, int]:
    """Encode the corpus (from ``cut`` on, when resumed) into ``writer``'s shards: (documents,
    bytes replaced as invalid UTF-8)."""
    # Encode with the saved tokenizer's own file, on a fresh run too: a resumed run, which has
    # only the file, must encode exactly alike.
    # (encode_special_tokens, no truncation or padding: see encoding_backend). Set after
    # save_pretrained, so the saved tokenizer keeps the usual behaviour.
    backend = encoding_backend(Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json")))
    # The word cache needs about a quarter of the Rust pipeline's CPU time per token, but it
    # holds the GIL: one core per process. A pool of processes gives it every core (on 2 cores
    # 1.8 s in one thread against 3 to 6 s for the Rust tokenizer on both). Splitting each batch
    # between the word cache and Rust was measured slower: the Rust threads take the cores the
    # word cache needs.
    workers = default_workers() if encode_workers is None else encode_workers
    with contextlib.ExitStack() as stack:
        if not WordCacheEncoder.supports(backend):
            encode_map = in_thread(_rust_batch(backend, dtype))
        elif workers > 0:
            encode_map = stack.enter_context(EncoderPool(WordCacheEncoder(backend, dtype), workers)).map
        else:
            encode_map = in_thread(WordCacheEncoder(backend, dtype).encode_batch)
        return _encode(corpus, encode_map, writer, state, out, cut, prog)


def _require_tokens(state: dict[str, Any], corpus: Corpus, n_docs: int, val_fraction: float) -> None:
    if sum(e["tokens"] for e in state["splits"]["train"]) == 0:
        names = ", ".join(corpus.labels()[:3])
        raise S.DataError(f"{names}: the training split holds no tokens; add text or lower --val-fraction")
    if val_fraction > 0 and sum(e["tokens"] for e in state["splits"]["validation"]) == 0:
        # A run evaluates on it at its end: an empty one failed there, after the whole schedule.
        names = ", ".join(corpus.labels()[:3])
        raise S.DataError(f"{names}: the validation split holds no tokens ({n_docs} document(s) "
                          "in all); add documents (at least two) or raise --val-fraction")


def tokenizer_ids(tok: Any) -> dict[str, Any]:
    """The manifest's description of a tokenizer: its size and the ids the data path uses."""
    bos, eos = sequence_ids(tok)  # <s> </s>, or [CLS] [SEP] for a BERT-style tokenizer
    return {"vocab_size": len(tok), "bos_id": bos, "eos_id": eos, "pad_id": tok.pad_token_id,
            "mask_id": tok.mask_token_id, "special_ids": sorted(set(tok.all_special_ids))}


def verify(data_dir: str | Path) -> dict[str, Any]:
    """``alum-ds prepare --verify``: the folder's bytes (``shards.verify_folder``) and its
    manifest's tokenizer entries against the tokenizer itself (a manifest whose vocabulary size
    or mask id differs from its tokenizer's would train on the wrong embedding rows or masks)."""
    summary = S.verify_folder(data_dir)
    d = Path(data_dir)
    m = S.read_manifest(d)["tokenizer"]
    tok_dir = S._safe_path(d, m["dir"], d / S.MANIFEST)  # a tokenizer outside the folder: refused
    tok = load_tokenizer(tok_dir)
    for key, value in tokenizer_ids(tok).items():
        if m.get(key) != value:
            raise S.DataError(f"{d / S.MANIFEST}: tokenizer.{key} is {m.get(key)!r}, its tokenizer "
                              f"{tok_dir} has {value!r}: rerun `alum-ds prepare` for {d}")
    return summary


EncodeMap = Callable[[Iterator[tuple[Chunk | None, list[str]]]], Iterator[tuple[Chunk | None, Batch]]]
"""Encodes ``(chunk, docs)`` batches in order: ``(chunk, (ids, lengths))``."""


def _rust_batch(backend: Tokenizer, dtype: np.dtype) -> Callable[[list[str]], Batch]:
    """Encode with the Rust tokenizer alone (for tokenizers that ``WordCacheEncoder`` does not
    reproduce): on every core, without the GIL; offsets are not needed."""

    def encode(docs: list[str]) -> Batch:
        id_lists = [e.ids for e in backend.encode_batch_fast(docs, add_special_tokens=False)]
        lengths = [len(x) for x in id_lists]
        # One conversion per batch: per-document arrays cost more than the rest of the loop.
        flat = np.fromiter(chain.from_iterable(id_lists), dtype=dtype, count=sum(lengths))
        return flat, lengths

    return encode


def _batches(chunks: Iterator[Chunk], skip: int) -> Iterator[tuple[Chunk | None, list[str]]]:
    """``(chunk, docs)`` per batch of at most ``ENCODE_CHARS``; ``chunk`` is given with its first
    batch (or alone, with no documents, if it holds none to encode) and is ``None`` after."""
    for chunk in chunks:
        docs = chunk.docs
        if skip:
            # Reread from a recorded position, a source may chunk differently (Parquet batches
            # restart at a row group), so the documents to skip may span several chunks.
            docs, skip = docs[skip:], max(skip - len(docs), 0)
        first: Chunk | None = chunk
        lo = 0
        while lo < len(docs) or first is not None:
            hi, size = lo, 0
            while hi < len(docs) and (size < ENCODE_CHARS or hi == lo):
                size += len(docs[hi])
                hi += 1
            yield first, docs[lo:hi]
            first, lo = None, hi


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The encoding loop allocates millions of short-lived id lists and no reference cycles;
    the cyclic collector's passes it triggers, over every object the interpreter holds
    (transformers alone brings hundreds of thousands), cost about a tenth of prepare's time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _encode(corpus: Corpus, encode_map: EncodeMap, writer: _Writer, state: dict[str, Any],
            out: Path, cut: dict[str, Any] | None, prog: Progress) -> tuple[int, int]:
    """Encode every document from the last cut on; return (documents, replaced bytes) in all.

    Three stages overlap: a thread reads and decodes chunks, a thread encodes them (or hands
    them to the worker processes and takes their results in order), and this thread assigns
    documents to splits and writes shards."""
    start: Position | None = cut["position"] if cut else None
    skip = cut["skip"] if cut else 0
    doc_index = cut["documents"] if cut else 0
    chunk_first = doc_index - skip  # global index of the next chunk's first document
    replaced = cut["replaced_bytes"] if cut else 0
    tokens = sum(e["tokens"] for s in SPLITS for e in state["splits"][s])
    # (global index of the chunk's first document, its position, bytes replaced before it) for
    # the chunks since the last cut: the next cut's resume point lies in one of them.
    recent: list[tuple[int, Position, int]] = []
    t_start, nbytes, new_tokens = time.monotonic(), 0, 0
    with _no_cyclic_gc(), background(corpus.chunks(start), depth=3) as chunks, \
            background(encode_map(_batches(chunks, skip)), depth=2) as batches:
        for chunk, (flat, lengths) in batches:
            if chunk is not None:
                recent.append((chunk_first, chunk.start, replaced))
                chunk_first += len(chunk.docs)
                replaced += chunk.replaced
                nbytes += chunk.nbytes
            for resume in writer.add_batch(doc_index, flat, lengths):
                recent = _record_cut(out, state, writer, recent, resume)
            doc_index += len(lengths)
            new_tokens += flat.size
            prog.line("tokenizing", docs=doc_index, tokens=tokens + new_tokens, nbytes=nbytes,
                      since=t_start)
    prog.line("tokenizing", docs=doc_index, tokens=tokens + new_tokens, nbytes=nbytes,
              since=t_start, force=True)
    prog.close_line()
    return doc_index, replaced


def _record_cut(out: Path, state: dict[str, Any], writer: _Writer,
                recent: list[tuple[int, Position, int]], resume: int) -> list[tuple[int, Position, int]]:
    k = max(j for j, r in enumerate(recent) if r[0] <= resume)
    first, position, replaced_before = recent[k]
    state["cuts"].append({
        **{s: len(writer.entries[s]) for s in SPLITS},
        "documents": resume, "position": position, "skip": resume - first,
        "replaced_bytes": replaced_before, "any_val": writer.any_val,
    })
    _write_progress(out, state)
    return recent[k:]


def prepare_inputs(inputs: list[str], out_dir: str, **kwargs: Any) -> dict[str, Any]:
    """``alum-ds prepare INPUT... --out DIR``: files, folders, globs, saved datasets, ``hf:NAME``."""
    select = {k: kwargs.pop(k) for k in ("text_field", "split", "hf_config", "streaming") if k in kwargs}
    corpus = expand_inputs(inputs, exclude=Path(out_dir), **select)
    return prepare(corpus=corpus, out_dir=out_dir, source={"inputs": corpus.labels()}, **kwargs)


def embedded_dir(cache_dir: str | Path, *, vocab_size: int, seed: int) -> Path:
    """Where the embedded corpus prepared with these options lives in ``cache_dir``."""
    return Path(cache_dir) / f"embedded-{embedded_fingerprint()}-v{vocab_size}-s{seed}-f{S.VERSION}"


def ensure_embedded(cache_dir: str | Path, *, vocab_size: int, seed: int) -> Path:
    """Prepare the embedded default corpus once per (corpus, options) and reuse it after."""
    out = embedded_dir(cache_dir, vocab_size=vocab_size, seed=seed)
    if (out / S.MANIFEST).is_file():
        return out
    docs = embedded_documents()
    # A private scratch name: nodes sharing a cache folder must not delete each other's work.
    tmp = out.with_name(f"{out.name}.partial-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    prepare(documents=docs, out_dir=tmp, vocab_size=vocab_size, seed=seed,
            source={"inputs": ["embedded:pydoc_data.topics", "embedded:stdlib-docstrings"]}, progress=False)
    try:
        tmp.rename(out)
    except OSError:
        if not (out / S.MANIFEST).is_file():  # another process finished first: keep theirs
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out
