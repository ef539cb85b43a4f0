"""Hub ids (``alum_ds.hub``) and ``hf:`` fine-tuning data through the real huggingface_hub,
transformers and datasets. A Hub on 127.0.0.1 (``tests/hub_server.py``) is downloaded from once by
huggingface_hub and datasets themselves, which write their cache (refs, snapshots, blobs, symlinks,
the datasets cache) in a temporary HF_HOME; the runs under test then read that cache with
HF_HUB_OFFLINE=1: pretraining from ``org/tiny`` (and its rerun resuming at the recorded commit),
``prepare --tokenizer org/tiny``, fine-tuning from ``org/tiny@v1`` on ``hf:org/glue_tiny:mini``.
The refusals run in this process (they come before any process group): offline with nothing
cached, a revision that does not exist (offline and online), a private or gated repo without a
token (the Hub's 401 answers), a malformed ``hf:`` spec, an unreachable Hub."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from alum_ds.cli import main
from alum_ds.data.shards import DataError
from tests.conftest import ROOT, run
from tests.hub_server import Hub, Repo, commit_of

V1, MAIN = commit_of("org/tiny v1"), commit_of("org/tiny main")
DATA = commit_of("org/glue_tiny")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    import datasets
    import torch
    from transformers import AutoModelForMaskedLM

    from alum_ds.data.corpus import embedded_documents
    from alum_ds.data.tokenizer import learn_bpe
    from tests.test_encoders import _config

    base = tmp_path_factory.mktemp("hub")
    docs = embedded_documents()[:200]
    (base / "docs.txt").write_text("\n\n".join(docs))
    tok = learn_bpe(docs, 600)
    folders = {}
    for name, seed in (("v1", 0), ("main", 1)):
        torch.manual_seed(seed)
        folders[name] = base / "repo" / name
        AutoModelForMaskedLM.from_config(_config("roberta", vocab=len(tok), positions=66)).save_pretrained(
            str(folders[name]))
        tok.save_pretrained(str(folders[name]))
        # Model repositories often hold other frameworks' copies too: never downloaded.
        (folders[name] / "tf_model.h5").write_bytes(b"not for PyTorch")
    # A repository from before safetensors: its PyTorch weights are fetched, its TensorFlow ones not.
    legacy = base / "repo" / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((folders["main"] / "config.json").read_text())
    (legacy / "pytorch_model.bin").write_bytes(b"pickled weights")
    (legacy / "tf_model.h5").write_bytes(b"not for PyTorch")
    labels = datasets.ClassLabel(names=["neg", "pos"])
    feats = datasets.Features({"sentence": datasets.Value("string"), "label": labels})
    (base / "ds" / "mini").mkdir(parents=True)
    for split, n in (("train", 40), ("validation", 10)):
        rows = {"sentence": [docs[i][:200] for i in range(n)], "label": [i % 2 for i in range(n)]}
        datasets.Dataset.from_dict(rows, features=feats).to_parquet(
            str(base / "ds" / "mini" / f"{split}-00000-of-00001.parquet"))
    (base / "ds" / "README.md").write_text(
        "---\nconfigs:\n- config_name: mini\n  data_files:\n  - split: train\n    path: mini/train-*\n"
        "  - split: validation\n    path: mini/validation-*\n---\n")
    repos = {"org/tiny": Repo({V1: folders["v1"], MAIN: folders["main"]}, {"main": MAIN, "v1": V1}),
             "org/private": Repo({MAIN: folders["main"]}, {"main": MAIN}, private=True),
             "org/gated": Repo({MAIN: folders["main"]}, {"main": MAIN}, gated=True),
             "org/legacy": Repo({MAIN: legacy}, {"main": MAIN}),
             "org/glue_tiny": Repo({DATA: base / "ds"}, {"main": DATA})}
    home = base / "hf_home"
    with Hub(repos) as server:
        # The one online step: huggingface_hub and datasets fill the cache from the local Hub.
        warm = ("from alum_ds import hub; import datasets\n"
                "for spec in ('org/tiny', 'org/tiny@v1', 'org/legacy'): hub.resolve(spec, 'test')\n"
                "datasets.load_dataset('org/glue_tiny', 'mini')\n")
        r = run([sys.executable, "-c", warm], ROOT, {"HF_HOME": str(home), "HF_ENDPOINT": server.endpoint})
        assert r.returncode == 0, r.stderr[-3000:]
        yield {"base": base, "home": home, "server": server, "tok": tok, "folders": folders,
               "offline": {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "ALUM_DS_CPU_RANKS": "1",
                           "OMP_NUM_THREADS": "1"}}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "alum_ds.cli", *args]


@pytest.fixture(scope="module")
def prepared(hub):
    """``alum-ds prepare --tokenizer org/tiny`` offline, from the cache."""
    out = hub["base"] / "data"
    r = run(_cli("prepare", str(hub["base"] / "docs.txt"), "--out", str(out), "--tokenizer", "org/tiny",
                 "--quiet", "--workers", "0"), ROOT, hub["offline"])
    return r, out


def test_the_cache_is_huggingface_hubs_own_layout(hub) -> None:
    repo = hub["home"] / "hub" / "models--org--tiny"
    assert (repo / "refs" / "main").read_text() == MAIN and (repo / "refs" / "v1").read_text() == V1
    for commit in (MAIN, V1):
        cfg = repo / "snapshots" / commit / "config.json"
        assert cfg.is_symlink() and cfg.resolve().parent == (repo / "blobs").resolve()
    # Each file of each commit went over the wire once at most (a blob both commits share, once),
    # and only what PyTorch loads.
    served = hub["server"].repos["org/tiny"].downloads
    assert served and len(served) == len(set(served)), served
    assert any(f.endswith("model.safetensors") for f in served) and not any(".h5" in f for f in served)
    assert sorted(f.split("/", 1)[1] for f in hub["server"].repos["org/legacy"].downloads) == [
        "config.json", "pytorch_model.bin"]


def test_prepare_with_a_hub_tokenizer(hub, prepared) -> None:
    r, out = prepared
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"tokenizer: Hub org/tiny@{MAIN[:12]}" in r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == len(hub["tok"])
    snap = hub["home"] / "hub" / "models--org--tiny" / "snapshots" / MAIN / "tokenizer.json"
    assert json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"] == \
        json.loads(snap.read_text())["model"]


def test_pretraining_from_a_hub_id_records_the_commit_and_resumes_on_it(hub, prepared,
                                                                        tmp_path: Path) -> None:
    _, data = prepared
    run_dir = tmp_path / "run"
    cmd = _cli("train", "--model.pretrained=org/tiny", f"--data.dir={data}", f"--run.dir={run_dir}",
               "--data.seq_len=32",
               "--schedule.steps=2", "--schedule.warmup_steps=1", "--schedule.micro_batch_size=4",
               "--eval.max_sequences=8", "--eval.fill_mask=0", "--logging.every=1",
               "--logging.tensorboard=false", "--alum.start_step=0")
    r = run(cmd, ROOT, hub["offline"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"model Hub org/tiny@{MAIN[:12]} (revision main; cache " in r.stdout + r.stderr
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    rec = resolved["sources"]["model.pretrained"]
    assert rec["repo_id"] == "org/tiny" and rec["revision"] == "main" and rec["commit"] == MAIN
    assert resolved["config"]["model"]["pretrained"] == "org/tiny"
    # The branch moves in the cache (as a later download would move it); the same command resumes
    # the run, at the commit it recorded.
    ref = hub["home"] / "hub" / "models--org--tiny" / "refs" / "main"
    ref.write_text(V1)
    try:
        again = run(cmd, ROOT, hub["offline"])
    finally:
        ref.write_text(MAIN)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    log = again.stdout + again.stderr
    assert "resumed from" in log and f"Hub org/tiny@{MAIN[:12]}" in log
    again_resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert again_resolved["config_hash"] == resolved["config_hash"]
    assert again_resolved["sources"]["model.pretrained"]["commit"] == MAIN


def test_finetuning_from_a_hub_revision_on_hub_data(hub, tmp_path: Path) -> None:
    out = tmp_path / "ft"
    spec = "hf:org/glue_tiny:mini"
    r = run(_cli("finetune", "--checkpoint", "org/tiny@v1", "--task.tokenizer=org/tiny",
                 f"--task.train={spec}@train", f"--task.validation={spec}@validation",
                 f"--task.adv_eval={spec}", "--task.text_column=sentence", f"--run.dir={out}",
                 "--schedule.steps=2", "--schedule.micro_batch_size=4", "--task.max_length=32",
                 "--eval.pgd_steps=0", "--run.save_model=false", "--logging.tensorboard=false"),
            ROOT, hub["offline"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    log = r.stdout + r.stderr
    assert f"model from Hub org/tiny@{V1[:12]} (revision v1;" in log
    assert f", tokenizer from Hub org/tiny@{MAIN[:12]} (revision main;" in log
    res = json.loads((out / "results.json").read_text())
    assert res["sources"]["task.checkpoint"]["commit"] == V1
    assert res["sources"]["task.tokenizer"]["commit"] == MAIN
    assert res["labels"] == ["neg", "pos"] and res["validation"]["examples"] == 10
    # No split named: the adversarial role's first usual split the dataset has.
    assert res["adversarial"][spec]["examples"] == 10


@pytest.fixture
def offline(hub, monkeypatch: pytest.MonkeyPatch):
    """This process reads the test's model cache with huggingface_hub (and datasets) offline."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["home"] / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return hub


@pytest.fixture
def online(hub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """This process asks the local Hub (an empty cache of its own)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub["server"].endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return hub


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    out = capsys.readouterr().err.strip()
    err = out.splitlines()[-1]
    assert err.startswith("alum-ds: error: ") and "Traceback" not in out, out
    for n in needles:
        assert n in err, (n, err)
    return err


def test_offline_refusals_name_the_id_and_the_fix(offline, capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    _refused(capsys, ["train", "--model.pretrained=org/absent", f"--run.dir={run_dir}"],
             "model.pretrained org/absent", "HF_HUB_OFFLINE", "local folder")
    _refused(capsys, ["train", "--model.pretrained=org/tiny@v9", f"--run.dir={run_dir}"],
             "org/tiny@v9", "(cached: main, v1)", "HF_HUB_OFFLINE")
    assert not run_dir.exists()  # nothing written before the decision
    _refused(capsys, ["finetune", "--checkpoint", "org/absent", f"--run.dir={tmp_path / 'ft'}"],
             "task.checkpoint org/absent: no such folder", "HF_HUB_OFFLINE")
    _refused(capsys, ["finetune", "--checkpoint", "org/tiny", "--task.tokenizer=org/none@x",
                      f"--run.dir={tmp_path / 'ft'}"], "task.tokenizer org/none@x")
    _refused(capsys, ["prepare", str(offline["base"] / "docs.txt"), "--out", str(tmp_path / "d"),
                      "--tokenizer", "org/absent"], "--tokenizer org/absent", "HF_HUB_OFFLINE")
    assert not (tmp_path / "d").exists() and not (tmp_path / "ft").exists()


def test_online_refusals_private_gated_and_missing_revision(online, capsys, tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    _refused(capsys, ["train", "--model.pretrained=org/tiny@nope", f"--run.dir={run_dir}"],
             "revision 'nope'", "branch, tag or commit")
    _refused(capsys, ["train", "--model.pretrained=org/private", f"--run.dir={run_dir}"],
             "org/private", "without a token", "HF_TOKEN")
    _refused(capsys, ["train", "--model.pretrained=org/gated", f"--run.dir={run_dir}"],
             "gated", "HF_TOKEN")
    _refused(capsys, ["finetune", "--checkpoint", "org/nothing-here", f"--run.dir={tmp_path / 'ft'}"],
             "task.checkpoint org/nothing-here: no such folder", "check the id")
    # With the token the private repository downloads (huggingface_hub reads HF_TOKEN itself).
    script = ("from alum_ds import hub; f = hub.resolve('org/private', 'model.pretrained'); "
              "print(f.commit, (f.path / 'config.json').is_file())")
    r = run([sys.executable, "-c", script], ROOT, {"HF_HOME": str(tmp_path / "home"),
                                                   "HF_ENDPOINT": online["server"].endpoint,
                                                   "HF_TOKEN": online["server"].token})
    assert r.returncode == 0 and r.stdout.split() == [MAIN, "True"], r.stderr[-2000:]


def test_unreachable_hub_is_one_line(hub, monkeypatch, tmp_path: Path) -> None:
    import socket

    from huggingface_hub import constants

    from alum_ds import hub as H

    def no_dns(*a: object, **k: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(H.HubError) as e:
        H.resolve("org/tiny", "model.pretrained")
    assert "\n" not in str(e.value) and "cannot be reached" in str(e.value) and "org/tiny" in str(e.value)
    # What is cached still serves, as huggingface_hub's own fallback does.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub["home"] / "hub"))
    assert H.resolve("org/tiny@v1", "model.pretrained").commit == V1
    # hf: fine-tuning data: prepare's reader and its message.
    from alum_ds.finetune.data import Columns, read_examples

    with pytest.raises(DataError) as e:
        read_examples("hf:org/glue_tiny:mini@train", Columns("sentence"), "train")
    assert "\n" not in str(e.value) and "unreachable" in str(e.value) and "save_to_disk" in str(e.value)


def test_hub_ids_local_folders_and_hf_specs(offline, monkeypatch, tmp_path: Path) -> None:
    from alum_ds import hub as H
    from alum_ds.data.sources import parse_hf
    from alum_ds.finetune.data import Columns, read_examples

    assert H.parse_id("org/tiny@v1") == ("org/tiny", "v1")
    assert H.parse_id("roberta-base") == ("roberta-base", "")
    for not_an_id in ("./org/tiny", "/abs/folder", "a/b/c", "org/tiny@", "~/m", "org//x"):
        assert H.parse_id(not_an_id) is None, not_an_id
    # A local folder of the same name wins over the Hub id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    local = H.resolve("org/tiny", "model.pretrained")
    assert not local.from_hub and local.describe() == "local folder org/tiny"
    assert parse_hf("hf:nyu-mll/glue:mrpc@validation") == ("nyu-mll/glue", "mrpc", "validation")
    assert parse_hf("hf:imdb", split="train") == ("imdb", "", "train")
    for bad in ("hf:", "hf:glue:", "hf:glue@"):
        with pytest.raises(DataError, match="hf:NAME"):
            parse_hf(bad)
    with pytest.raises(DataError) as e:
        read_examples("hf:org/not_cached", Columns(), "train")
    assert "\n" not in str(e.value) and "hf:org/not_cached" in str(e.value) and "task.train" in str(e.value)
