"""Checkpoints through the real launcher (2 CPU ranks, and 1): a kill in the middle of a save,
exact resume on the same and on another number of ranks (universal checkpoints), export, and
continual pretraining from the exported folder.

One uninterrupted 2-rank run is the reference. A second run with the same config is killed
while saving step 4 (tests/fault/pretrain_kill_in_save.py), then continued on 1 rank (steps 3-4,
from step 2: the partial step-4 folder is ignored), then on 2 ranks again (5-8, converted back).
Every step's loss and both evaluations must match the reference: fp32 on the CPU, dropout and
ALUM noise on (their random streams are keyed by the global position of each micro-batch, so they
do not depend on the rank layout as long as schedule.micro_batch_size is unchanged). Tolerance:
1e-4 relative, for the different order of the floating-point gradient sums of 2 ranks (all-reduce)
and 1 rank (accumulation). A plain (non-universal) resume on the same ranks is exact in
tests/test_architectures.py (every family, dropout and ALUM on) and needs no conversion in
tests/test_loop.py's preemption test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alum_ds.cli import main
from tests.conftest import ROOT, deepspeed_cmd, free_port, run

pytestmark = pytest.mark.distributed

STEPS = 8
ARGS = ["--eval.fill_mask=0", "--schedule.steps=100",
        f"--schedule.max_tokens={STEPS * 8 * 32}",  # the budget ends it
        "--schedule.global_batch_size=8", "--schedule.micro_batch_size=4",
        "--schedule.warmup_steps=2", "--schedule.decay=polynomial", "--schedule.power=2",
        "--optim.lr=5e-3", "--logging.every=1", "--model.dropout=0.1", "--checkpoint.every=2",
        "--eval.every=4", "--eval.max_sequences=64", "--alum.start_step=0"]


def _train(run_dir: Path, cache: Path, *extra: str, ranks: int = 2, ok: bool = True,
           env: dict[str, str] | None = None, script: Path = ROOT / "launch" / "pretrain.py") -> str:
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(script),
                          "--ds_config", str(ROOT / "ds_configs" / "zero2.json"),
                          f"--run.dir={run_dir}", f"--data.cache_dir={cache}", *ARGS, *extra,
                          num_gpus=ranks),
            ROOT, {"ALUM_DS_CPU_RANKS": str(ranks), **(env or {})})
    log = r.stdout + r.stderr
    assert (r.returncode == 0) == ok, (r.returncode, log[-4000:])
    return log


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _by_step(run_dir: Path, key: str) -> dict[int, float]:
    steps = [r["step"] for r in _records(run_dir) if key in r]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r[key] for r in _records(run_dir) if key in r}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    log = _train(run_dir, cache_dir)
    assert f"token budget of {STEPS * 8 * 32:,} reached at step {STEPS}" in log
    return run_dir


def test_reference_run_schedule_budget_and_eval(reference: Path) -> None:
    lr = _by_step(reference, "lr")
    assert sorted(lr) == list(range(1, STEPS + 1))  # the token budget ended the run
    # The logged lr is the one of the next step: warmup 2, then (1 - progress) ** 2 down to 0.
    for step, value in lr.items():
        k = step  # scheduler steps taken
        want = 5e-3 * ((k + 1) / 2 if k < 2 else ((STEPS - k) / (STEPS - 2)) ** 2)
        assert value == pytest.approx(want, rel=1e-6, abs=1e-12), (step, value, want)
    assert sorted(_by_step(reference, "eval_loss")) == [4, STEPS]
    recs = [r for r in _records(reference) if "loss" in r]
    assert all(r["peak_rss_gb"] > 0.05 and r["consumed_tokens"] == r["step"] * 8 * 32 for r in recs)
    state = json.loads((reference / "checkpoints" / "step00000008" / "alum_state.json").read_text())
    assert state["world_size"] == 2 and state["stream"]["consumed"] == 64 and state["step"] == 8


def test_kill_in_save_then_resume_on_1_rank_and_back(reference: Path, tmp_path: Path,
                                                     cache_dir: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    log = _train(run_dir, cache_dir, ok=False, env={"KILL_IN_SAVE_STEP": "4"},
                 script=ROOT / "tests" / "fault" / "pretrain_kill_in_save.py")
    assert "kills itself while saving step00000004" in log
    # The kill came after rank 1 wrote its step-4 shards and before `latest` moved.
    assert (ckpt / "latest").read_text() == "step00000002"
    assert (ckpt / "step00000004").is_dir() and not (ckpt / "step00000004" / "alum_state.json").exists()

    log = _train(run_dir, cache_dir, "--run.stop_after=2", ranks=1)
    assert "1 rank(s)" in log and "4 x 2 accumulation x 1" in log
    assert "resumed from" in log and "step00000002 at step 2 (universal: saved by 2 rank(s), now 1)" in log
    assert (ckpt / "latest").read_text() == "step00000004"
    state = json.loads((ckpt / "step00000004" / "alum_state.json").read_text())
    assert state["world_size"] == 1 and state["grad_accum"] == 2 and state["stream"]["consumed"] == 32
    assert not (ckpt / "universal").exists()  # the converted copy is removed once loaded

    log = _train(run_dir, cache_dir)
    assert "step00000004 at step 4 (universal: saved by 1 rank(s), now 2)" in log

    ref, got = _by_step(reference, "loss"), _by_step(run_dir, "loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(ref[step], rel=1e-4), (step, ref, got)
    ref_ev, got_ev = _by_step(reference, "eval_loss"), _by_step(run_dir, "eval_loss")
    assert sorted(got_ev) == [4, STEPS]
    for step in got_ev:
        assert got_ev[step] == pytest.approx(ref_ev[step], rel=1e-4), (step, ref_ev, got_ev)
    # A fresh optimizer would have changed the trajectory far beyond that tolerance; the
    # optimizer's step counter went on too (lr of the last step is the reference's 0).
    assert _by_step(run_dir, "lr")[STEPS] == 0.0
    kept = sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step"))
    assert kept == ["step00000004", "step00000006", "step00000008"]  # checkpoint.keep=3


def _mlm_loss(model: torch.nn.Module, batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    total = count = 0.0
    with torch.no_grad():
        for x, y in batches:
            logits = model(torch.from_numpy(x)).logits
            labels = torch.from_numpy(y)
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             labels.reshape(-1), reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def test_export_equals_engine_and_continual_pretraining(reference: Path, tmp_path: Path,
                                                        cache_dir: Path) -> None:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from alum_ds.config import config_from_dict
    from alum_ds.data.corpus import embedded_documents
    from alum_ds.data.stream import TrainStream, validation_batches
    from alum_ds.evaluation import final_sequences

    out = tmp_path / "hf"
    assert main(["export", str(reference), str(out)]) == 0
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tok) and (out / "model.safetensors").is_file()
    # The exported model's masked-LM loss on the run's validation batches is the run's final
    # evaluation (the engine's numbers, on the whole of the small split), to fp32 precision.
    resolved = json.loads((reference / "config.resolved.json").read_text())
    data_dir = Path(resolved["data_dir"])
    masking = config_from_dict(resolved["config"]).masking  # the run's, whatever its default
    val = validation_batches(data_dir, seq_len=32, seed=1234, masking=masking, batch=16,
                             rank=0, world=1, max_sequences=final_sequences(data_dir, 64))
    assert final_sequences(data_dir, 64) == 0  # the embedded split is evaluated whole
    final_eval = _by_step(reference, "eval_loss")[STEPS]
    assert _mlm_loss(model, val) == pytest.approx(final_eval, abs=1e-4)
    # Anyone's tools load it: the fill-mask pipeline from the folder alone.
    from transformers import pipeline

    fill = pipeline("fill-mask", model=str(out), tokenizer=str(out))
    preds = fill(f"The {tok.mask_token} statement is used for conditional execution.")
    assert len(preds) == 5 and all(p["token_str"] and 0 <= p["score"] <= 1 for p in preds)

    # Continual pretraining: data prepared with the exported model's tokenizer, a new run
    # started from the exported folder. Its first loss is the exported model's loss on that
    # batch, well below a fresh model's.
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in embedded_documents()))
    data2 = tmp_path / "data2"
    assert main(["prepare", str(corpus), "--out", str(data2), "--tokenizer", str(out)]) == 0
    log = _train(tmp_path / "continual", cache_dir, f"--model.pretrained={out}", f"--data.dir={data2}",
                 "--schedule.steps=1", "--schedule.global_batch_size=16", "--model.dropout=0",
                 "--schedule.micro_batch_size=16", ranks=1)
    assert f"model local folder {out}" in log and "warning: the data's tokenizer" not in log
    first = _by_step(tmp_path / "continual", "mlm_loss")[1]
    stream = TrainStream(data2, seq_len=32, seed=1234, masking=masking)
    assert first == pytest.approx(_mlm_loss(model, [stream.batch_at(0, 16)]), abs=1e-4)
    fresh = _by_step(reference, "mlm_loss")[1]
    assert first < fresh - 0.5 and first < math.log(model.config.vocab_size) - 0.5, (first, fresh)
