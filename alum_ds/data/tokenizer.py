"""Tokenizers: learn a byte-level BPE (RoBERTa's scheme) or a WordPiece (BERT's), or load a local
folder of any masked-LM tokenizer (RoBERTa-style <s> </s> or BERT-style [CLS] [SEP])."""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import ByteLevelBPETokenizer, Tokenizer

from alum_ds.data.shards import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# transformers is imported inside the functions that need it: prepare's encoding workers import
# this module for ``WordCacheEncoder`` alone, and transformers would add about 2 s to each
# worker's start.

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
WORDPIECE_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
"""BERT's special tokens, ids 0-4 in this order (BertTokenizer's default vocabulary's order)."""
TOKENIZER_KINDS = ("bpe", "wordpiece")


def learn_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """Learn a byte-level BPE (RoBERTa's scheme: ids 0-4 are <s> <pad> </s> <unk> <mask>)."""
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=True)
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    vocab = bpe.get_vocab()
    merges = _merges(bpe)
    # transformers 5 takes vocab=/merges= (vocab_file= is silently ignored; see docs/DESIGN.md).
    tok = RobertaTokenizerFast(vocab=vocab, merges=merges)
    if len(tok) != len(vocab):
        raise DataError(
            f"tokenizer construction lost tokens ({len(tok)} of {len(vocab)}): "
            "incompatible transformers version"
        )
    return tok


def learn_wordpiece(texts: Iterable[str] | Callable[[], Iterable[str]], vocab_size: int, *,
                    lowercase: bool = True, limit_alphabet: int = 1000) -> PreTrainedTokenizerBase:
    """Learn a WordPiece (BERT's scheme: BertNormalizer, lower-casing and accent stripping as
    bert-base-uncased by default, BERT's pre-tokenizer, ``##`` continuations, at most
    ``limit_alphabet`` characters; ids 0-4 are [PAD] [UNK] [CLS] [SEP] [MASK]), as transformers'
    ``BertTokenizerFast``. ``texts`` is read twice (the alphabet, then the training): a list, or a
    function returning a fresh iterable (a generator would be kept in memory).

    The result depends on the texts alone. tokenizers' WordPiece trainer (0.23) is not
    deterministic by itself: it numbers the ``##c`` symbols in hash-map order, so merges of equal
    count were broken differently from run to run (another vocabulary each time), and the
    alphabet limit cut ties among rare characters at random. Here the alphabet is counted first
    and passed in fixed (``initial_alphabet``, with a limit of its own size), and the ``##c`` of
    every character that can continue a word is numbered beforehand, in code point order."""
    from tokenizers import models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    if callable(texts):
        docs = texts
    else:
        kept = texts if isinstance(texts, (list, tuple)) else list(texts)
        docs = lambda: kept  # noqa: E731
    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                      lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    alphabet = _alphabet(docs(), norm, limit_alphabet)
    # "##c" exists only for characters that can follow another inside a word (not punctuation,
    # not CJK, which the normaliser and pre-tokenizer always split off).
    continuing = [f"##{c}" for c in alphabet if len(pre.pre_tokenize_str(norm.normalize_str(f"a{c}"))) == 1]
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer, wp.pre_tokenizer = norm, pre
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, continuing_subword_prefix="##",
        special_tokens=WORDPIECE_SPECIAL_TOKENS + continuing, initial_alphabet=alphabet,
        limit_alphabet=len(alphabet))
    wp.train_from_iterator(docs(), trainer)
    vocab = wp.get_vocab()
    # transformers 5 takes vocab= (a dict) and builds the same normalizer and pre-tokenizer.
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=lowercase, strip_accents=None,
                            tokenize_chinese_chars=True)
    if len(tok) != len(vocab) or tok.convert_tokens_to_ids(WORDPIECE_SPECIAL_TOKENS) != list(range(5)):
        raise DataError(
            f"tokenizer construction lost or moved tokens ({len(tok)} of {len(vocab)}): "
            "incompatible transformers version"
        )
    return tok


_ALPHABET_BATCH = 1 << 22  # characters counted per bincount


def _alphabet(texts: Iterable[str], norm: Any, limit: int) -> list[str]:
    """The ``limit`` most frequent characters of the normalised texts (ties by code point), in
    code point order. Counted on the raw text and mapped through the normaliser character by
    character (it is per character: lower-casing, accent stripping, control removal), so the
    pass costs about a second per GiB."""
    counts = np.zeros(0x110000, dtype=np.int64)
    batch: list[str] = []
    size = 0

    def flush() -> None:
        cps = np.frombuffer("".join(batch).encode("utf-32-le", "surrogatepass"), dtype="<u4")
        counts[: cps.max(initial=0) + 1] += np.bincount(cps)
        batch.clear()

    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= _ALPHABET_BATCH:
            flush()
            size = 0
    if batch:
        flush()
    normalized: dict[str, int] = {}
    for cp in np.flatnonzero(counts):
        if 0xD800 <= cp < 0xE000:  # lone surrogates: not text the tokenizer can take
            continue
        for c in norm.normalize_str(chr(cp)):
            if not c.isspace():
                normalized[c] = normalized.get(c, 0) + int(counts[cp])
    top = sorted(normalized, key=lambda c: (-normalized[c], ord(c)))[:limit]
    return sorted(top, key=ord)


def learn_tokenizer(kind: str, texts: Callable[[], Iterable[str]],
                    vocab_size: int) -> PreTrainedTokenizerBase:
    """``learn_bpe`` or ``learn_wordpiece`` by ``kind`` (one of ``TOKENIZER_KINDS``); ``texts``
    returns a fresh iterable of the training texts each call (WordPiece reads them twice)."""
    if kind == "bpe":
        return learn_bpe(texts(), vocab_size)
    if kind == "wordpiece":
        return learn_wordpiece(texts, vocab_size)
    raise DataError(f"tokenizer kind {kind!r}: choose from {', '.join(TOKENIZER_KINDS)}")


def _merges(bpe: ByteLevelBPETokenizer) -> list[tuple[str, str]]:
    model = json.loads(bpe._tokenizer.to_str())["model"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]


def sequence_ids(tok: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """The ids that open and close a packed sequence: <s> and </s> (bos, eos) where the tokenizer
    has them, else BERT's [CLS] and [SEP] (a BERT tokenizer has no bos/eos)."""
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    return bos, eos


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a local tokenizer folder; refuse one that cannot frame and mask sequences: it needs a
    mask and a pad token, and <s> </s> (RoBERTa style) or [CLS] [SEP] (BERT style)."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise DataError(f"tokenizer folder {p} not found")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer folder {p} does not load: {str(e).splitlines()[0]}") from None
    bos, eos = sequence_ids(tok)
    for name, value in (("mask token", tok.mask_token_id), ("pad token", tok.pad_token_id),
                        ("bos/cls token", bos), ("eos/sep token", eos)):
        if value is None:
            raise DataError(f"tokenizer in {p} has no {name}; a masked-LM tokenizer is required "
                            "(<s> </s> <pad> <mask> as RoBERTa's, or [CLS] [SEP] [PAD] [MASK] as BERT's)")
    return tok


# Encoding for prepare -------------------------------------------------------------------------

CACHE_WORDS = 1 << 20
"""Distinct words the encoder keeps (about 150 MB at most); the cache starts afresh when full."""
MAX_CACHED_WORD = 256
"""Longer words are encoded each time (as the Rust BPE's own cache does): they rarely repeat."""
# The byte-level pre-tokenizer's split (GPT-2's), over letters, numbers and white space.
_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?[{L}]+| ?[{N}]+| ?[^{S}{L}{N}]+|[{S}]+(?![^{S}])|[{S}]+"
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_SUPPORTED_POST = {None, "RobertaProcessing", "ByteLevel", "TemplateProcessing", "BertProcessing"}


def _byte_alphabet() -> list[str]:
    """The character standing for each byte in byte-level BPE (GPT-2's table: printable Latin-1
    bytes stand for themselves, the rest for 256, 257, ...)."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = [""] * 256, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _class(pred: Any) -> str:
    """A regex character class body of the Basic Multilingual Plane's characters for which
    ``pred`` holds (other planes are verified per character, see ``WordCacheEncoder``)."""
    parts, lo = [], None
    for i in range(0x10001):
        inside = i < 0x10000 and pred(chr(i))
        if inside and lo is None:
            lo = i
        elif not inside and lo is not None:
            a, b = re.escape(chr(lo)), re.escape(chr(i - 1))
            parts.append(a if lo == i - 1 else f"{a}-{b}")
            lo = None
    return "".join(parts)


@functools.lru_cache(maxsize=1)
def _split_regex() -> re.Pattern[str]:
    cat = unicodedata.category
    letters = _class(lambda c: cat(c)[0] == "L")
    numbers = _class(lambda c: cat(c)[0] == "N")
    # Python's \s also holds the ASCII separators 0x1C-0x1F, Unicode's White_Space (the Rust
    # engine's \s) does not.
    space = _class(lambda c: c.isspace() and not "\x1c" <= c <= "\x1f")
    return re.compile(_SPLIT.replace("{L}", letters).replace("{N}", numbers).replace("{S}", space))


class WordCacheEncoder:
    """Token ids of a byte-level BPE tokenizer, equal to its Rust ``encode`` without special
    tokens, at a fraction of the cost.

    The Rust pipeline builds, per word, several strings, an alignment table per byte and a token
    object per id (profiling shows allocation is half its time). Here a document is split into
    words by the pre-tokenizer's own regular expression (compiled for Python's ``re``), and each
    distinct word is encoded once, by the tokenizer's own BPE model, and then taken from a cache
    as packed ids. Python's character classes may differ from the Rust regex engine's (another
    Unicode version, another notion of white space), so every character outside ASCII is first
    checked once against the tokenizer's own pre-tokenizer in contexts that reveal its class;
    a document holding a character that disagrees (or any character another check cannot vouch
    for) goes to the Rust tokenizer. ASCII is checked the same way when the encoder is built.
    """

    def __init__(self, backend: Tokenizer, dtype: np.dtype) -> None:
        self.backend, self.dtype = backend, np.dtype(dtype)
        self._pre = backend.pre_tokenizer
        self._model = backend.model
        self._split = _split_regex().findall
        self._bytes = _byte_alphabet()
        self._cache: dict[str, bytes] = {}
        self._safe: set[str] = set()
        self._unsafe: set[str] = set()
        self.ascii_ok = all(self._agrees(chr(i)) for i in range(128))

    @staticmethod
    def supports(backend: Tokenizer) -> bool:
        """Whether ``backend`` is a tokenizer this encoder reproduces exactly: byte-level BPE
        without a normalizer or dropout, whose added tokens are all special (with
        ``encode_special_tokens`` set, they are then plain text), and whose post-processor
        only adds special tokens."""
        try:
            t = json.loads(backend.to_str())
        except (ValueError, TypeError):
            return False
        pre, model, post = t.get("pre_tokenizer") or {}, t.get("model") or {}, t.get("post_processor")
        return (
            backend.encode_special_tokens
            and t.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space")
            and model.get("type") == "BPE" and model.get("dropout") in (None, 0, 0.0)
            and all(a.get("special") for a in t.get("added_tokens") or [])
            and (post or {}).get("type") in _SUPPORTED_POST
            and not t.get("truncation") and not t.get("padding")
        )

    def _bytelevel(self, word: str) -> str:
        b = self._bytes
        return "".join([b[x] for x in word.encode("utf-8")])

    def _agrees(self, c: str) -> bool:
        """Whether ``c`` splits alike here and in the Rust pre-tokenizer: next to a letter, a
        digit, a symbol, a space, itself and a line end, it joins or separates from each
        exactly when its class (letter, number, white space, other) says so."""
        probe = f"a{c} 1{c} !{c} {c}{c}\n{c}a {c}"
        try:
            want = [w for w, _ in self._pre.pre_tokenize_str(probe)]
            got = [self._bytelevel(w) for w in self._split(probe)]
        except (UnicodeEncodeError, ValueError, TypeError):  # lone surrogates
            return False
        return want == got

    def _checked(self, doc: str) -> bool:
        if doc.isascii():
            return self.ascii_ok
        chars = set("".join(set(_NON_ASCII.findall(doc))))
        new = chars - self._safe - self._unsafe
        for c in new:
            (self._safe if self._agrees(c) else self._unsafe).add(c)
        return not (chars & self._unsafe)

    def _miss(self, word: str) -> bytes:
        ids = [t.id for t in self._model.tokenize(self._bytelevel(word))]
        packed = np.asarray(ids, dtype=self.dtype).tobytes()
        if len(word) <= MAX_CACHED_WORD:
            if len(self._cache) >= CACHE_WORDS:
                self._cache.clear()
            self._cache[word] = packed
        return packed

    def _encode(self, doc: str) -> bytes:
        words = self._split(doc)
        try:
            # All in C when every word is cached, the usual case after the first documents.
            return b"".join(map(self._cache.__getitem__, words))
        except KeyError:
            get, miss = self._cache.get, self._miss
            return b"".join([get(w) or miss(w) for w in words])

    def encode_batch(self, docs: list[str]) -> tuple[np.ndarray, list[int]]:
        """The ids of ``docs`` concatenated, and each document's length."""
        packed, lengths = self.encode_packed(docs)
        return np.frombuffer(packed, dtype=self.dtype), lengths

    def encode_packed(self, docs: list[str]) -> tuple[bytes, list[int]]:
        """``encode_batch`` with the ids as the bytes of an array of ``dtype``: what a worker
        process sends back (bytes pickle as one copy, a list of ints as an object per id)."""
        packed: list[bytes] = [b""] * len(docs)
        rest = []
        for i, d in enumerate(docs):
            if self._checked(d):
                packed[i] = self._encode(d)
            else:
                rest.append(i)
        if rest:
            encs = self.backend.encode_batch_fast([docs[i] for i in rest], add_special_tokens=False)
            for i, e in zip(rest, encs):
                packed[i] = np.asarray(e.ids, dtype=self.dtype).tobytes()
        size = self.dtype.itemsize
        return b"".join(packed), [len(p) // size for p in packed]
