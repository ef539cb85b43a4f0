"""Faults a long run meets: divergence (the guard), damaged checkpoints (integrity), a full disk.

Unit tests in one process check the guard's policy and the checkpoint checks on files; two
one-process ``alum-ds train`` runs check a full tmpfs during a save and the rerun; one 2-rank
launch (tests/fault/fault_runs.py) checks, on ZeRO-2: a flipped bit in rank 1's shard and a
garbage ``latest`` (resumed from the previous checkpoint with the uninterrupted run's losses), no
intact checkpoint (one-line refusal, nothing changed), a run poisoned with NaN and one with a
loss spike (both rolled back past the data window, then finished), the NaN run again on
ZeRO-3 (partitioned weights, the rollback reloading a partitioned checkpoint); and on ZeRO-0 fp32 (where the
guard itself skips the update) a NaN run stopped with ``latest`` on its last finite checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from alum_ds import checkpoint as C
from alum_ds.cli import main
from alum_ds.config import GuardConfig, load_config
from alum_ds.guard import Guard
from tests.conftest import ROOT, deepspeed_cmd, free_port, run

RUN = ["--eval.fill_mask=0", "--schedule.steps=8", "--schedule.warmup_steps=1", "--optim.lr=3e-3",
       "--logging.every=1", "--schedule.micro_batch_size=4", "--model.dropout=0.1",
       "--checkpoint.every=2", "--checkpoint.keep=4", "--alum.start_step=4", "--eval.max_sequences=32",
       "--logging.tensorboard=false"]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> dict[int, float]:
    recs = [r for r in _records(run_dir) if "loss" in r]
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {r["step"]: r["loss"] for r in recs}


# -- the guard's policy, one process ---------------------------------------------------------

class _Engine(SimpleNamespace):
    pass


def _guard(**kw) -> tuple[Guard, _Engine]:
    g = Guard(GuardConfig(**kw), torch.device("cpu"))
    eng = _Engine(skipped_steps=0, lr_scheduler=SimpleNamespace(steps=0))
    eng.lr_scheduler.step = lambda: setattr(eng.lr_scheduler, "steps", eng.lr_scheduler.steps + 1)
    return g, eng


def _step(g: Guard, eng: _Engine, step: int, loss: float, *, grad_ok: bool = True):
    g.add({"task_sum": torch.tensor(loss * 10), "rows": 10})
    before = eng.skipped_steps
    eng.skipped_steps += 0 if grad_ok else 1
    g.stepped(step, eng, before)
    return g.judge(g.payload().tolist())


def test_guard_counts_nonfinite_steps_and_acts_on_a_run_of_them() -> None:
    g, eng = _guard(max_nonfinite=3)
    assert _step(g, eng, 1, 5.0).trigger == "" and not g.healthy()
    v = _step(g, eng, 2, math.nan, grad_ok=False)
    assert v.skipped and not v.trigger and g.healthy()  # skipped, counted, not yet acted on
    assert eng.lr_scheduler.steps == 1  # the skipped step's learning rate is spent
    assert not _step(g, eng, 3, 4.0).trigger and not g.healthy()  # a finite step ends the run
    for s in (4, 5):
        assert not _step(g, eng, s, math.inf, grad_ok=False).trigger
    v = _step(g, eng, 6, 4.0, grad_ok=False)  # finite loss, non-finite gradient norm
    assert "3 steps in a row with a non-finite gradient norm (steps 4-6" in v.trigger
    assert g.skipped_total == 4 and "non-finite" in g.healthy()


def test_guard_spike_is_a_multiple_of_the_running_median_for_m_steps() -> None:
    g, eng = _guard(spike_factor=2.0, spike_window=4, spike_steps=2)
    for s, loss in enumerate([8.0, 7.0, 6.0, 5.0], 1):
        assert not _step(g, eng, s, loss).trigger
    assert g.spike_limit() == 2.0 * 6.5
    assert not _step(g, eng, 5, 12.9).trigger and not g.healthy()  # below 13: kept
    assert not _step(g, eng, 6, 14.0).trigger and "spiked for 1" in g.healthy()
    assert "for 2 steps (steps 6-7" in _step(g, eng, 7, 1e6).trigger
    assert list(g.history) == [7.0, 6.0, 5.0, 12.9]  # spikes never enter the median
    off, eng = _guard(spike_factor=0)
    for s in range(1, 30):
        assert not _step(off, eng, s, 10.0 ** s).trigger


@pytest.mark.parametrize("override, needle", [
    ("--guard.max_nonfinite=0", "guard.max_nonfinite: must be >= 1"),
    ("--guard.spike_factor=1", "guard.spike_factor: must be 0 (off) or a finite number above 1"),
    ("--guard.spike_factor=inf", "guard.spike_factor: must be 0 (off)"),
    ("--guard.action=retry", "guard.action: 'retry' is not one of rollback, stop"),
])
def test_guard_settings_are_checked(override: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def _strict(text: str) -> dict:
    """Parse as RFC 8259 JSON: NaN and Infinity literals are errors."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON literal {name}")
    return json.loads(text, parse_constant=refuse)


def test_metrics_of_a_non_finite_step_are_standard_json(tmp_path: Path) -> None:
    from alum_ds import records
    from alum_ds.metrics import MetricsLogger
    from alum_ds.plot import read_metrics

    log = MetricsLogger(tmp_path, enabled=True, tensorboard=True, total_steps=3)
    log.log(1, {"loss": 5.0, "mlm_loss": 5.0, "lr": 1e-3, "tokens_per_s": 10.0})
    log.log(2, {"loss": math.nan, "mlm_loss": math.nan, "grad_norm": math.inf, "lr": 1e-3,
                "tokens_per_s": 10.0, "eval_loss/a/b": -math.inf, "per": [1.0, math.nan]})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    one, two = (_strict(x) for x in lines)
    assert "nonfinite" not in one and one["loss"] == 5.0
    assert two["loss"] is None and two["grad_norm"] is None and two["per"] == [1.0, None]
    assert two["nonfinite"] == {"/loss": "NaN", "/mlm_loss": "NaN", "/grad_norm": "Infinity",
                                "/eval_loss~1a~1b": "-Infinity", "/per/1": "NaN"}
    back = records.loads(lines[1])
    assert math.isnan(back["loss"]) and back["grad_norm"] == math.inf
    assert back["eval_loss/a/b"] == -math.inf and math.isnan(back["per"][1]) and "nonfinite" not in back
    train, _, _ = read_metrics(tmp_path)  # the plot's reader sees the NaN, not a null
    assert math.isnan(train[2]["loss"]) and train[1]["loss"] == 5.0
    assert records.dumps({"eval_loss": math.nan}) == '{"eval_loss": null, "nonfinite": {"/eval_loss": "NaN"}}'


# -- checkpoint integrity on files, one process ----------------------------------------------

def _checkpoint(root: Path, step: int, payload: dict[str, bytes]) -> C.ResumePoint:
    tag_dir = root / C.tag_for(step)
    tag_dir.mkdir(parents=True)
    for name, data in payload.items():
        (tag_dir / name).write_bytes(data)
    files = {}
    for rank in (0, 1):
        files.update(C.hash_own_files(tag_dir, rank))
    cfg = load_config(None, [])
    state = {"version": C.STATE_VERSION, "step": step, "world_size": 2, "zero_stage": 2,
             "stream": {"consumed": 8 * step}, "config_hash": cfg.fingerprint(),
             "config": cfg.to_dict(), "files": files, "data_dir": str(root / "no_data")}
    (tag_dir / C.STATE_FILE).write_text(json.dumps(state))
    (root / "latest").write_text(C.tag_for(step))
    return C.ResumePoint(root, C.tag_for(step), state)


SHARDS = {"mp_rank_00_model_states.pt": bytes(range(256)) * 40,
          "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"\x01" * 5000,
          "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"\x02" * 5000}


def test_checksums_cover_every_rank_and_name_the_damage(tmp_path: Path) -> None:
    p = _checkpoint(tmp_path, 4, SHARDS)
    owners = {n: m["rank"] for n, m in p.state["files"].items()}
    assert owners == {"mp_rank_00_model_states.pt": 0, "zero_pp_rank_0_mp_rank_00_optim_states.pt": 0,
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt": 1}
    assert C.verify(p) == "" and C.verify(p, 1, 2) == ""
    shard = p.path / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[2500] ^= 1  # one flipped bit
    shard.write_bytes(bytes(data))
    assert "does not match the sha256" in C.verify(p) and str(shard) in C.verify(p)
    assert C.verify(p, 0, 2) == ""  # rank 0's share is intact: rank 1 checks its own file
    assert "does not match" in C.verify(p, 1, 2)
    os.truncate(shard, 100)
    assert "has 100 bytes, 5,000 were written" in C.verify(p)
    shard.unlink()
    assert C.verify(p, 1, 2) == f"{shard} is missing"


def test_garbage_latest_resumes_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    root = C.checkpoint_dir(tmp_path)
    _checkpoint(root, 2, SHARDS)
    _checkpoint(root, 4, SHARDS)
    (root / C.tag_for(6)).mkdir()  # an interrupted save: no alum_state.json
    (root / "latest").write_bytes(b"\xff\xfe\x00garbage")
    point = C.find_resume(tmp_path)
    assert point.tag == C.tag_for(4) and "checkpoints/latest is damaged" in point.note
    assert C.read_latest(root) is None  # a save moves it (a garbage latest never matches a tag)


def test_export_and_finetune_refuse_a_damaged_checkpoint_in_one_line(tmp_path: Path, capsys) -> None:
    from alum_ds.data.shards import DataError
    from alum_ds.finetune.source import resolve_source

    root = C.checkpoint_dir(tmp_path / "run")
    p = _checkpoint(root, 4, SHARDS)
    os.truncate(p.path / "mp_rank_00_model_states.pt", 10)
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alum-ds: error: checkpoint ") and "is damaged" in err[0], err
    assert "has 10 bytes" in err[0] and not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="is damaged: .* has 10 bytes"):
        resolve_source(str(tmp_path / "run"))


# -- one-process runs ------------------------------------------------------------------------

def _one_process(script: Path, run_dir: Path, cache: Path, *extra: str, env: dict | None = None,
                 ds: str = "zero2.json") -> subprocess.CompletedProcess:
    return run([sys.executable, str(script), "--ds_config", ds, f"--run.dir={run_dir}",
                f"--data.cache_dir={cache}", *RUN, *extra], ROOT, env)


def test_full_disk_during_save_is_one_line_and_the_rerun_resumes_exactly(
        tmp_path: Path, cache_dir: Path) -> None:
    """A 12 MiB tmpfs holds one checkpoint of the tiny model (8.2 MB) but not two: the save of
    step 4 fails (a real ENOSPC from torch.save). After the file system is enlarged the rerun
    resumes from step 2 and repeats steps 3-4 exactly."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True)
    try:
        run_dir = mnt / "run"
        r = _one_process(ROOT / "launch" / "pretrain.py", run_dir, cache_dir, ds="zero0.json")
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
        line = err[-1]
        assert line.startswith(f"alum-ds: error: no space left on the device of {run_dir / 'checkpoints'} "
                               "while saving checkpoint step00000004: a checkpoint needs about "), line
        need = C.checkpoint_bytes(run_dir / "checkpoints" / C.tag_for(2))
        assert f"{need:,} bytes" in line and "to resume from step00000002" in line
        assert (run_dir / "checkpoints" / "latest").read_text() == C.tag_for(2)
        assert not (run_dir / "checkpoints" / C.tag_for(4)).exists()  # the partial save is gone
        before = _losses(run_dir)
        assert sorted(before) == [1, 2, 3, 4]
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        r = _one_process(ROOT / "launch" / "pretrain.py", run_dir, cache_dir, ds="zero0.json")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "resumed from" in r.stderr and "at step 2" in r.stderr
        after = _losses(run_dir)
        assert sorted(after) == list(range(1, 9))
        assert [after[s] for s in (3, 4)] == [before[s] for s in (3, 4)]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- one 2-rank launch -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    base = tmp_path_factory.mktemp("faults")
    ds = str(ROOT / "ds_configs" / "zero2.json")
    args = [*RUN, f"--data.cache_dir={cache_dir}"]
    ref, dmg, none = base / "ref", base / "dmg", base / "none"
    ck = "checkpoints"
    rank1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    steps = [
        {"train": [str(ref), ds, args]},
        {"copy": [str(ref), str(dmg)]},
        {"flip": [str(dmg / ck / C.tag_for(8) / rank1), 3000]},
        {"write": [str(dmg / ck / "latest"), "\u00ff\u0000garbage"]},
        {"train": [str(dmg), ds, args]},
        {"copy": [str(ref), str(none)]},
        {"truncate": [str(none / ck / C.tag_for(8) / "mp_rank_00_model_states.pt"), 100]},
        *[{"remove": str(none / ck / C.tag_for(s) / rank1)} for s in (2, 4, 6)],
        {"train": [str(none), ds, args]},
        {"train": [str(base / "nan"), ds, [*args, "--schedule.steps=12", "--checkpoint.keep=1"]],
         "env": {"POISON_STEP": "5", "POISON_ONCE": "1"}},
        {"train": [str(base / "spike"), ds, [*args, "--schedule.steps=12", "--guard.spike_steps=2",
                                             "--guard.spike_window=4"]],
         "env": {"POISON_LOSS_AT": "6,7"}},
        {"train": [str(base / "z3"), str(ROOT / "ds_configs" / "zero3.json"),
                   [*args, "--schedule.steps=12", "--checkpoint.keep=1"]],
         "env": {"POISON_STEP": "5", "POISON_ONCE": "1"}},
        {"train": [str(base / "stop"), str(ROOT / "ds_configs" / "zero0.json"),
                   [*args, "--schedule.steps=12", "--checkpoint.keep=1", "--guard.action=stop"]],
         "env": {"POISON_STEP": "5"}},
    ]
    spec = base / "spec.json"
    spec.write_text(json.dumps({"steps": steps}))
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "tests" / "fault" / "fault_runs.py"),
                          str(spec)), ROOT, {"ALUM_DS_CPU_RANKS": "2"})
    assert r.returncode == 0, r.stderr[-5000:]
    return {"base": base, "log": r.stdout + r.stderr}


@pytest.mark.distributed
def test_flipped_bit_resumes_from_the_previous_checkpoint_with_the_same_losses(faults: dict) -> None:
    ref, dmg = faults["base"] / "ref", faults["base"] / "dmg"
    state = C.read_state(C.checkpoint_dir(ref) / C.tag_for(8))
    assert {m["rank"] for m in state["files"].values()} == {0, 1}  # both ranks' shards recorded
    log = faults["log"]
    assert "checkpoints/latest is damaged (not a checkpoint name)" in log
    assert (f"checkpoint step00000008 is damaged ({C.checkpoint_dir(dmg) / C.tag_for(8)}/"
            "zero_pp_rank_1_mp_rank_00_optim_states.pt does not match the sha256") in log
    assert f"resumed from {C.checkpoint_dir(dmg) / C.tag_for(6)} at step 6" in log
    assert (C.checkpoint_dir(dmg) / (C.tag_for(8) + C.DAMAGED_SUFFIX)).is_dir()
    assert (C.checkpoint_dir(dmg) / "latest").read_text() == C.tag_for(8)  # saved anew
    a, b = _losses(ref), _losses(dmg)
    assert sorted(b) == sorted(a) == list(range(1, 9))
    assert [b[s] for s in (7, 8)] == pytest.approx([a[s] for s in (7, 8)], rel=1e-6)
    ev = [[r["eval_loss"] for r in _records(x) if "eval_loss" in r][-1] for x in (ref, dmg)]
    assert ev[1] == pytest.approx(ev[0], rel=1e-6)


@pytest.mark.distributed
def test_no_intact_checkpoint_is_refused_and_nothing_changes(faults: dict) -> None:
    none = faults["base"] / "none"
    line = next(x for x in faults["log"].splitlines() if f"refused: checkpoint {C.checkpoint_dir(none)}" in x)
    assert "step00000002 is damaged: " in line
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing" in line
    assert "(and so are the 3 newer ones); no older complete checkpoint is there" in line
    root = C.checkpoint_dir(none)
    assert (root / "latest").read_text() == C.tag_for(8)
    assert not any(p.name.endswith(C.DAMAGED_SUFFIX) for p in root.iterdir())
    assert sorted(_losses(none)) == list(range(1, 9))  # metrics untouched: nothing ran


@pytest.mark.distributed
def test_nan_and_spike_roll_back_and_skip_the_window(faults: dict) -> None:
    log = faults["log"]
    nan, spike = faults["base"] / "nan", faults["base"] / "spike"
    assert (f"guard: 3 steps in a row with a non-finite loss (steps 6-8; guard.max_nonfinite=3): "
            f"rolled back to {C.checkpoint_dir(nan) / C.tag_for(4)} (step 4) and skipped the 32 "
            "sequences seen since it") in log
    assert "guard: step 6 not saved" in log
    for run_dir, skipped in ((nan, 32), (spike, 24)):
        recs = _records(run_dir)
        assert sorted(_losses(run_dir)) == list(range(1, 13))  # the abandoned steps were dropped
        assert all(math.isfinite(v) for v in _losses(run_dir).values())
        last = [r for r in recs if "consumed_sequences" in r][-1]
        assert last["step"] == 12 and last["consumed_sequences"] == 12 * 8 + skipped
        assert (C.checkpoint_dir(run_dir) / "latest").read_text() == C.tag_for(12)
    assert ("loss above 2 x its running median" in log and "for 2 steps (steps 6-7" in log
            and f"rolled back to {C.checkpoint_dir(spike) / C.tag_for(4)}" in log)


@pytest.mark.distributed
def test_nan_rolls_back_under_zero3(faults: dict) -> None:
    """ZeRO-3: each rank holds a partition of the weights (the poisoned one too) and the rollback
    reloads the partitioned checkpoint mid-run; with checkpoint.keep=1 the step-4 checkpoint it
    rolls back to is the only one kept through the NaN steps."""
    z3 = faults["base"] / "z3"
    root = C.checkpoint_dir(z3)
    assert (f"guard: 3 steps in a row with a non-finite loss (steps 6-8; guard.max_nonfinite=3): "
            f"rolled back to {root / C.tag_for(4)} (step 4) and skipped the 32 sequences seen "
            "since it") in faults["log"]
    state = C.read_state(root / C.tag_for(12))
    assert state["zero_stage"] == 3 and {m["rank"] for m in state["files"].values()} == {0, 1}
    losses = _losses(z3)
    assert sorted(losses) == list(range(1, 13)) and all(math.isfinite(v) for v in losses.values())
    last = [r for r in _records(z3) if "consumed_sequences" in r][-1]
    assert last["step"] == 12 and last["consumed_sequences"] == 12 * 8 + 32
    assert (root / "latest").read_text() == C.tag_for(12) and C.complete_tags(root) == [C.tag_for(12)]


@pytest.mark.distributed
def test_nan_run_stops_with_latest_on_the_last_finite_checkpoint(faults: dict) -> None:
    """ZeRO-0 fp32 (the plain torch optimizer: the guard skips the update itself). NaN weights
    from step 5 on: steps 6-8 are skipped, the save of step 6 is refused, and with
    checkpoint.keep=1 retention still keeps step 4 (before the guard, steps 6 and 8 were saved
    with broken weights and step 4 was pruned)."""
    run_dir = faults["base"] / "stop"
    root = C.checkpoint_dir(run_dir)
    line = next(x for x in faults["log"].splitlines() if "refused: training diverged" in x)
    assert line.endswith("refused: training diverged at step 8: 3 steps in a row with a non-finite loss "
                         "(steps 6-8; guard.max_nonfinite=3); stopped; checkpoints/latest names "
                         "step00000004, the newest healthy checkpoint: rerun with a lower --optim.lr "
                         "or a longer warm-up"), line
    assert "warning: step 6: non-finite loss: no optimizer update (1 in a row" in faults["log"]
    assert (root / "latest").read_text() == C.tag_for(4)
    assert C.complete_tags(root) == [C.tag_for(4)]
    recs = [_strict(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]  # standard JSON
    skipped = {r["step"]: r for r in recs if "loss" in r and r["step"] in (6, 7, 8)}
    assert sorted(skipped) == [6, 7, 8]
    assert all(r["loss"] is None and r["nonfinite"]["/loss"] == "NaN" for r in skipped.values())
    assert C.verify(C.find_resume(run_dir)) == ""
    weights = torch.load(root / C.tag_for(4) / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.isfinite(t).all() for t in weights.values())
