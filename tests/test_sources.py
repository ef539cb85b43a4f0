"""Pins ``alum_ds.data.sources``: the document rules of text, JSON lines, Parquet and saved or Hub
datasets, the same documents whatever the chunking, undecodable bytes replaced and counted, and
one-line errors for bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alum_ds.cli import main
from alum_ds.data import prepare as P
from alum_ds.data.corpus import embedded_documents
from alum_ds.data.shards import DataError
from tests._data_helpers import SEED, _one_line, _prepare, _shard_bytes, _stderr_line, _write_corpus


def test_crlf_text_splits_into_paragraphs(tmp_path: Path) -> None:
    (tmp_path / "crlf.txt").write_bytes(b"first para\r\nline two\r\n\r\nsecond para\r\n\r\nthird\r\n")
    assert list(P.read_documents([tmp_path / "crlf.txt"])) == [
        "first para\nline two", "second para", "third"]


def test_json_lines_split_only_at_newlines(tmp_path: Path) -> None:
    # U+2028 and U+0085 are legal unescaped in JSON strings; str.splitlines would cut there.
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "one\u2028line"}\r\n\n{"text": "two\u0085x", "id": 2}\n{"text": null}\n',
                   encoding="utf-8")
    assert list(P.read_documents([src])) == ["one\u2028line", "two\u0085x"]


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
    # A number (or list) is not the text: it became "5" and was trained on.
    for value in ("5", "[1, 2]", "true"):
        src.write_text('{"text": "fine"}\n{"text": ' + value + '}\n')
        with pytest.raises(DataError) as e:
            _prepare([src], tmp_path / "data")
        _one_line(e, f"{src}:2", "'text'", "--text-field")
    assert not (tmp_path / "data" / "manifest.json").exists()


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


def test_output_folder_inside_an_input_folder(docs40: list[str], tmp_path: Path) -> None:
    _write_corpus(tmp_path / "c.txt", docs40)
    first = _prepare([tmp_path], tmp_path / "data")
    again = _prepare([tmp_path], tmp_path / "data", fresh=True)  # its own JSON files are no input
    assert first["source"]["inputs"] == again["source"]["inputs"] == [str(tmp_path / "c.txt")]
