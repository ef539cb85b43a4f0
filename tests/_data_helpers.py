"""Helpers shared by the data tests (test_shards, test_stream, test_masking, test_tokenizer,
test_sources, test_prepare, test_encoding, test_progress, test_loader): sizes, corpus and prepare
shortcuts, and checks of one-line errors. The prepared-folder fixtures are in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alum_ds.config import MaskingConfig
from alum_ds.data import prepare as P
from alum_ds.data.corpus import embedded_documents
from alum_ds.data.shards import MANIFEST, write_shard
from alum_ds.data.stream import TrainStream

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


def _manifest_without_timing(d: Path) -> dict:
    m = json.loads((d / MANIFEST).read_text())
    m.pop("seconds")
    return m


def _shard_bytes(d: Path) -> dict[str, bytes]:
    """Everything prepare wrote that must not depend on how the input was read."""
    names = [p for p in d.iterdir() if p.suffix in (".bin", ".idx")] + [d / "tokenizer" / "tokenizer.json"]
    return {p.name: p.read_bytes() for p in names}


def _stderr_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("alum-ds: error: "), err
    return err[0]


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


class _Interrupt(Exception):
    pass


_REAL_WRITE_SHARD = write_shard


def _lines_corpus(tmp_path: Path) -> Path:
    lines = [ln.strip() for d in embedded_documents()[:30] for ln in d.splitlines() if ln.strip()]
    return _write_corpus(tmp_path / "lines.txt", lines)
