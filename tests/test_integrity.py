"""Training-time integrity (alum_ds.data.integrity): every shard hashed once per node before the
first step, token ids checked against the vocabulary, the tokenizer checked against the
manifest's; a verified file is not hashed again while its size, mtime and inode stay the same."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from alum_ds.data import integrity as I
from alum_ds.data.shards import MANIFEST, DataError
from tests.conftest import ROOT, free_port, run


@pytest.fixture
def copy(data_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "data"
    shutil.copytree(data_dir, out)
    return out


def _manifest(d: Path) -> dict:
    return json.loads((d / MANIFEST).read_text())


def _first_bin(d: Path) -> tuple[Path, np.dtype]:
    m = _manifest(d)
    return d / (m["splits"]["train"][0]["name"] + ".bin"), np.dtype(m["dtype"])


def _refused(d: Path, record: Path, *needles: str) -> str:
    with pytest.raises(DataError) as e:
        I.verify_for_training([d], record, progress=False)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def _random_ids_over_half(d: Path) -> Path:
    path, dtype = _first_bin(d)
    tokens = np.fromfile(path, dtype=dtype)
    vocab = _manifest(d)["tokenizer"]["vocab_size"]
    half = tokens.size // 2
    tokens[:half] = np.random.default_rng(0).integers(0, vocab, half)  # in range: only sha256 sees it
    tokens.tofile(path)
    return path


def _flip_a_byte(d: Path) -> Path:
    path, _ = _first_bin(d)
    b = bytearray(path.read_bytes())
    b[len(b) // 3] ^= 0x01
    path.write_bytes(bytes(b))
    return path


def _shift_an_offset(d: Path) -> Path:
    m = _manifest(d)
    path = d / (m["splits"]["train"][0]["name"] + ".idx")
    off = np.fromfile(path, dtype=np.int64)
    k = int(np.argmax(np.diff(off) > 2)) + 1  # a document boundary that stays ordered when moved
    off[k] += 1
    off.tofile(path)
    return path


def _foreign_tokenizer(d: Path) -> Path:
    """The same number of tokens, two of them swapped: the vocabulary size check passes."""
    path = d / "tokenizer" / "tokenizer.json"
    t = json.loads(path.read_text())
    vocab = t["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(t))
    return path


@pytest.mark.parametrize("damage, words", [
    (_random_ids_over_half, "fails its sha256 check"), (_flip_a_byte, "fails its sha256 check"),
    (_shift_an_offset, "fails its sha256 check"),
    (_foreign_tokenizer, "is not the tokenizer these shards were prepared with")])
def test_damage_is_refused_naming_the_file(copy: Path, tmp_path: Path, damage, words: str) -> None:
    record = tmp_path / "record"
    I.verify_for_training([copy], record, progress=False)  # intact: passes, and is recorded
    path = damage(copy)
    _refused(copy, record, words, str(path.resolve()), "alum-ds prepare")


def test_out_of_range_id_with_a_matching_checksum(copy: Path, tmp_path: Path) -> None:
    """A shard whose manifest entry was rewritten to match (sha256 passes): the id check refuses."""
    path, dtype = _first_bin(copy)
    vocab = _manifest(copy)["tokenizer"]["vocab_size"]
    tokens = np.fromfile(path, dtype=dtype)
    tokens[5] = vocab + 3
    tokens.tofile(path)
    m = _manifest(copy)
    m["splits"]["train"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (copy / MANIFEST).write_text(json.dumps(m))
    _refused(copy, tmp_path, f"holds token id {vocab + 3}", f"vocabulary has {vocab} ids", path.name)


def test_a_verified_file_is_not_hashed_again_until_it_changes(copy: Path, tmp_path: Path) -> None:
    total = sum(p.stat().st_size for p in copy.iterdir() if p.suffix in (".bin", ".idx"))
    first = I.verify_for_training([copy], tmp_path, progress=False)
    assert first["hashed_bytes"] == total and first["cached_bytes"] == 0
    again = I.verify_for_training([copy], tmp_path, progress=False)
    assert again["hashed_bytes"] == 0 and again["cached_bytes"] == total
    path = _flip_a_byte(copy)  # a new mtime: hashed again, and refused
    _refused(copy, tmp_path, str(path.resolve()))
    # The refused file was not recorded: a rerun refuses it again rather than trusting it.
    _refused(copy, tmp_path, str(path.resolve()))


def test_a_damaged_record_costs_only_a_rehash(copy: Path, tmp_path: Path) -> None:
    (tmp_path / I.RECORD).write_text("{not json")
    assert I.verify_for_training([copy], tmp_path, progress=False)["hashed_bytes"] > 0
    assert I.verify_for_training([copy], tmp_path, progress=False)["hashed_bytes"] == 0


def test_alum_ds_train_refuses_a_corrupted_shard_before_step_1(copy: Path, tmp_path: Path) -> None:
    """`alum-ds train` in one process: a flipped byte in a shard is a one-line error naming the
    file, exit 2, before the model is built and before the run folder exists; the same data
    intact trains, saying what it hashed."""
    clean = tmp_path / "clean"
    shutil.copytree(copy, clean)
    bad = _flip_a_byte(copy)
    common = [f"--data.cache_dir={tmp_path / 'cache'}", "--data.seq_len=32", "--schedule.steps=1",
              "--schedule.warmup_steps=0", "--eval.fill_mask=0", "--eval.max_sequences=8",
              "--logging.tensorboard=false", "--schedule.micro_batch_size=2"]
    runs = [["train", f"--run.dir={tmp_path / 'bad'}", f"--data.dir={copy}", *common],
            ["train", f"--run.dir={tmp_path / 'ok'}", f"--data.dir={clean}", *common]]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": runs}))
    r = run([sys.executable, str(ROOT / "tests" / "drivers" / "cli_runs.py"), str(spec)], tmp_path,
            {"MASTER_PORT": free_port(), "ALUM_DS_NO_BAR": "1"}, timeout=600)
    log = r.stderr
    assert r.returncode == 0, log[-3000:]
    parts = re.split(r"^== run \d+$", log, flags=re.M)[1:]
    assert [int(x) for x in re.findall(r"^== rc \d+ (\d+)$", log, flags=re.M)] == [2, 0], log[-3000:]
    refused = parts[0].split("== rc")[0].strip().splitlines()
    assert refused == [f"alum-ds: error: shard file {bad.resolve()} fails its sha256 check (its "
                       f"bytes changed after prepare): rerun `alum-ds prepare` for {copy.resolve()}"
                       ], parts[0]
    assert not (tmp_path / "bad").exists()
    assert "step 1/1" in parts[1] and "shards verified: 0.00" in parts[1], parts[1][-3000:]
