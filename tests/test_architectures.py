"""Every supported encoder family end to end through the real launcher (2 CPU ranks, ZeRO-2):
continual pretraining from a local Hugging Face folder, an exact resume, ALUM fine-tuning, export
to the family's own Hugging Face folder and fill-mask on it; a from-scratch BERT on WordPiece
data; headless encoders (a BertModel folder, ELECTRA's discriminator) continued under
``model.new_head``; and a model given as a Hub id, which both ranks resolve at once from a Hub on
127.0.0.1 (tests/hub_server.py): one rank asks the Hub and downloads, the other waits for it.
Tiny configs built here (tests/test_encoders.py's), one BPE tokenizer for all, no network. One
launch runs every case (tests/drivers/arch_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alum_ds.cli import main
from tests.conftest import ROOT, deepspeed_cmd, free_port, run
from tests.hub_server import Hub, Repo, commit_of
from tests.test_encoders import _config

pytestmark = pytest.mark.distributed

FAMILIES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM",
            "xlm-roberta": "XLMRobertaForMaskedLM", "electra": "ElectraForMaskedLM",
            "deberta-v2": "DebertaV2ForMaskedLM", "deberta-v3": "DebertaV2ForMaskedLM",
            "modernbert": "ModernBertForMaskedLM"}
HEADLESS = {"bert-headless": ("bert", "BertModel", "BertForMaskedLM"),
            "electra-discriminator": ("electra", "ElectraForPreTraining", "ElectraForMaskedLM")}
HUB_COMMIT = commit_of("org/arch-tiny")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForMaskedLM

    from alum_ds.data.corpus import embedded_documents
    from alum_ds.data.prepare import prepare
    from alum_ds.data.tokenizer import learn_bpe

    base = tmp_path_factory.mktemp("arch")
    docs = embedded_documents()[:300]
    tok = learn_bpe(docs, 600)
    families = {}
    for family in FAMILIES:
        cfg = _config(family, vocab=len(tok), positions=66)
        # The tokenizer's specials (<s> <pad> </s> <unk> <mask> = 0-4) for every family.
        cfg.pad_token_id, cfg.bos_token_id = tok.pad_token_id, tok.bos_token_id
        cfg.eos_token_id = tok.eos_token_id
        if family == "modernbert":
            cfg.cls_token_id, cfg.sep_token_id = tok.bos_token_id, tok.eos_token_id
        torch.manual_seed(0)
        folder = base / "models" / family
        AutoModelForMaskedLM.from_config(cfg).save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        families[family] = str(folder)
    extra = []
    for name, (family, cls, _) in HEADLESS.items():
        cfg = _config(family, vocab=len(tok), positions=66)
        cfg.pad_token_id = tok.pad_token_id
        torch.manual_seed(0)
        folder = base / "models" / name
        getattr(transformers, cls)(cfg).save_pretrained(str(folder))
        tok.save_pretrained(str(folder))
        extra.append({"name": name, "overrides": [f"--model.pretrained={folder}", "--model.new_head=true"]})
    extra.append({"name": "hub", "overrides": ["--model.pretrained=org/arch-tiny", "--schedule.steps=2"]})
    prepare(documents=docs, out_dir=base / "data", tokenizer=families["roberta"], progress=False)
    prepare(documents=docs, out_dir=base / "wordpiece", vocab_size=600, tokenizer_kind="wordpiece",
            progress=False)
    spec = base / "spec.json"
    spec.write_text(json.dumps({"families": families, "data": str(base / "data"),
                                "wordpiece_data": str(base / "wordpiece"), "cache": str(cache_dir),
                                "out": str(base / "runs"), "ds_config": "zero2.json", "extra": extra}))
    driver = ROOT / "tests" / "drivers" / "arch_runs.py"
    repo = Repo({HUB_COMMIT: Path(families["roberta"])}, {"main": HUB_COMMIT})
    with Hub({"org/arch-tiny": repo}) as hub:
        r = run(deepspeed_cmd(f"--master_port={free_port()}", str(driver), str(spec)), ROOT,
                {"OMP_NUM_THREADS": "1", "HF_HOME": str(base / "hf_home"), "HF_ENDPOINT": hub.endpoint},
                timeout=1200)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    (base / "runs" / "launch.log").write_text(r.stdout + r.stderr)
    (base / "runs" / "hub_requests.json").write_text(json.dumps(hub.requests))
    return base / "runs"


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


@pytest.mark.parametrize("family", FAMILIES)
def test_continual_pretraining_resume_export_and_finetuning(family: str, runs: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, pipeline

    full, resumed = _by_step(runs / family / "full", "loss"), _by_step(runs / family / "resumed", "loss")
    assert sorted(full) == [1, 2, 3, 4, 5] and sorted(resumed) == [4, 5]
    for step in (4, 5):  # same ranks, same ZeRO stage: the resumed steps are the uninterrupted ones
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), (step, full, resumed)
    assert _by_step(runs / family / "resumed", "eval_loss")[5] == pytest.approx(
        _by_step(runs / family / "full", "eval_loss")[5], rel=1e-6)

    out = tmp_path / "hf"
    assert main(["export", str(runs / family / "full" / "checkpoints"), str(out)]) == 0
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert type(model).__name__ == FAMILIES[family]
    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    guesses = fill(f"The return statement leaves the current {fill.tokenizer.mask_token}.")
    assert len(guesses) == 5 and all(g["token_str"] for g in guesses)

    res = json.loads((runs / family / "finetune" / "results.json").read_text())
    assert res["alum"] and res["world_size"] == 2 and 0 <= res["validation"]["accuracy"] <= 1
    ft = [json.loads(x) for x in (runs / family / "finetune" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["adv_loss"] > 0 for r in ft if "ce_loss" in r)


def test_bert_from_scratch_on_wordpiece_data(runs: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    losses = _by_step(runs / "bert-scratch", "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses[5] < losses[1]
    out = tmp_path / "hf"
    assert main(["export", str(runs / "bert-scratch"), str(out)]) == 0
    assert type(AutoModelForMaskedLM.from_pretrained(out)).__name__ == "BertForMaskedLM"
    assert AutoTokenizer.from_pretrained(out).cls_token == "[CLS]"


@pytest.mark.parametrize("name", HEADLESS)
def test_new_head_continues_a_headless_encoder(name: str, runs: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM, pipeline

    family, headless, mlm = HEADLESS[name]
    losses = _by_step(runs / name, "loss")
    assert sorted(losses) == [1, 2, 3, 4, 5] and all(v == v for v in losses.values())
    log = (runs / "launch.log").read_text()
    assert f"models/{name} " in log and "params, new MLM head)" in log
    assert f"warning: model.new_head=true: {mlm}'s MLM head is new" in log
    out = tmp_path / "hf"
    assert main(["export", str(runs / name), str(out)]) == 0
    assert type(AutoModelForMaskedLM.from_pretrained(out)).__name__ == mlm
    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    guesses = fill(f"The return statement leaves the current {fill.tokenizer.mask_token}.")
    assert len(guesses) == 5 and all(g["token_str"] for g in guesses)


def test_hub_id_on_two_ranks_is_asked_and_downloaded_once(runs: Path) -> None:
    requests = json.loads((runs / "hub_requests.json").read_text())
    asks = [r for r in requests if r.startswith("GET /api/models/org/arch-tiny/revision/")]
    gets = [r for r in requests if r.startswith("GET /org/arch-tiny/resolve/")]
    # One rank resolved main and fetched each file; the other waited on the lock in the cache and
    # took that commit without a request of its own.
    assert len(asks) == 1 and gets and len(gets) == len(set(gets)), requests
    resolved = json.loads((runs / "hub" / "config.resolved.json").read_text())
    assert resolved["sources"]["model.pretrained"]["commit"] == HUB_COMMIT
    assert sorted(_by_step(runs / "hub", "loss")) == [1, 2]
    assert f"model Hub org/arch-tiny@{HUB_COMMIT[:12]}" in (runs / "launch.log").read_text()
