"""Pins ``alum_ds.data.shards``: a prepared folder is input, so a missing folder, missing,
truncated or corrupted shards, a manifest of another format version or none, shard names that
climb out of the folder, a tokenizer replaced after prepare and a vocabulary other than the model's
are each a one-line ``DataError``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alum_ds.data.shards import MANIFEST, DataError, open_split, read_manifest, verify_folder
from alum_ds.data.stream import PackedSequences
from tests._data_helpers import SEQ_LEN, VOCAB, _one_line, _stream


@pytest.fixture()
def damaged(data_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    return out


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


def test_check_vocab(damaged: Path) -> None:
    from alum_ds.data.shards import check_vocab

    check_vocab(damaged, VOCAB)
    with pytest.raises(DataError) as e:
        check_vocab(damaged, 50265)
    _one_line(e, damaged, VOCAB, 50265, "--tokenizer")
    check_vocab(damaged, VOCAB + 128, padded_rows=256)  # a table rounded up past the tokenizer
    for model_vocab in (VOCAB + 257, VOCAB - 1):
        with pytest.raises(DataError):
            check_vocab(damaged, model_vocab, padded_rows=256)
    tok_json = damaged / "tokenizer" / "tokenizer.json"
    t = json.loads(tok_json.read_text())
    t["model"]["vocab"] = dict(list(t["model"]["vocab"].items())[:-3])
    tok_json.write_text(json.dumps(t))
    with pytest.raises(DataError) as e:
        check_vocab(damaged, VOCAB)
    _one_line(e, tok_json, "replaced")
