"""ALUM through the real DeepSpeed launcher (2 CPU ranks): ZeRO-3 with CPU offload, ZeRO-3 with
activation checkpointing, and the ALUM benchmark's quick mode. GPU-only runs (fp16 under
DeepSpeed) are marked ``gpu`` and skipped without CUDA."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, deepspeed_cmd, free_port, run
from tests.test_distributed import _stage

pytestmark = pytest.mark.distributed

QUICK = ["--eval.fill_mask=0", "--schedule.steps=6", "--schedule.warmup_steps=1", "--optim.lr=3e-3",
         "--logging.every=1",
         "--schedule.micro_batch_size=4", "--model.dropout=0", "--checkpoint.every=3",
         "--alum.start_step=0"]  # ALUM on every step: what these tests pin


def _train(run_dir: Path, cache: Path, ds: str, extra: list[str] = (), *, num_gpus: int = 2,
           ok: bool = True) -> str:
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "launch" / "pretrain.py"),
                          "--ds_config", str(ROOT / "ds_configs" / ds), f"--run.dir={run_dir}",
                          f"--data.cache_dir={cache}", *QUICK, *extra, num_gpus=num_gpus), ROOT)
    log = r.stdout + r.stderr
    assert (r.returncode == 0) == ok, log[-4000:]
    return log


def _records(run_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def _check_alum_run(run_dir: Path, log: str) -> None:
    assert "ALUM on" in log
    recs = _records(run_dir)
    losses = [r["loss"] for r in recs]
    assert len(losses) == 6 and all(x == x and abs(x) < 1e4 for x in losses), losses
    assert all(r["adv_loss"] > 0 and r["adv_skipped_total"] == 0 for r in recs)
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000006"
    assert any((ckpt / "step00000006").iterdir())


# The two ZeRO-3 runs below are part of tests/test_distributed.py's shared launch (one launcher
# start for every quick 2-rank run; QUICK above is their settings): each test reads its run's
# folder and banner line.


def test_alum_zero3_cpu_offload(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> None:
    run_dir, log = _stage("zero3_offload", tmp_path_factory, cache_dir)
    assert "ZeRO-3" in log and "zero3_offload.json" in log
    _check_alum_run(run_dir, log)
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    zero = resolved["deepspeed"]["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"


def test_alum_zero3_activation_checkpointing(tmp_path_factory: pytest.TempPathFactory,
                                             cache_dir: Path) -> None:
    """Non-reentrant checkpointing under ZeRO-3: the ascent's torch.autograd.grad and the final
    backward both recompute the checkpointed layers."""
    run_dir, log = _stage("zero3_checkpointing", tmp_path_factory, cache_dir)
    assert "ZeRO-3" in log
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert resolved["config"]["model"]["activation_checkpointing"] is True
    _check_alum_run(run_dir, log)


def test_bench_alum_quick_mode(tmp_path: Path) -> None:
    """The benchmark runs end to end (plain, ALUM unfused and fused, the cheaper variants,
    baseline, on one ZeRO-2 engine over 2 ranks) and writes its figures, the FLOPs of every
    variant among them; no timing is asserted."""
    out = tmp_path / "alum.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_alum.py"), "--quick",
                        f"--out={out}", f"--master_port={free_port()}"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    res = json.loads(out.read_text())
    assert res["setting"]["ranks"] == 2 and res["setting"]["zero_stage"] == 2
    assert set(res["variants"]) == {"plain", "alum", "alum_fused", "rows25", "table", "table_rows50",
                                    "baseline"}
    flops = res["flops"]
    assert set(flops) == set(res["variants"]) | {"every4"}
    # counted hardware FLOPs against the FLOP model: ALUM 8/3 of plain; the ascent-free table 2x
    plain_hw = flops["plain"]["hardware_flops"]
    assert flops["alum"]["hardware_flops"] / plain_hw == pytest.approx(8 / 3, rel=0.05)
    assert flops["table"]["hardware_flops"] / plain_hw == pytest.approx(2, rel=0.05)
    assert all(0 < f["hardware_fraction_of_gemm_rate"] and 0 < f["model_fraction_of_gemm_rate"]
               for f in flops.values())
    for v in res["variants"].values():
        for key in ("step_s", "forward_s", "backward_s", "optimizer_s", "peak_mb", "peak_growth_mb",
                    "last_loss", "objective_peak_growth_mb"):
            assert key in v
        assert v["step_s"] > 0 and v["peak_mb"] > 0 and v["last_loss"] == v["last_loss"]
    for key in ("alum_vs_plain", "alum_fused_vs_plain", "alum_vs_baseline_time",
                "alum_vs_baseline_memory", "alum_vs_flop_model", "alum_compute_vs_flop_model"):
        assert res["ratios"][key] > 0
    assert res["flop_model"]["alum_vs_plain"] == pytest.approx(8 / 3)
    assert "alum" in r.stdout and "baseline" in r.stdout  # the table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_precision_guard_through_the_engine(tmp_path: Path, cache_dir: Path) -> None:
    """fp16 under DeepSpeed (dynamic loss scaling): the default radius is refused with a radius
    that survives fp16; with it ALUM trains, finite, and the ascent is never skipped."""
    gpus = min(2, torch.cuda.device_count())
    r_log = _train(tmp_path / "a", cache_dir, "zero2_fp16.json", num_gpus=gpus, ok=False)
    assert "Traceback" not in r_log, r_log[-3000:]
    m = re.search(r"does not survive float16.*--alum\.eta=([0-9.e-]+)", r_log)
    assert m, r_log[-3000:]
    run_dir = tmp_path / "b"
    _train(run_dir, cache_dir, "zero2_fp16.json", [f"--alum.eta={m.group(1)}",
                                                    f"--alum.epsilon={m.group(1)}"], num_gpus=gpus)
    recs = _records(run_dir)
    assert recs and all(r["loss"] == r["loss"] and r["adv_skipped_total"] == 0 for r in recs)
