"""WordPiece (BERT-style) tokenizers on the data side: learning one, loading BERT-style folders,
``alum-ds prepare --tokenizer-kind wordpiece`` end to end, [CLS] ... [SEP] packing, and masking
that never touches [CLS]/[SEP]/[PAD]."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from alum_ds.cli import main
from alum_ds.config import MaskingConfig
from alum_ds.data.corpus import embedded_documents
from alum_ds.data.encoding import encoding_backend
from alum_ds.data.masking import word_start_table
from alum_ds.data.shards import DataError, open_split, read_manifest
from alum_ds.data.stream import TrainStream
from alum_ds.data.tokenizer import (
    WORDPIECE_SPECIAL_TOKENS,
    WordCacheEncoder,
    learn_bpe,
    learn_wordpiece,
    load_tokenizer,
    sequence_ids,
)

DOCS = embedded_documents()[:120]
SEQ = 64


@pytest.fixture(scope="module")
def wordpiece():
    return learn_wordpiece(DOCS, 600)


def test_learned_wordpiece_is_berts_scheme(wordpiece, tmp_path: Path) -> None:
    from tokenizers import BertWordPieceTokenizer

    tok = wordpiece
    assert tok.convert_tokens_to_ids(WORDPIECE_SPECIAL_TOKENS) == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (
        0, 1, 2, 3, 4)
    assert tok.bos_token_id is None and tok.eos_token_id is None
    assert sequence_ids(tok) == (2, 3)
    assert 300 < len(tok) <= 600
    assert any(t.startswith("##") for t in tok.get_vocab())
    # The saved tokenizer encodes exactly as the learned WordPiece model (same normaliser,
    # pre-tokenizer and vocabulary), and loads back as transformers' BERT tokenizer.
    wp = BertWordPieceTokenizer(vocab=tok.get_vocab(), lowercase=True, strip_accents=None)
    text = "The Naïve CAFÉ: while-loops, 中文 and unknownzzzq tokens!"
    assert tok(text, add_special_tokens=False)["input_ids"] == wp.encode(text, add_special_tokens=False).ids
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert type(again).__name__ == "BertTokenizer" and len(again) == len(tok)
    assert again(text)["input_ids"][0] == 2 and again(text)["input_ids"][-1] == 3


def test_learning_is_deterministic(wordpiece) -> None:
    """The same texts give the same vocabulary, ids included (tokenizers' own WordPiece trainer
    numbers its ## symbols in hash-map order: four trainings here gave up to four vocabularies).
    Texts may be a list or a function returning a fresh iterable."""
    want = wordpiece.get_vocab()
    for _ in range(3):
        assert learn_wordpiece(lambda: iter(DOCS), 600).get_vocab() == want


def test_alphabet_limit_keeps_the_most_frequent_characters() -> None:
    docs = ["aaaa bbb cc d", "AAAA éé"]  # normalised: a x8, b x3, c x2, e x2, d x1
    tok = learn_wordpiece(docs, 100, limit_alphabet=3)
    vocab = tok.get_vocab()
    assert {"a", "b"} <= set(vocab) and "d" not in vocab
    assert ("c" in vocab) != ("e" in vocab) and "c" in vocab  # the tie goes to the lower code point
    assert tok("d", add_special_tokens=False)["input_ids"] == [1]  # [UNK]


def test_wordpiece_goes_to_the_rust_encoder(wordpiece, tmp_path: Path) -> None:
    """The word-cache encoder reproduces byte-level BPE only: a WordPiece backend (normaliser,
    BERT pre-tokenizer) must fall back to the Rust tokenizer."""
    wordpiece.save_pretrained(tmp_path / "wp")
    backend = encoding_backend(Tokenizer.from_file(str(tmp_path / "wp" / "tokenizer.json")))
    assert not WordCacheEncoder.supports(backend)
    learn_bpe(DOCS[:40], 400).save_pretrained(tmp_path / "bpe")
    bpe = Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    assert WordCacheEncoder.supports(encoding_backend(bpe))


def test_load_tokenizer_refuses_one_without_a_mask_token(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b"])}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer()
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            unk_token="[UNK]").save_pretrained(tmp_path)
    with pytest.raises(DataError, match="has no mask token") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_word_starts_follow_wordpiece_continuations() -> None:
    vocab = {"[CLS]": 0, "play": 1, "##ing": 2, "##s": 3, ",": 4, "Ġthe": 5}
    table = word_start_table(vocab, np.array([0]), continuation_prefix="##")
    assert table.tolist() == [True, True, False, False, True, True]
    # Byte-level BPE's rule is unchanged: a leading space starts a word.
    assert word_start_table(vocab, np.array([0])).tolist() == [True, False, False, False, False, True]


def _paragraphs(docs: list[str]) -> str:
    return "\n\n".join(" ".join(d.split()) for d in docs)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wp")
    corpus = root / "corpus.txt"
    # One document per paragraph; "[MASK]" and "[CLS]" in the text are text, not special ids.
    corpus.write_text(_paragraphs(DOCS) + "\n\nliteral [MASK] and [CLS] text\n")
    out = root / "data"
    assert main(["prepare", str(corpus), "--tokenizer-kind", "wordpiece", "--vocab-size", "600",
                 "--out", str(out), "--quiet"]) == 0
    return out


def test_prepare_wordpiece_end_to_end(prepared: Path) -> None:
    m = read_manifest(prepared)["tokenizer"]
    assert (m["bos_id"], m["eos_id"], m["pad_id"], m["mask_id"]) == (2, 3, 0, 4)
    assert m["special_ids"] == [0, 1, 2, 3, 4]
    tok = load_tokenizer(prepared / "tokenizer")
    assert type(tok).__name__ == "BertTokenizer" and len(tok) == m["vocab_size"]
    shards = [*open_split(prepared, "train"), *open_split(prepared, "validation")]
    ids = np.concatenate([s.tokens for s in shards])
    assert ids.size > 1000 and not np.isin(ids, [0, 2, 3, 4]).any()  # no special id in the text
    literal = tok("literal [MASK] and [CLS] text", add_special_tokens=False)["input_ids"]
    assert 4 in literal and 2 in literal  # as model input, the usual special ids...
    docs = [tok.decode(s.tokens[s.offsets[i]:s.offsets[i + 1]].tolist())
            for s in shards for i in range(s.offsets.size - 1)]
    assert len(docs) == len(DOCS) + 1
    assert "literal [ mask ] and [ cls ] text" in docs  # ...but corpus text stays text


def test_packed_sequences_are_cls_sep_and_masking_spares_specials(prepared: Path) -> None:
    for whole_word in (False, True):
        cfg = MaskingConfig(prob=0.5, whole_word=whole_word)  # many selections: a strict check
        stream = TrainStream(prepared, seq_len=SEQ, seed=3, masking=cfg)
        raw = stream.seqs.get(np.arange(min(len(stream.seqs), 16)))
        assert (raw[:, 0] == 2).all() and (raw[:, -1] == 3).all()  # [CLS] ... [SEP]
        inputs, labels = stream.batch_at(0, 16)
        tokens = stream.seqs.get(stream.at(np.arange(16))[1])
        special = np.isin(tokens, [0, 1, 2, 3, 4])
        assert special[:, 0].all() and special[:, -1].all()
        assert (labels[special] == -100).all()  # never selected
        assert (inputs[special] == tokens[special]).all()  # never replaced
        selected = labels != -100
        assert selected.mean() > 0.3
        assert not np.isin(inputs[~selected & ~special], [0, 2, 3]).any()
        # Random replacements never bring a special token in.
        assert not np.isin(inputs[selected], [0, 1, 2, 3]).any()
        if whole_word:  # a continuation (##) is selected exactly when the token before it is
            vocab = load_tokenizer(prepared / "tokenizer").get_vocab()
            cont = np.zeros(len(vocab), dtype=bool)
            cont[[i for t, i in vocab.items() if t.startswith("##")]] = True
            # (a continuation right after a special token, where a sequence cuts a word, starts one)
            c = cont[tokens[:, 1:]] & ~special[:, :-1]
            assert c.any()
            assert (selected[:, 1:][c] == selected[:, :-1][c]).all()
            # ...and words are WordPiece words, not the stretches between special tokens.
            starts = ~cont[tokens[:, 1:]] & ~special[:, 1:] & ~special[:, :-1]
            assert (selected[:, 1:][starts] != selected[:, :-1][starts]).any()


def test_tokenizer_kind_is_part_of_the_fingerprint(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text(_paragraphs(DOCS[:60]))
    out = tmp_path / "d"
    assert main(["prepare", str(corpus), "--vocab-size", "400", "--out", str(out), "--quiet"]) == 0
    assert read_manifest(out)["tokenizer"]["bos_id"] == 0  # <s>
    assert main(["prepare", str(corpus), "--vocab-size", "400", "--out", str(out), "--quiet",
                 "--tokenizer-kind", "wordpiece"]) == 0
    assert read_manifest(out)["tokenizer"]["bos_id"] == 2  # [CLS]: prepared afresh
    cfg = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert cfg["model"]["type"] == "WordPiece"


def test_tokenizer_kind_with_a_loaded_tokenizer_is_refused(prepared: Path, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text here\n")
    rc = main(["prepare", str(corpus), "--out", str(tmp_path / "o"), "--tokenizer",
               str(prepared / "tokenizer"), "--tokenizer-kind", "wordpiece", "--quiet"])
    assert rc != 0 and "--tokenizer-kind wordpiece" in capsys.readouterr().err
    # A BERT-style folder passed as --tokenizer is accepted and frames with [CLS]/[SEP].
    corpus.write_text(_paragraphs(DOCS[:30]))
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "o2"), "--tokenizer",
                 str(prepared / "tokenizer"), "--quiet"]) == 0
    m = read_manifest(tmp_path / "o2")["tokenizer"]
    assert (m["bos_id"], m["eos_id"], m["mask_id"]) == (2, 3, 4)
