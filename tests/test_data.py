"""The data path on small corpora: prepare, shards, packing, the resumable stream, masking, errors."""

from __future__ import annotations

import itertools
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from alum_ds.cli import main
from alum_ds.config import MaskingConfig
from alum_ds.data import prepare as P
from alum_ds.data.corpus import embedded_documents
from alum_ds.data.masking import mask_batch
from alum_ds.data.shards import MANIFEST, DataError, open_split, read_manifest, verify_folder, write_shard
from alum_ds.data.stream import PackedSequences, TrainStream

VOCAB = 500
SEQ_LEN = 64
SEED = 17


def _write_corpus(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _prepare(inputs: list[Path], out: Path, **kw) -> dict:
    kw.setdefault("vocab_size", VOCAB)
    kw.setdefault("progress", False)
    return P.prepare_inputs([str(i) for i in inputs], str(out), **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt", embedded_documents()[:40])


@pytest.fixture(scope="module")
def data_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared folder with train and validation splits; tests that damage it use a copy."""
    out = tmp_path_factory.mktemp("prepared") / "data"
    _prepare([corpus], out)
    return out


@pytest.fixture()
def damaged(data_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    return out


def _stream(d: Path, seed: int = SEED, masking: MaskingConfig | None = None) -> TrainStream:
    return TrainStream(d, seq_len=SEQ_LEN, seed=seed, masking=masking or MaskingConfig())


def _one_line(e: pytest.ExceptionInfo, *needles: object) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert str(n) in msg, (n, msg)
    return msg


def _unmask(inputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The original tokens: labels where selected, inputs elsewhere."""
    return np.where(labels != -100, labels, inputs)


# 1. Round trip -------------------------------------------------------------------------------


def test_round_trip_across_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One document per line: more documents than one encoding batch (1024), and a tiny shard
    # size, so the train split spans several shards and sequences cross shard boundaries.
    lines = [ln.strip() for d in embedded_documents()[:40] for ln in d.splitlines() if ln.strip()]
    assert len(lines) > 1024
    src = _write_corpus(tmp_path / "lines.txt", lines)
    monkeypatch.setattr(P, "SHARD_TOKENS", 2000)
    out = tmp_path / "data"
    m = _prepare([src], out, val_fraction=0.0)
    assert len(m["splits"]["train"]) >= 2
    assert m["source"]["documents"] == len(lines)

    docs = list(P.read_documents([src]))
    assert docs == lines
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    eos, bos = m["tokenizer"]["eos_id"], m["tokenizer"]["bos_id"]
    expected = np.concatenate([np.asarray(ids + [eos], dtype=np.int64)
                               for ids in tok(docs, add_special_tokens=False)["input_ids"]])

    seqs = PackedSequences(out, "train", SEQ_LEN)
    body = SEQ_LEN - 2
    assert seqs.stream_tokens == expected.size
    assert len(seqs) == expected.size // body and expected.size - len(seqs) * body < body
    got = seqs.get(np.arange(len(seqs)))
    assert got.shape == (len(seqs), SEQ_LEN)
    assert (got[:, 0] == bos).all() and (got[:, -1] == eos).all()
    np.testing.assert_array_equal(got[:, 1:-1].reshape(-1), expected[: len(seqs) * body])
    # Random access in any order gives the same rows.
    ids = np.random.default_rng(0).permutation(len(seqs))[:50]
    np.testing.assert_array_equal(seqs.get(ids), got[ids])


def test_splits_hold_every_document(data_dir: Path) -> None:
    m = read_manifest(data_dir)
    per_split = {s: sum(e["documents"] for e in m["splits"][s]) for s in ("train", "validation")}
    assert per_split["validation"] > 0 and per_split["train"] > per_split["validation"]
    assert sum(per_split.values()) == m["source"]["documents"]
    for split in ("train", "validation"):
        got = PackedSequences(data_dir, split, SEQ_LEN).get(np.arange(1))
        assert got[0, 0] == m["tokenizer"]["bos_id"] and got[0, -1] == m["tokenizer"]["eos_id"]


def test_literal_special_token_text_is_plain_text(tmp_path: Path) -> None:
    # Web text holds "<s>" (HTML strike-through) and the like: it must not become <s>, </s>
    # or <mask> ids inside a sequence body.
    docs = embedded_documents()[:40] + ["struck <s>out</s> text, a <mask> and <pad> here"]
    out = tmp_path / "data"
    m = _prepare([_write_corpus(tmp_path / "c.txt", docs)], out, val_fraction=0.0)
    special = m["tokenizer"]["special_ids"]
    for shard in open_split(out, "train"):
        assert not np.isin(np.asarray(shard.tokens), special).any()


def test_crlf_text_splits_into_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "crlf.txt").write_bytes(b"first para\r\nline two\r\n\r\nsecond para\r\n\r\nthird\r\n")
    assert list(P.read_documents([tmp_path / "crlf.txt"])) == [
        "first para\nline two", "second para", "third"]


# 2. Determinism ------------------------------------------------------------------------------


def _manifest_without_timing(d: Path) -> dict:
    m = json.loads((d / MANIFEST).read_text())
    m.pop("seconds")
    return m


def test_prepare_is_deterministic(corpus: Path, data_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    _prepare([corpus], again)
    files = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert not [f for f in files if f.name.endswith(".tmp")]
    for f in files:
        if f.name != MANIFEST:
            assert (data_dir / f).read_bytes() == (again / f).read_bytes(), f
    assert _manifest_without_timing(data_dir) == _manifest_without_timing(again)
    # Preparing over an existing folder gives the same folder again.
    _prepare([corpus], again)
    assert _manifest_without_timing(data_dir) == _manifest_without_timing(again)


# 3. Partition --------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_partition_each_epoch(data_dir: Path, world: int) -> None:
    micro = 5
    ranks = [_stream(data_dir) for _ in range(world)]
    n = len(ranks[0].seqs)
    per_step = world * micro
    steps = -(-n // per_step)  # the last step may run into the next epoch
    seen: list[list[np.ndarray]] = [[] for _ in range(world)]
    for step in range(steps):
        for r, s in enumerate(ranks):
            inputs, labels = s.next_for_rank(rank=r, world=world, micro_batch=micro)
            pos = step * per_step + r * micro + np.arange(micro, dtype=np.int64)
            epochs, ids, _ = s.at(pos)
            # What the rank got is exactly the sequences at its global positions.
            np.testing.assert_array_equal(_unmask(inputs, labels), s.seqs.get(ids))
            bi, bl = s.batch_at(int(pos[0]), micro)
            np.testing.assert_array_equal(inputs, bi)
            np.testing.assert_array_equal(labels, bl)
            seen[r].append(ids[epochs == 0])
    for s in ranks:
        assert s.state.consumed == steps * per_step
    sets = [np.concatenate(x) for x in seen]
    for r in range(world):
        assert np.unique(sets[r]).size == sets[r].size
        for q in range(r + 1, world):
            assert np.intersect1d(sets[r], sets[q]).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate(sets)), np.arange(n))


def test_epoch_orders_differ_and_repeat(data_dir: Path) -> None:
    a, b = _stream(data_dir), _stream(data_dir)
    n = len(a.seqs)
    e0, e1 = a.order(0).copy(), a.order(1).copy()
    assert not np.array_equal(e0, e1)
    np.testing.assert_array_equal(np.sort(e1), np.arange(n))
    np.testing.assert_array_equal(b.order(1), e1)
    np.testing.assert_array_equal(b.order(0), e0)
    assert not np.array_equal(_stream(data_dir, seed=SEED + 1).order(0), e0)


# 4. Resume -----------------------------------------------------------------------------------


def test_resume_yields_the_same_batches(data_dir: Path) -> None:
    micro = 6
    a = _stream(data_dir)
    n = len(a.seqs)
    steps_before = n // micro - 2  # the batches after the resume cross into epoch 1
    for _ in range(steps_before):
        a.next_for_rank(rank=0, world=1, micro_batch=micro)
    state = json.loads(json.dumps(a.state_dict()))  # as a checkpoint would store it
    b = _stream(data_dir)
    b.load_state_dict(state)
    assert b.state.consumed == a.state.consumed and b.epoch == a.epoch == 0
    for _ in range(5):
        ia, la = a.next_for_rank(rank=0, world=1, micro_batch=micro)
        ib, lb = b.next_for_rank(rank=0, world=1, micro_batch=micro)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)
    assert a.epoch == b.epoch == 1


def test_resume_two_ranks_on_one(data_dir: Path) -> None:
    micro, world = 4, 2
    ranks = [_stream(data_dir) for _ in range(world)]
    for _ in range(7):
        for r, s in enumerate(ranks):
            s.next_for_rank(rank=r, world=world, micro_batch=micro)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    resumed = [_stream(data_dir) for _ in range(world)]
    single = _stream(data_dir)
    for s in [*resumed, single]:
        s.load_state_dict(state)
    for _ in range(3):
        parts = [s.next_for_rank(rank=r, world=world, micro_batch=micro) for r, s in enumerate(resumed)]
        inputs, labels = single.next_for_rank(rank=0, world=1, micro_batch=world * micro)
        np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), inputs)
        np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), labels)
    assert single.state.consumed == resumed[0].state.consumed == resumed[1].state.consumed


def test_resume_refuses_other_data(data_dir: Path) -> None:
    s = _stream(data_dir)
    with pytest.raises(DataError) as e:
        s.load_state_dict({"consumed": 3, "num_sequences": len(s.seqs) + 1})
    _one_line(e, len(s.seqs) + 1)


# 5. Masking ----------------------------------------------------------------------------------


def test_masking_statistics(data_dir: Path) -> None:
    s = _stream(data_dir)
    n = len(s.seqs)
    inputs, labels = s.batch_at(0, n)
    tokens = s.seqs.get(s.order(0))
    np.testing.assert_array_equal(_unmask(inputs, labels), tokens)
    special = s.special
    candidate = ~np.isin(tokens, special)
    selected = labels != -100
    assert not (selected & ~candidate).any()
    assert (labels[:, 0] == -100).all() and (labels[:, -1] == -100).all()
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])
    assert selected.any(axis=1).all()

    frac = selected.sum() / candidate.sum()
    assert abs(frac - 0.15) < 0.01, frac
    sel_in = inputs[selected]
    masked = sel_in == s.mask_id
    kept = sel_in == labels[selected]
    rand = ~masked & ~kept
    k = selected.sum()
    assert abs(masked.sum() / k - 0.8) < 0.03
    assert abs(rand.sum() / k - 0.1) < 0.03
    assert abs(kept.sum() / k - 0.1) < 0.03
    assert not np.isin(sel_in[rand], special).any()
    assert sel_in[rand].min() >= 0 and sel_in[rand].max() < s.vocab_size


def test_masking_is_a_function_of_seed_epoch_and_sequence(data_dir: Path) -> None:
    s = _stream(data_dir)
    ids = np.arange(40, dtype=np.int64)
    tokens = s.seqs.get(ids)
    kw = dict(seed=SEED, cfg=MaskingConfig(), special_ids=s.special, mask_id=s.mask_id,
              vocab_size=s.vocab_size)
    a = mask_batch(tokens, ids, epoch=0, **kw)
    b = mask_batch(tokens.copy(), ids.copy(), epoch=0, **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # Independent of the batch a sequence is drawn in.
    perm = np.random.default_rng(1).permutation(ids.size)
    c = mask_batch(tokens[perm], ids[perm], epoch=0, **kw)
    np.testing.assert_array_equal(c[0], a[0][perm])
    np.testing.assert_array_equal(c[1], a[1][perm])
    sub = mask_batch(tokens[7:9], ids[7:9], epoch=0, **kw)
    np.testing.assert_array_equal(sub[1], a[1][7:9])
    # Another epoch or seed masks differently.
    for other in (mask_batch(tokens, ids, epoch=1, **kw),
                  mask_batch(tokens, ids, epoch=0, **{**kw, "seed": SEED + 1})):
        assert not np.array_equal(other[1] != -100, a[1] != -100)


def test_masking_never_selects_specials_and_always_labels(data_dir: Path) -> None:
    s = _stream(data_dir)
    m = read_manifest(data_dir)["tokenizer"]
    bos, eos, pad = m["bos_id"], m["eos_id"], m["pad_id"]
    ids = np.arange(300, dtype=np.int64)
    tokens = s.seqs.get(ids)
    tokens[:, SEQ_LEN // 2 : -1] = pad  # padded tails
    tokens[::3, 5] = eos
    tokens[1::3, 6] = bos
    tokens[:, 1] = m["mask_id"]
    kw = dict(epoch=0, seed=SEED, special_ids=s.special, mask_id=s.mask_id, vocab_size=s.vocab_size)
    is_special = np.isin(tokens, s.special)
    for cfg in (MaskingConfig(), MaskingConfig(prob=0.001), MaskingConfig(prob=0.9)):
        inputs, labels = mask_batch(tokens, ids, cfg=cfg, **kw)
        assert (labels[is_special] == -100).all()
        np.testing.assert_array_equal(inputs[is_special], tokens[is_special])
        per_seq = (labels != -100).sum(axis=1)
        assert (per_seq >= 1).all()
        if cfg.prob < 0.01:  # the guaranteed label is nearly all there is
            assert per_seq.mean() < 1.2


# 6. Bad inputs -------------------------------------------------------------------------------


def test_missing_shard_file(damaged: Path) -> None:
    victim = damaged / "train-00000.bin"
    victim.unlink()
    with pytest.raises(DataError) as e:
        PackedSequences(damaged, "train", SEQ_LEN)
    _one_line(e, victim, "missing")


def test_truncated_shard(damaged: Path) -> None:
    victim = damaged / "train-00000.bin"
    data = victim.read_bytes()
    victim.write_bytes(data[:-2])
    with pytest.raises(DataError) as e:
        open_split(damaged, "train")
    _one_line(e, victim, len(data) - 2, len(data))


@pytest.mark.parametrize("name", ["train-00000.bin", "train-00000.idx", "validation-00000.bin"])
def test_corrupted_shard(damaged: Path, name: str) -> None:
    victim = damaged / name
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    split = name.split("-")[0]
    if name.endswith(".bin"):
        open_split(damaged, split)  # same size: only the checksum tells
    with pytest.raises(DataError) as e:
        open_split(damaged, split, verify=True)
    _one_line(e, victim, "sha256")
    with pytest.raises(DataError) as e:
        verify_folder(damaged)
    _one_line(e, victim)


def _edit_manifest(d: Path, edit) -> Path:
    path = d / MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return path


def test_other_format_version(damaged: Path) -> None:
    path = _edit_manifest(damaged, lambda m: m.update(version=99))
    with pytest.raises(DataError) as e:
        read_manifest(damaged)
    _one_line(e, path, "99")
    with pytest.raises(DataError):
        _stream(damaged)


def test_not_a_manifest(damaged: Path) -> None:
    (damaged / MANIFEST).write_text("{not json")
    with pytest.raises(DataError) as e:
        read_manifest(damaged)
    _one_line(e, damaged / MANIFEST)
    (damaged / MANIFEST).unlink()
    with pytest.raises(DataError) as e:
        read_manifest(damaged)
    _one_line(e, damaged / MANIFEST)


@pytest.mark.parametrize("name", ["../train-00000", "sub/../../train-00000", "/etc/passwd"])
def test_shard_name_leaving_the_folder(damaged: Path, name: str) -> None:
    # A copy where the climbing name would lead, so only the refusal can stop it.
    shutil.copy(damaged / "train-00000.bin", damaged.parent / "train-00000.bin")
    shutil.copy(damaged / "train-00000.idx", damaged.parent / "train-00000.idx")
    path = _edit_manifest(damaged, lambda m: m["splits"]["train"][0].update(name=name))
    with pytest.raises(DataError) as e:
        open_split(damaged, "train")
    _one_line(e, path, "refused")
    with pytest.raises(DataError):
        verify_folder(damaged)


def test_missing_data_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as e:
        PackedSequences(missing, "train", SEQ_LEN)
    _one_line(e, missing)


@pytest.mark.parametrize("text", ["", "\n\n  \n\n\t\n"])
def test_empty_corpus(tmp_path: Path, text: str) -> None:
    src = tmp_path / "empty.txt"
    src.write_text(text)
    with pytest.raises(DataError) as e:
        _prepare([src], tmp_path / "data")
    _one_line(e, src, "empty")
    assert not (tmp_path / "data" / MANIFEST).exists()


def test_corpus_shorter_than_one_sequence(tmp_path: Path) -> None:
    src = _write_corpus(tmp_path / "tiny.txt", ["a tiny corpus", "of two documents"])
    out = tmp_path / "data"
    _prepare([src], out, val_fraction=0.0)
    with pytest.raises(DataError) as e:
        PackedSequences(out, "train", SEQ_LEN)
    _one_line(e, out, "seq_len")


def test_bad_json_lines(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "fine"}\n{oops\n')
    with pytest.raises(DataError) as e:
        _prepare([src], tmp_path / "data")
    _one_line(e, f"{src}:2")
    src.write_text('{"body": "no text field"}\n')
    with pytest.raises(DataError) as e:
        _prepare([src], tmp_path / "data")
    _one_line(e, f"{src}:1", "text")


def test_undecodable_bytes_are_replaced_and_counted(tmp_path: Path) -> None:
    docs = embedded_documents()[:40]
    bad = tmp_path / "bad.txt"
    bad.write_bytes("\n\n".join(docs).encode() + b"\n\nbroken \xff\xfe bytes and \xe2\x82 here\n")
    good = _write_corpus(tmp_path / "good.txt", docs)
    for _ in range(2):  # the count belongs to one prepare call, not to the process
        m = _prepare([bad], tmp_path / "bad")
        assert m["source"]["replaced_bytes"] == 4
    assert _prepare([good], tmp_path / "good")["source"]["replaced_bytes"] == 0
    assert _prepare([bad, good], tmp_path / "both")["source"]["replaced_bytes"] == 4
    assert list(P.read_documents([bad]))[-1] == "broken \ufffd\ufffd bytes and \ufffd here"


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("alum-ds: error: "), err
    return err[0]


def test_cli_prepare_missing_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.txt"
    assert main(["prepare", str(missing), "--out", str(tmp_path / "out")]) != 0
    assert str(missing) in _stderr_line(capsys)
    assert main(["prepare", str(missing)]) != 0  # no --out
    _stderr_line(capsys)


def test_cli_prepare_refuses_a_bad_worker_count_before_any_work(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["prepare", str(corpus), "--out", str(out), "--workers", "-1"]) == 2
    monkeypatch.setenv("ALUM_DS_PREPARE_WORKERS", "many")
    assert main(["prepare", str(corpus), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--workers -1" in err and "ALUM_DS_PREPARE_WORKERS='many'" in err
    assert "Traceback" not in err and not out.exists()


def test_cli_prepare_and_verify(corpus: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    assert main(["prepare", str(corpus), "--out", str(out), "--vocab-size", str(VOCAB)]) == 0
    capsys.readouterr()
    assert main(["prepare", "--verify", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"]["tokens"] > 0 and summary["validation"]["documents"] > 0
    victim = out / "train-00000.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["prepare", "--verify", str(out)]) != 0
    assert str(victim) in _stderr_line(capsys)
    assert main(["prepare", "--verify", str(tmp_path / "nowhere")]) != 0
    _stderr_line(capsys)


# 7. Tokenizer --------------------------------------------------------------------------------


def test_saved_tokenizer_loads(data_dir: Path) -> None:
    m = read_manifest(data_dir)["tokenizer"]
    tok = AutoTokenizer.from_pretrained(str(data_dir / m["dir"]))
    assert len(tok) == m["vocab_size"] == VOCAB
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.mask_token_id) == (
        m["bos_id"], m["eos_id"], m["pad_id"], m["mask_id"])
    assert sorted(set(tok.all_special_ids)) == m["special_ids"]
    enc = tok("x = 1", add_special_tokens=True)["input_ids"]
    assert enc[0] == m["bos_id"] and enc[-1] == m["eos_id"]


# Text that splits differently under Python's and the Rust engine's character classes, or that
# exercises the encoder's special cases: ASCII separators (white space to Python only), Unicode
# spaces and line separators, letters and digits of other scripts, a letter outside the Basic
# Multilingual Plane, emoji, combining marks, special-token text, contractions, long words.
TRICKY = [
    "plain ASCII: it's x = 1  +  2\t\tdone\n\n  indented\r\nend   ",
    "sep\x1cfile\x1dgroup\x1erecord\x1funit \x1c \x0b\x0c\x00nul",
    "nbsp\xa0here\u2028line\u2029para\x85nel\u3000ideo\u2003em\u200bzw \u202f\u205f",
    "caf\u00e9 na\u0308ive \u00c5ngstr\u00f6m \u0395\u03bb\u03bb\u03ac\u03b4\u03b1 "
    "\u041c\u043e\u0441\u043a\u0432\u0430",
    "\u6f22\u5b57\u304b\u306a\u30ab\u30ca \ud55c\uad6d\uc5b4 \u0627\u0644\u0639\u0631\u0628\u064a\u0629 "
    "\u0967\u0968\u0969 \u00bd\u2167",
    "\U00020000\U0001d400 bold \U0001f600\U0001f44d\U0001f3fd emoji \U0001d7ce digits",
    "<s> </s> <pad> <mask> <unk> a<s>>b </s>s",
    "they're we've I'm you'll he'd 'S 'T ''s",
    "x" * 300 + " " + "y" * 300 + " " + "x" * 300,
    "   leading and trailing   \n\n\n",
]


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


def test_prepare_ignores_tokenizer_truncation(data_dir: Path, tmp_path: Path) -> None:
    # A tokenizer.json made for model inputs may truncate (or pad): documents must stay whole.
    tok_dir = tmp_path / "tok"
    shutil.copytree(data_dir / "tokenizer", tok_dir)
    j = json.loads((tok_dir / "tokenizer.json").read_text())
    j["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (tok_dir / "tokenizer.json").write_text(json.dumps(j))
    docs = embedded_documents()[:10]
    whole = P.prepare(documents=docs, out_dir=tmp_path / "a", tokenizer=str(data_dir / "tokenizer"),
                      progress=False)
    cut = P.prepare(documents=docs, out_dir=tmp_path / "b", tokenizer=str(tok_dir), progress=False)
    for split in ("train", "validation"):
        assert [e["tokens"] for e in cut["splits"][split]] == [e["tokens"] for e in whole["splits"][split]]
        assert [e["sha256"] for e in cut["splits"][split]] == [e["sha256"] for e in whole["splits"][split]]


# 8. Inputs: Parquet, saved datasets, Hub names, chunked reading ------------------------------


def _shard_bytes(d: Path) -> dict[str, bytes]:
    """Everything prepare wrote that must not depend on how the input was read."""
    names = [p for p in d.iterdir() if p.suffix in (".bin", ".idx")] + [d / "tokenizer" / "tokenizer.json"]
    return {p.name: p.read_bytes() for p in names}


@pytest.fixture(scope="module")
def docs40() -> list[str]:
    """Documents without blank lines inside, so that a text file holds one paragraph each."""
    return [re.sub(r"\n\s*\n", "\n", d) for d in embedded_documents()[:40]]


@pytest.fixture(scope="module")
def reference(docs40: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-memory path: ``prepare(documents=...)`` on a list, with a small shard size."""
    out = tmp_path_factory.mktemp("ref") / "data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(P, "SHARD_TOKENS", 5000)
        P.prepare(documents=docs40, out_dir=out, vocab_size=VOCAB, seed=SEED, progress=False)
    return out


def test_parquet_and_saved_datasets_round_trip(docs40: list[str], reference: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 5000)
    monkeypatch.setattr(sources, "ROWS_PER_CHUNK", 3)  # chunks cut inside row groups
    # Null and blank rows are not documents; another column is ignored.
    rows = docs40[:10] + [None, "  "] + docs40[10:]
    pq.write_table(pa.table({"body": rows, "n": list(range(len(rows)))}), tmp_path / "c.parquet",
                   row_group_size=7)
    ds = datasets.Dataset.from_dict({"text": rows})
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "dd"))
    want = _shard_bytes(reference)
    for inputs, kw in (([tmp_path / "c.parquet"], {"text_field": "body"}), ([tmp_path / "saved"], {}),
                       ([tmp_path / "dd"], {"split": "train"})):
        out = tmp_path / f"out-{inputs[0].name}"
        m = _prepare(inputs, out, seed=SEED, **kw)
        assert m["source"]["documents"] == len(docs40)
        assert _shard_bytes(out) == want, inputs
    with pytest.raises(DataError) as e:
        _prepare([tmp_path / "c.parquet"], tmp_path / "x")  # no "text" column
    _one_line(e, tmp_path / "c.parquet", "body", "--text-field")
    with pytest.raises(DataError) as e:
        _prepare([tmp_path / "dd"], tmp_path / "x", split="validation")
    _one_line(e, "validation", "train", "--split")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError) as e:
        _prepare([tmp_path / "broken.parquet"], tmp_path / "x")
    _one_line(e, tmp_path / "broken.parquet")


def test_hub_name_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    def no_dns(*a: object, **k: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(DataError) as e:
        _prepare(["hf:someone/corpus"], tmp_path / "x", streaming=True)
    _one_line(e, "someone/corpus", "unreachable", "save_to_disk")
    assert main(["prepare", "hf:someone/corpus", "--streaming", "--out", str(tmp_path / "y")]) == 2
    assert "someone/corpus" in _stderr_line(capsys)


def _paragraphs(text: str) -> list[str]:
    """The document rule of text files, applied to a whole file at once."""
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 64])
def test_chunked_text_reading_gives_the_same_documents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       block: int) -> None:
    from alum_ds.data import sources

    monkeypatch.setattr(sources, "BLOCK_BYTES", block)
    rng = np.random.default_rng(block)
    pieces = ["word", " ", "\n", "\r\n", "\r", "\n\n", "\n \n", "\t", "é", "\u2028"]
    text = "".join(rng.choice(pieces, size=600))
    raw = text.encode() + b"tail \xff\xe2\x82\n\n\xc3"  # undecodable bytes too
    f = tmp_path / "t.txt"
    f.write_bytes(raw)
    stats = {"replaced_bytes": 0}
    got = list(P.read_documents([f], stats=stats))
    expected_text, replaced = P.decode_utf8(raw)
    assert got == _paragraphs(expected_text) and len(got) > 20
    assert stats["replaced_bytes"] == replaced == 4


def test_json_lines_split_only_at_newlines(tmp_path: Path) -> None:
    # U+2028 and U+0085 are legal unescaped in JSON strings; str.splitlines would cut there.
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "one\u2028line"}\r\n\n{"text": "two\u0085x", "id": 2}\n{"text": 3}\n',
                   encoding="utf-8")
    assert list(P.read_documents([src])) == ["one\u2028line", "two\u0085x", "3"]


def test_streaming_prepare_matches_in_memory(docs40: list[str], reference: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 5000)
    monkeypatch.setattr(P, "ENCODE_CHARS", 300)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 256)
    # The same documents split over a text file with Windows line ends and a JSON lines file.
    (tmp_path / "a.txt").write_bytes("\r\n\r\n".join(d.replace("\n", "\r\n") for d in docs40[:25]).encode())
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs40[25:]))
    out = tmp_path / "streamed"
    m = _prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], out, seed=SEED)
    assert m["source"]["documents"] == len(docs40)
    assert len(m["splits"]["train"]) >= 3
    assert _shard_bytes(out) == _shard_bytes(reference)
    # A bounded tokenizer sample: deterministic, and not the whole corpus's tokenizer.
    a, b = tmp_path / "sample-a", tmp_path / "sample-b"
    for d in (a, b):
        _prepare([tmp_path / "a.txt", tmp_path / "b.jsonl"], d, seed=SEED, tokenizer_sample_bytes=20_000)
    assert _shard_bytes(a) == _shard_bytes(b)
    tok_json = Path("tokenizer") / "tokenizer.json"
    assert (a / tok_json).read_bytes() != (out / tok_json).read_bytes()


def test_training_documents_follow_the_split_rule(docs40: list[str]) -> None:
    from alum_ds.data.sources import Corpus, DocumentList

    corpus = Corpus([DocumentList(docs40)])
    val = [P._is_validation(i, SEED, 0.05) for i in range(len(docs40))]
    assert any(val)
    assert list(P.training_documents(corpus, seed=SEED, val_fraction=0.05)) == [
        d for d, v in zip(docs40, val) if not v]
    # No document hashes to validation: the last one is held out.
    three = Corpus([DocumentList(docs40[:3])])
    assert list(P.training_documents(three, seed=1, val_fraction=1e-9)) == docs40[:2]
    limited = list(P.training_documents(corpus, seed=SEED, val_fraction=0.05, limit_bytes=5000))
    assert 0 < len(limited) < len(docs40) and sum(len(d.encode()) for d in limited[:-1]) < 5000


def test_output_folder_inside_an_input_folder(docs40: list[str], tmp_path: Path) -> None:
    _write_corpus(tmp_path / "c.txt", docs40)
    first = _prepare([tmp_path], tmp_path / "data")
    again = _prepare([tmp_path], tmp_path / "data", fresh=True)  # its own JSON files are no input
    assert first["source"]["inputs"] == again["source"]["inputs"] == [str(tmp_path / "c.txt")]


# 9. Resume an interrupted prepare, progress lines ------------------------------------------


class _Interrupt(Exception):
    pass


_REAL_WRITE_SHARD = write_shard


def _interrupting(monkeypatch: pytest.MonkeyPatch, after: int) -> list[str]:
    """Make shard writes fail after ``after`` of them; return the names written."""
    from alum_ds.data import shards

    real, written = _REAL_WRITE_SHARD, []

    def write(out: Path, name: str, tokens: np.ndarray, offsets: np.ndarray) -> dict:
        if after and len(written) >= after:
            raise _Interrupt(name)
        written.append(name)
        return real(out, name, tokens, offsets)

    monkeypatch.setattr(shards, "write_shard", write)
    return written


def _lines_corpus(tmp_path: Path) -> Path:
    lines = [ln.strip() for d in embedded_documents()[:30] for ln in d.splitlines() if ln.strip()]
    return _write_corpus(tmp_path / "lines.txt", lines)


def test_interrupted_prepare_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 3000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)  # cuts fall inside chunks
    src = _lines_corpus(tmp_path)
    whole = tmp_path / "whole"
    _prepare([src], whole)

    out = tmp_path / "data"
    written = _interrupting(monkeypatch, after=3)
    with pytest.raises(_Interrupt):
        _prepare([src], out)
    assert not (out / MANIFEST).exists()
    progress = json.loads((out / P.PROGRESS).read_text())
    assert len(progress["cuts"]) == 1 and progress["cuts"][0]["skip"] > 0
    kept = [n for n in written if n.endswith("-00000")]
    assert "train-00000" in kept
    stamps = {n: (out / f"{n}.bin").stat().st_mtime_ns for n in kept}

    written = _interrupting(monkeypatch, after=0)
    m = _prepare([src], out)
    assert not set(kept) & set(written)  # reused, not rewritten
    assert {n: (out / f"{n}.bin").stat().st_mtime_ns for n in kept} == stamps
    assert len(m["splits"]["train"]) >= 4
    assert _shard_bytes(out) == _shard_bytes(whole)
    assert _manifest_without_timing(out) == _manifest_without_timing(whole)
    verify_folder(out)

    # Finished: a rerun verifies and writes nothing.
    written.clear()
    _prepare([src], out)
    assert written == []
    # A damaged kept shard is found, and the run continues from before it.
    victim = out / "train-00001.bin"
    data = bytearray(victim.read_bytes())
    data[0] ^= 1
    victim.write_bytes(bytes(data))
    _prepare([src], out)
    assert "train-00001" in written and "train-00000" not in written
    assert _shard_bytes(out) == _shard_bytes(whole)
    # Other options: start afresh.
    written.clear()
    _prepare([src], out, seed=SEED + 1)
    assert "train-00000" in written


def test_interrupted_in_memory_and_parquet_prepares_continue(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 3000)
    monkeypatch.setattr(sources, "ROWS_PER_CHUNK", 64)
    lines = [ln.strip() for d in embedded_documents()[:30] for ln in d.splitlines() if ln.strip()]
    pq.write_table(pa.table({"text": lines}), tmp_path / "c.parquet", row_group_size=100)
    runs = {"list": lambda out: P.prepare(documents=lines, out_dir=out, vocab_size=VOCAB, progress=False),
            "parquet": lambda out: _prepare([tmp_path / "c.parquet"], out)}
    for name, run in runs.items():
        whole, out = tmp_path / f"{name}-whole", tmp_path / name
        _interrupting(monkeypatch, after=0)
        run(whole)
        _interrupting(monkeypatch, after=5)
        with pytest.raises(_Interrupt):
            run(out)
        written = _interrupting(monkeypatch, after=0)
        run(out)
        assert "train-00000" not in written and written, name
        assert _shard_bytes(out) == _shard_bytes(whole), name


def test_progress_lines(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    from alum_ds.data import progress, sources

    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 20_000)
    _prepare([corpus], tmp_path / "quiet")
    assert capsys.readouterr().err == ""
    _prepare([corpus], tmp_path / "data", progress=True)
    err = capsys.readouterr().err.splitlines()
    tokenizing = [ln for ln in err if ln.startswith("prepare: tokenizing:")]
    assert len(tokenizing) >= 3, err
    assert all("documents" in ln and "tok/s" in ln and "MiB/s" in ln for ln in tokenizing)
    assert "\r" not in "".join(err)  # not a terminal: whole lines
    assert any("learning" in ln for ln in err) and any(ln.startswith("prepare: wrote") for ln in err)


# 9b. The word cache in worker processes ------------------------------------------------------


def _encode_workers_alive() -> list:
    import psutil

    return [c for c in psutil.Process().children(recursive=True)
            if c.is_running() and c.status() != psutil.STATUS_ZOMBIE
            and any("alum_ds.data.encoding" in a for a in c.cmdline())]


def _recording_pools(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the pid of every encoding worker started."""
    from alum_ds.data import encoding as E

    pids: list[int] = []
    real = E.EncoderPool._start

    def start(self: E.EncoderPool) -> None:
        real(self)
        pids.extend(self.pids())

    monkeypatch.setattr(E.EncoderPool, "_start", start)
    return pids


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_pool_gives_the_in_thread_and_rust_shards(data_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data.tokenizer import WordCacheEncoder

    monkeypatch.setattr(P, "SHARD_TOKENS", 4000)
    monkeypatch.setattr(P, "ENCODE_CHARS", 2000)  # dozens of batches: several rounds per worker
    docs = TRICKY + embedded_documents()[:60] + TRICKY[::-1]

    def run(out: Path, **kw: object) -> None:
        P.prepare(documents=docs, out_dir=out, tokenizer=str(data_dir / "tokenizer"), seed=SEED,
                  progress=False, **kw)

    pids = _recording_pools(monkeypatch)
    run(tmp_path / "pool", encode_workers=2)  # two workers even on a one-core machine
    assert len(pids) == 2
    run(tmp_path / "thread", encode_workers=0)
    assert len(pids) == 2
    monkeypatch.setattr(WordCacheEncoder, "supports", staticmethod(lambda backend: False))
    run(tmp_path / "rust", encode_workers=2)  # the Rust path ignores the worker count
    assert len(pids) == 2
    pool = _shard_bytes(tmp_path / "pool")
    assert len(pool) > 6
    assert pool == _shard_bytes(tmp_path / "thread") == _shard_bytes(tmp_path / "rust")
    assert (_manifest_without_timing(tmp_path / "pool") == _manifest_without_timing(tmp_path / "thread")
            == _manifest_without_timing(tmp_path / "rust"))


def test_no_encoding_worker_remains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import sources

    monkeypatch.setattr(P, "SHARD_TOKENS", 3000)
    monkeypatch.setattr(P, "ENCODE_CHARS", 1000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    src = _lines_corpus(tmp_path)
    pids = _recording_pools(monkeypatch)
    whole = tmp_path / "whole"
    _prepare([src], whole, encode_workers=2)
    assert len(pids) == 2 and all(map(_gone, pids)) and not _encode_workers_alive()
    # Ctrl-C (a KeyboardInterrupt in the main thread) while shards are written, then an error.
    for exc in (KeyboardInterrupt, _Interrupt):
        pids.clear()

        def write(out: Path, name: str, tokens: np.ndarray, offsets: np.ndarray, exc: type = exc) -> dict:
            if name == "train-00002":
                raise exc(name)
            return _REAL_WRITE_SHARD(out, name, tokens, offsets)

        from alum_ds.data import shards

        monkeypatch.setattr(shards, "write_shard", write)
        with pytest.raises(exc):
            _prepare([src], tmp_path / "data", encode_workers=2, fresh=True)
        assert len(pids) == 2 and all(map(_gone, pids)) and not _encode_workers_alive(), exc
    # The interrupted prepare continues, with workers, to the same shards.
    monkeypatch.setattr(shards, "write_shard", _REAL_WRITE_SHARD)
    _prepare([src], tmp_path / "data", encode_workers=2)
    assert _shard_bytes(tmp_path / "data") == _shard_bytes(whole)
    assert not _encode_workers_alive()


def test_encoding_worker_failures_are_errors(data_dir: Path) -> None:
    import os
    import signal

    from tokenizers import Tokenizer

    from alum_ds.data.encoding import EncoderPool, EncodeWorkerError, encoding_backend
    from alum_ds.data.tokenizer import WordCacheEncoder

    backend = encoding_backend(Tokenizer.from_file(str(data_dir / "tokenizer" / "tokenizer.json")))
    enc = WordCacheEncoder(backend, np.dtype(np.uint16))
    docs = embedded_documents()[:6]
    want = enc.encode_batch(docs)
    # An exception inside a worker (a document that is no text) names itself, with its traceback.
    with pytest.raises(EncodeWorkerError, match=r"worker \d \(pid \d+\) failed: AttributeError") as e:
        with EncoderPool(enc, 2) as pool:
            got = list(pool.map([(0, docs), (1, docs), (2, docs), (3, [None]), (4, docs)]))
    assert "Traceback" in str(e.value)
    assert not _encode_workers_alive()
    # A worker killed (as by the kernel for memory) is an error, not a hang.
    with pytest.raises(EncodeWorkerError, match="ended unexpectedly .killed by signal 9"):
        with EncoderPool(enc, 2) as pool:
            it = pool.map((i, docs) for i in range(50))
            got = [next(it), next(it)]
            os.kill(pool.pids()[1], signal.SIGKILL)
            got += list(it)
    assert not _encode_workers_alive()
    # And the pool's results are the encoder's, in order.
    with EncoderPool(enc, 3, in_flight=4) as pool:
        got = list(pool.map((i, [] if i == 5 else docs) for i in range(12)))
    assert [t for t, _ in got] == list(range(12))
    for t, (flat, lengths) in got:
        if t == 5:
            assert flat.size == 0 and lengths == []
        else:
            assert lengths == want[1] and flat.tobytes() == want[0].tobytes()
    assert not _encode_workers_alive()


def test_default_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data import encoding as E

    monkeypatch.delenv(E.WORKERS_ENV, raising=False)
    assert E.default_workers(1) == 0 and E.default_workers(2) == 2 and E.default_workers(64) == 64
    monkeypatch.setenv(E.WORKERS_ENV, "3")
    assert E.default_workers(1) == 3
    monkeypatch.setenv(E.WORKERS_ENV, "x")
    with pytest.raises(ValueError, match=E.WORKERS_ENV):
        E.default_workers()


# 10. Whole-word masking ----------------------------------------------------------------------


def test_word_start_table() -> None:
    from alum_ds.data.masking import word_start_table

    vocab = {"<s>": 0, "Ġthe": 1, "the": 2, "ing": 3, "Ċ": 4, "▁word": 5, "'t": 6}
    np.testing.assert_array_equal(word_start_table(vocab, np.array([0])),
                                  [True, True, False, False, True, True, False])


def test_whole_word_masking_keeps_words_whole(data_dir: Path) -> None:
    from dataclasses import dataclass

    @dataclass
    class WholeWordMasking(MaskingConfig):
        whole_word: bool = True  # the field the run config is to gain

    s = _stream(data_dir, masking=WholeWordMasking())
    assert s._mask_kw["whole_word"] is True
    table = s._mask_kw["word_start"]
    n = len(s.seqs)
    inputs, labels = s.batch_at(0, n)
    tokens = s.seqs.get(s.order(0))
    np.testing.assert_array_equal(_unmask(inputs, labels), tokens)
    special = np.isin(tokens, s.special)
    starts = table[tokens] | special
    starts[:, 1:] |= special[:, :-1]
    starts[:, 0] = True
    word = np.cumsum(starts, axis=1)  # word number within the row
    selected = labels != -100
    assert not (selected & special).any() and selected.any(axis=1).all()
    multi = 0
    for r in range(n):
        for w in np.unique(word[r][selected[r]]):
            at = word[r] == w
            assert selected[r][at].all(), (r, w)  # never a part of a word
            got, orig = inputs[r][at], tokens[r][at]
            # Masked, kept or replaced as a unit.
            assert (got == s.mask_id).all() or (got == orig).all() or not (got == s.mask_id).any()
            multi += at.sum() > 1
    assert multi > 100  # the corpus has multi-token words, so the test can fail
    frac = selected.sum() / (~special).sum()
    assert abs(frac - 0.15) < 0.02, frac
    # Without the option: token-level masking, which does split words.
    plain_labels = _stream(data_dir).batch_at(0, n)[1]
    assert not np.array_equal(plain_labels, labels)


# 11. Loaders that make batches ahead ---------------------------------------------------------


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 2)])
def test_prefetcher_yields_the_serial_batches_and_resumes(data_dir: Path, world: int, rank: int) -> None:
    from alum_ds.data.loader import Prefetcher

    micro, k = 5, 7
    serial = _stream(data_dir)
    steps = len(serial.seqs) // (world * micro) + 3  # into the second epoch
    want = [serial.next_for_rank(rank=rank, world=world, micro_batch=micro) for _ in range(steps)]
    with Prefetcher(_stream(data_dir), depth=3) as pf:
        for i in range(k):
            got = pf.next_for_rank(rank=rank, world=world, micro_batch=micro)
            np.testing.assert_array_equal(got[0], want[i][0])
            np.testing.assert_array_equal(got[1], want[i][1])
        state = json.loads(json.dumps(pf.state_dict()))
        assert state["consumed"] == pf.state.consumed == k * world * micro  # taken, not made
        rest = [pf.next_for_rank(rank=rank, world=world, micro_batch=micro) for _ in range(steps - k)]
    assert pf.epoch == serial.epoch == 1
    for got, exp in zip(rest, want[k:]):
        np.testing.assert_array_equal(got[0], exp[0])
    with Prefetcher(_stream(data_dir)) as resumed:
        resumed.load_state_dict(state)
        for exp in want[k : k + 3]:
            np.testing.assert_array_equal(resumed.next_for_rank(rank=rank, world=world, micro_batch=micro)[1],
                                          exp[1])
        resumed.load_state_dict({"consumed": 0})  # moving back restarts the producer
        np.testing.assert_array_equal(resumed.next_for_rank(rank=rank, world=world, micro_batch=micro)[0],
                                      want[0][0])


def test_prefetcher_passes_errors_on(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from alum_ds.data.loader import Prefetcher

    s = _stream(data_dir)
    monkeypatch.setattr(s, "batch_at", lambda *a: (_ for _ in ()).throw(DataError("boom")))
    with Prefetcher(s) as pf, pytest.raises(DataError, match="boom"):
        pf.next_for_rank(rank=0, world=1, micro_batch=2)
    assert s.state.consumed == 0


def test_workers_partition_the_serial_order(data_dir: Path) -> None:
    from alum_ds.data.loader import StreamDataset, WorkerLoader

    micro, world, rank, start = 4, 2, 1, 24
    ds = StreamDataset(str(data_dir), seq_len=SEQ_LEN, seed=SEED, masking=MaskingConfig(), rank=rank,
                       world=world, micro_batch=micro, start=start)
    serial = [start + k * world * micro + rank * micro for k in range(30)]
    for workers in (1, 2, 3):
        parts = [list(itertools.islice(ds.worker_positions(w, workers), 30 // workers))
                 for w in range(workers)]
        flat = [p for part in parts for p in part]
        assert len(set(flat)) == len(flat)  # disjoint
        merged = [parts[k % workers][k // workers] for k in range(30)]  # the DataLoader's order
        assert merged == serial
    s = _stream(data_dir)
    s.load_state_dict({"consumed": start})
    with WorkerLoader(_stream(data_dir), num_workers=2) as wl:
        wl.load_state_dict({"consumed": start})
        for _ in range(5):
            a = wl.next_for_rank(rank=rank, world=world, micro_batch=micro)
            b = s.next_for_rank(rank=rank, world=world, micro_batch=micro)
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
        assert wl.state.consumed == s.state.consumed


# 12. Vocabulary check, CLI inputs, benchmark smoke --------------------------------------------


def test_check_vocab(damaged: Path) -> None:
    from alum_ds.data.shards import check_vocab

    check_vocab(damaged, VOCAB)
    with pytest.raises(DataError) as e:
        check_vocab(damaged, 50265)
    _one_line(e, damaged, VOCAB, 50265, "--tokenizer")
    tok_json = damaged / "tokenizer" / "tokenizer.json"
    t = json.loads(tok_json.read_text())
    t["model"]["vocab"] = dict(list(t["model"]["vocab"].items())[:-3])
    tok_json.write_text(json.dumps(t))
    with pytest.raises(DataError) as e:
        check_vocab(damaged, VOCAB)
    _one_line(e, tok_json, "replaced")


def test_cli_prepare_parquet_options(docs40: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs40}), tmp_path / "c.parquet")
    out = tmp_path / "data"
    argv = ["prepare", str(tmp_path / "c.parquet"), "--out", str(out), "--vocab-size", str(VOCAB),
            "--text-field", "body", "--tokenizer-sample-bytes", "0", "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""
    assert read_manifest(out)["source"]["documents"] == len(docs40)
    assert main(argv[:-1]) == 0  # done already: verified, not redone
    assert "already prepared" in capsys.readouterr().err


def test_bench_quick_writes_its_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "bench_data.py"
    monkeypatch.syspath_prepend(str(path.parent))  # as running the script would: bench/_common.py
    spec = importlib.util.spec_from_file_location("bench_data", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "data.json"
    bench.main(["--quick", "--out", str(out)])
    res = json.loads(out.read_text())
    for key in ("machine", "corpus_mb", "prepare", "baseline", "prepare_vs_baseline", "stream"):
        assert key in res, key
    assert res["prepare"]["tokens"] == res["baseline"]["tokens"] > 0
    assert res["prepare"]["tokens_per_s_median"] > 0 and res["stream"]["tokens_per_s_median"] > 0
