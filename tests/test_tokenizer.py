"""Pins ``alum_ds.data.tokenizer``: the saved tokenizer loads with RoBERTa's special tokens, and the
word-cache encoder gives the Rust tokenizer's ids or declines tokenizers it cannot match."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from alum_ds.data.corpus import embedded_documents
from alum_ds.data.shards import read_manifest
from tests._data_helpers import TRICKY, VOCAB


def test_saved_tokenizer_loads(data_dir: Path) -> None:
    m = read_manifest(data_dir)["tokenizer"]
    tok = AutoTokenizer.from_pretrained(str(data_dir / m["dir"]))
    assert len(tok) == m["vocab_size"] == VOCAB
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (
        m["bos_id"], m["eos_id"], m["pad_id"], m["mask_id"])
    assert sorted(set(tok.all_special_ids)) == m["special_ids"]
    enc = tok("x = 1", add_special_tokens=True)["input_ids"]
    assert enc[0] == m["bos_id"] and enc[-1] == m["eos_id"]


def test_word_cache_encoder_matches_rust(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import Tokenizer

    from alum_ds.data import tokenizer as T

    backend = Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json"))
    backend.encode_special_tokens = True
    assert T.WordCacheEncoder.supports(backend)
    docs = TRICKY + embedded_documents()[:20]
    want = [e.ids for e in backend.encode_batch_fast(docs, add_special_tokens=False)]

    def check(enc: T.WordCacheEncoder) -> None:
        for batch in (docs, docs[::-1]):  # a second pass runs from the cache
            flat, lengths = enc.encode_batch(batch)
            expect = want if batch is docs else want[::-1]
            assert lengths == [len(w) for w in expect]
            assert flat.dtype == np.uint16 and flat.tolist() == list(itertools.chain(*expect))

    enc = T.WordCacheEncoder(backend, np.dtype(np.uint16))
    assert enc.ascii_ok
    check(enc)
    assert {"\xa0", "\u00e9", "\U0001f600"} <= enc._safe
    # Letters and digits beyond the Basic Multilingual Plane are left to the Rust tokenizer.
    assert enc._unsafe == {"\U00020000", "\U0001d400", "\U0001d7ce"}
    # A character that disagrees sends its documents to the Rust tokenizer, with equal results.
    monkeypatch.setattr(T.WordCacheEncoder, "_agrees", lambda self, c: c != "\u00e9")
    enc = T.WordCacheEncoder(backend, np.dtype(np.uint16))
    check(enc)
    assert "\u00e9" in enc._unsafe
    monkeypatch.undo()
    monkeypatch.setattr(T, "CACHE_WORDS", 7)  # the cache starts afresh many times
    check(T.WordCacheEncoder(backend, np.dtype(np.uint16)))


def test_word_cache_encoder_declines_other_tokenizers(data_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers

    from alum_ds.data.tokenizer import WordCacheEncoder

    def fresh() -> Tokenizer:
        t = Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json"))
        t.encode_special_tokens = True
        return t

    assert WordCacheEncoder.supports(fresh())
    t = fresh()
    t.encode_special_tokens = False  # "<s>" in text would become a special id
    assert not WordCacheEncoder.supports(t)
    t = fresh()
    t.normalizer = normalizers.Lowercase()
    assert not WordCacheEncoder.supports(t)
    t = fresh()
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not WordCacheEncoder.supports(t)
    t = fresh()
    t.add_tokens([AddedToken("hello", special=False)])  # split out before pre-tokenizing
    assert not WordCacheEncoder.supports(t)
