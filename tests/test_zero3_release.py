"""ZeRO-3 that releases every gathered parameter between ALUM's passes (2 CPU ranks, tiny model).

ds_configs/zero3*.json set stage3_max_reuse_distance below one encoder's parameters so that the
three passes of an ALUM micro-step (clean, ascent, adversarial) do not keep the whole model
gathered (ds_configs/README.md). The tiny model is smaller than those thresholds, so this test
forces the same path with thresholds of zero: every parameter, LayerNorms included, is
re-gathered for each pass and for both backward traversals (the ascent's torch.autograd.grad and
engine.backward). The losses must still equal ZeRO-0's step by step, and the export of the
partitioned checkpoint must reproduce the engine's final evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alum_ds.cli import main
from tests.test_checkpoint import _mlm_loss
from tests.test_distributed import _losses, _stage

pytestmark = pytest.mark.distributed


def test_zero3_release_between_passes_matches_zero0_and_exports(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, cache_dir: Path
) -> None:
    from transformers import AutoModelForMaskedLM

    from alum_ds.config import config_from_dict
    from alum_ds.data.stream import validation_batches

    # The run is one of tests/test_distributed.py's shared launch: its DeepSpeed config is
    # ds_configs/zero3.json with the four thresholds at zero (_zero3_release_config); the export
    # check below scores the sequences its final evaluation scored.
    run_dir, log = _stage("zero3_release", tmp_path_factory, cache_dir)
    assert "ZeRO-3" in log
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    cfg = resolved["deepspeed"]["zero_optimization"]
    assert cfg["stage"] == 3 and all(cfg[k] == 0 for k in (
        "stage3_max_reuse_distance", "stage3_max_live_parameters", "stage3_prefetch_bucket_size",
        "stage3_param_persistence_threshold"))
    ref = _losses(_stage("zero0.json", tmp_path_factory, cache_dir)[0])
    assert _losses(run_dir) == pytest.approx(ref, rel=1e-4, abs=1e-5)

    out = tmp_path / "hf"
    assert main(["export", str(run_dir), str(out)]) == 0
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    data_dir, seq_len = Path(resolved["data_dir"]), resolved["config"]["data"]["seq_len"]
    masking = config_from_dict(resolved["config"]).masking  # the run's, whatever its default
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if "eval_loss" in r][-1]
    # The final evaluation's scope as recorded (0: the whole split, which it is for a small one).
    val = validation_batches(data_dir, seq_len=seq_len, seed=1234, masking=masking, batch=16,
                             rank=0, world=1, max_sequences=final["eval_sequences"])
    assert _mlm_loss(model, val) == pytest.approx(final["eval_loss"], abs=1e-4)
