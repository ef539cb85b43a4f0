"""``alum-ds plan``: what it prints is the run's own plan, it writes nothing, it refuses what the
run refuses, and the memory estimate divides model states by ZeRO stage."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from alum_ds.cli import main
from alum_ds.config import load_config
from alum_ds.planning import estimate_memory, meta_model


def test_plan_prints_the_run_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALUM_DS_CACHE", str(tmp_path / "cache"))
    assert main(["plan", "--world=2", "--schedule.global_batch_size=128", "--run.dir=run"]) == 0
    out = capsys.readouterr().out
    assert "batch: 32 micro x 2 accumulation x 2 ranks = 128 sequences (4,096 tokens) per step" in out
    assert "ALUM: from step 1125 of 1250 (125 steps with ALUM), K=1" in out
    assert "ZeRO-2, fp32, offload off" in out and "checkpoint: new run" in out
    assert "to be prepared on first use" in out
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    # The run's refusal, as one line.
    assert main(["plan", "--world=3", "--schedule.global_batch_size=128"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alum-ds: error: ") and err.count("\n") == 1 and "global_batch_size" in err


@pytest.mark.parametrize("stage,offload", [(0, False), (1, False), (2, False), (3, False), (3, True)])
def test_memory_by_zero_stage(stage: int, offload: bool) -> None:
    cfg = load_config(None, ["--model.preset=base", "--data.seq_len=128", "--schedule.micro_batch_size=1"])
    model = meta_model(cfg, 50265)
    n = sum(p.numel() for p in model.parameters())
    plan = types.SimpleNamespace(world=4, ds=types.SimpleNamespace(zero_stage=stage, precision="bf16",
                                                                  offload=offload))
    m = estimate_memory(n, model.config, plan, cfg)
    assert m.params == (0.0 if offload else pytest.approx(2 * n / (4 if stage == 3 else 1)))
    assert m.grads == pytest.approx(2 * n / (4 if stage >= 2 else 1))
    opt = 12 * n / (4 if stage >= 1 else 1)
    assert (m.optimizer, m.offloaded) == ((0.0, pytest.approx(opt + 2 * n / 4)) if offload
                                          else (pytest.approx(opt), 0.0))
    assert m.activations > 0
