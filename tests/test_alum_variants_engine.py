"""The cheaper ALUM variants through the real launcher (2 CPU ranks, one launch for all runs,
tests/drivers/train_runs.py): every variant trains under ZeRO-0 to 3 and reports the held-out
smoothness; the perturbation table resumes exactly on the same ranks and survives a change to
one rank (a plain one-rank process, no second launch)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, deepspeed_cmd, free_port, run

pytestmark = pytest.mark.distributed

QUICK = ["--eval.fill_mask=0", "--schedule.steps=8", "--schedule.warmup_steps=1", "--optim.lr=3e-3",
         "--logging.every=1", "--schedule.micro_batch_size=4", "--schedule.global_batch_size=8",
         "--model.dropout=0", "--alum.start_step=0", "--logging.tensorboard=false",
         "--eval.max_sequences=32", "--eval.adv_kl_sequences=16", "--checkpoint.keep=3"]
TABLE = ["--alum.perturbation=table"]
RUNS = {  # name: (DeepSpeed config, extra flags); "cut" twice: stopped at 4, then resumed
    "zero0_table": ("zero0.json", TABLE),
    "zero1_rows": ("zero1.json", ["--alum.row_fraction=0.5"]),
    "zero2_every": ("zero2.json", ["--alum.every_k_steps=2"]),
    "zero3_all": ("zero3.json", [*TABLE, "--alum.row_fraction=0.5", "--alum.every_k_steps=2"]),
    "ref": ("zero2.json", TABLE),
    "cut": ("zero2.json", [*TABLE, "--run.stop_after=4"]),
    "cut ": ("zero2.json", TABLE),
    "ranks": ("zero2.json", [*TABLE, "--run.stop_after=4"]),
}


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(recs: list[dict], key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in recs if "loss" in r and key in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    base = tmp_path_factory.mktemp("variants")
    spec = base / "spec.json"
    spec.write_text(json.dumps({"runs": [
        [str(base / name.strip()), str(ROOT / "ds_configs" / ds),
         [f"--data.cache_dir={cache_dir}", *QUICK, *extra]] for name, (ds, extra) in RUNS.items()]}))
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "tests" / "drivers" / "train_runs.py"),
                          str(spec)), ROOT, timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    # The 2-rank checkpoint at step 4 resumed on one rank (a plain process: `alum-ds train`'s
    # one-rank world), once as saved and once with the table file removed.
    # The table-less copy stands for a checkpoint written without one (its file record without
    # the entry), not a damaged one: a recorded file that is missing is refused.
    shutil.copytree(base / "ranks", base / "ranks_notable")
    tag = base / "ranks_notable" / "checkpoints" / "step00000004"
    (tag / "alum_objective.safetensors").unlink()
    state = json.loads((tag / "alum_state.json").read_text())
    del state["files"]["alum_objective.safetensors"]
    (tag / "alum_state.json").write_text(json.dumps(state))
    spec1 = base / "spec1.json"
    spec1.write_text(json.dumps({"runs": [
        [str(base / name), str(ROOT / "ds_configs" / "zero2.json"),
         [f"--data.cache_dir={cache_dir}", *QUICK, *TABLE]] for name in ("ranks", "ranks_notable")]}))
    r = run([sys.executable, str(ROOT / "tests" / "drivers" / "train_runs.py"), str(spec1)], ROOT,
            {"MASTER_PORT": free_port()}, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    assert (r.stdout + r.stderr).count("universal: saved by 2 rank(s), now 1") == 2
    return base


@pytest.mark.parametrize("name", ["zero0_table", "zero1_rows", "zero2_every", "zero3_all"])
def test_every_variant_trains_under_every_zero_stage(runs: Path, name: str) -> None:
    recs = _records(runs / name)
    loss = _train(recs, "loss")
    assert sorted(loss) == list(range(1, 9)) and loss[8] < loss[1] - 0.05, loss
    on = {r["step"]: r["alum_on"] for r in recs if "loss" in r}
    if "every" in name or "all" in name:  # the adversarial term on steps 1, 3, 5, 7 (0-based 0, 2, ...)
        assert [s for s in on if on[s]] == [1, 3, 5, 7]
    else:
        assert all(on.values())
    adv = _train(recs, "adv_loss")
    assert set(adv) == {s for s in on if on[s]} and all(v > 0 for v in adv.values())
    final = [r for r in recs if "eval_loss" in r][-1]
    assert final["eval_adv_kl_3eps"] > final["eval_adv_kl_eps"] > 0
    s0, s1 = (json.loads((runs / name / f"summary.rank{i}.json").read_text()) for i in (0, 1))
    assert s0["param_checksum"] == pytest.approx(s1["param_checksum"], rel=1e-9)
    table = runs / name / "checkpoints" / "step00000008" / "alum_objective.safetensors"
    assert table.is_file() == ("table" in name or "all" in name)


def test_table_resumes_exactly_and_survives_a_change_of_ranks(runs: Path) -> None:
    ref = _records(runs / "ref")
    cut = _records(runs / "cut")
    for key in ("loss", "adv_loss"):
        a, b = _train(ref, key), _train(cut, key)
        assert sorted(b) == list(range(1, 9))
        assert [b[s] for s in range(1, 9)] == pytest.approx([a[s] for s in range(1, 9)], rel=1e-6)
    # One rank from the 2-rank checkpoint: the same table, so the same strong perturbation from
    # the first step on (not bitwise: one rank runs the two micro-batches that two ranks ran side
    # by side one after the other, so the second already sees the first's table update, measured
    # ~10% stronger); without the table file it starts from zero, and the adversarial term of
    # its first step is two orders of magnitude smaller.
    a = _train(ref, "adv_loss")
    one = _train(_records(runs / "ranks"), "adv_loss")
    fresh = _train(_records(runs / "ranks_notable"), "adv_loss")
    assert [one[s] for s in range(5, 9)] == pytest.approx([a[s] for s in range(5, 9)], rel=0.25)
    assert fresh[5] < 0.05 * a[5] and one[5] > 0.8 * a[5]
    assert _train(_records(runs / "ranks"), "loss")[8] == pytest.approx(_train(ref, "loss")[8], rel=1e-3)
