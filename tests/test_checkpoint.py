"""Stop-and-resume equality and export, through the real launcher with 2 CPU ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alum_ds.cli import main
from tests.conftest import ROOT, deepspeed_cmd, free_port, run

pytestmark = pytest.mark.distributed

ARGS = ["--schedule.steps=8", "--schedule.warmup_steps=2", "--optim.lr=2e-3",
        "--logging.every=1", "--schedule.micro_batch_size=4", "--model.dropout=0.1"]


def _train(run_dir: Path, cache: Path, *extra: str) -> str:
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "launch" / "pretrain.py"),
                          "--ds_config", str(ROOT / "ds_configs" / "zero2.json"),
                          f"--run.dir={run_dir}", f"--data.cache_dir={cache}", *ARGS, *extra), ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout + r.stderr


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_stop_resume_equals_uninterrupted_and_exports(tmp_path: Path, cache_dir: Path) -> None:
    full, split = tmp_path / "full", tmp_path / "split"
    _train(full, cache_dir)
    log = _train(split, cache_dir, "--run.stop_after=4")
    assert "stopped after saving step 4" in log
    assert (split / "checkpoints" / "latest").read_text() == "step00000004"
    log = _train(split, cache_dir)  # the same command again continues the run
    assert "resumed from" in log and "step00000004" in log
    a, b = _losses(full), _losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):  # fp32 on the CPU: equal to 1e-6, dropout and ALUM noise included
        assert b[step] == pytest.approx(a[step], abs=1e-6, rel=1e-6), (step, a, b)

    out = tmp_path / "hf"
    assert main(["export", str(split), str(out)]) == 0
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    model = AutoModelForMaskedLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok)
    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    preds = fill(f"The {tok.mask_token} statement is used for conditional execution.")
    assert len(preds) == 5 and all(p["token_str"] for p in preds)
