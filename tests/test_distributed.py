"""Real DeepSpeed runs through the real launcher: 2 CPU ranks, tiny model, ALUM on."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, deepspeed_cmd, free_port, run

pytestmark = pytest.mark.distributed

QUICK = ["--eval.fill_mask=0", "--schedule.steps=8", "--schedule.warmup_steps=1", "--optim.lr=3e-3",
         "--logging.every=1", "--schedule.micro_batch_size=4", "--model.dropout=0",
         "--alum.start_step=0"]  # ALUM on every step: what these tests pin


def _losses(run_dir: Path) -> list[float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


# Every quick 2-rank run that the tests below, tests/test_zero3_release.py,
# tests/test_alum_engine.py and tests/test_finetune.py assert on or start from, in one launch
# (tests/drivers/train_runs.py: one process per rank runs them one after the other; each seeds
# itself, so it computes what it would alone). Starting the launcher costs more than a tiny run.
# Each test reads its run's folder and the run's banner line (ranks, ZeRO stage, ALUM, batch).
_BATCH: dict[str, tuple[Path, str]] = {}
_BATCH_FAILED: list[str] = []


def _zero3_release_config(path: Path) -> Path:
    """ZeRO-3 with every threshold at zero: each parameter re-gathered for every ALUM pass
    (tests/test_zero3_release.py)."""
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"].update(stage3_max_reuse_distance=0, stage3_max_live_parameters=0,
                                   stage3_prefetch_bucket_size=0, stage3_param_persistence_threshold=0)
    path.write_text(json.dumps(ds))
    return path


def _mixture_args(base: Path, cache: Path) -> list[str]:
    """A mixture of the embedded corpus (3/4) and a small folder prepared with its tokenizer (1/4,
    a few sequences: it starts new epochs within 8 steps), and test_checkpoint's settings: dropout
    and ALUM on, a global batch of 8 on 2 ranks or 1, saves every 2 steps, evaluations at 4 and 8."""
    from alum_ds.data.corpus import embedded_documents
    from alum_ds.data.prepare import ensure_embedded, prepare
    from tests.test_checkpoint import ARGS

    embedded = ensure_embedded(cache, vocab_size=2048, seed=1234)  # the runs' default data
    small = base / "small_source"
    prepare(documents=[d[:600] for d in embedded_documents()[-2:]], out_dir=small,
            tokenizer=str(embedded / "tokenizer"), progress=False)
    return [*ARGS, f"--data.sources={embedded}:0.75,{small}:0.25"]


def _batch_specs(base: Path, cache: Path) -> dict[str, tuple[str, list[str]]]:
    from tests.test_alum_engine import QUICK as ENGINE_QUICK
    from tests.test_finetune import PRETRAIN

    mixture = _mixture_args(base, cache)
    # ZeRO-3 runs last: their allocator policy (alum_ds.host) stays with the process.
    return {
        "zero0.json": ("zero0.json", QUICK), "zero1.json": ("zero1.json", QUICK),
        "zero2.json": ("zero2.json", QUICK),
        "zero2_accum": ("zero2.json", [*QUICK, "--schedule.micro_batch_size=2", "--schedule.grad_accum=2"]),
        "finetune_pretrain": ("zero2.json", PRETRAIN),  # tests/test_finetune.py's real runs
        "mixture": ("zero2.json", mixture),  # test_a_mixture_resumes_exactly_on_1_rank_and_back
        "mixture_cut": ("zero2.json", [*mixture, "--run.stop_after=2"]),
        "zero3.json": ("zero3.json", QUICK),
        # tests/test_zero3_release.py's export check scores what its final evaluation scored
        "zero3_release": (str(_zero3_release_config(base / "zero3_release.json")),
                          [*QUICK, "--eval.max_sequences=64"]),
        "zero3_offload": ("zero3_offload.json", ENGINE_QUICK),
        "zero3_checkpointing": ("zero3.json", [*ENGINE_QUICK, "--model.activation_checkpointing=true"]),
    }


def _stage(name: str, tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, str]:
    """(run folder, its banner line) of one run of the shared launch; the launch runs once per
    session, at the first test that asks for any of its runs."""
    if _BATCH_FAILED:
        pytest.fail(_BATCH_FAILED[0])
    if not _BATCH:
        base = tmp_path_factory.mktemp("batch")
        specs = _batch_specs(base, cache)
        dirs = {name: base / name.removesuffix(".json") for name in specs}
        ds_path = {name: ds if Path(ds).is_absolute() else str(ROOT / "ds_configs" / ds)
                   for name, (ds, _) in specs.items()}
        spec = base / "spec.json"
        spec.write_text(json.dumps({"runs": [
            [str(dirs[name]), ds_path[name], [f"--data.cache_dir={cache}", *args]]
            for name, (_, args) in specs.items()]}))
        r = run(deepspeed_cmd(f"--master_port={free_port()}",
                              str(ROOT / "tests" / "drivers" / "train_runs.py"), str(spec)),
                ROOT, timeout=1800)
        log = r.stdout + r.stderr
        if r.returncode != 0:
            _BATCH_FAILED.append(f"the shared launch failed ({r.returncode}): {log[-6000:]}")
            pytest.fail(_BATCH_FAILED[0])
        for key, run_dir in dirs.items():
            banner = [ln for ln in log.splitlines() if ln.rstrip().endswith(f", run {run_dir}")]
            assert len(banner) == 1, (key, banner, log[-4000:])
            _BATCH[key] = (run_dir, banner[0])
    return _BATCH[name]


@pytest.mark.parametrize("ds", ["zero1.json", "zero2.json", "zero3.json"])
def test_alum_trains_under_zero_stage(ds: str, tmp_path_factory, cache_dir: Path) -> None:
    run_dir, log = _stage(ds, tmp_path_factory, cache_dir)
    assert "2 rank(s)" in log and "ALUM on" in log
    losses = _losses(run_dir)
    assert len(losses) == 8
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    # Both ranks hold the same model and report the same evaluation.
    s0 = json.loads((run_dir / "summary.rank0.json").read_text())
    s1 = json.loads((run_dir / "summary.rank1.json").read_text())
    assert s0["param_checksum"] == pytest.approx(s1["param_checksum"], rel=1e-9)
    assert s0["eval_loss"] == s1["eval_loss"]
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("adv_loss" in r and r["adv_loss"] > 0 for r in recs if "loss" in r)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step00000008" and any((run_dir / "checkpoints" / latest).iterdir())
    assert (run_dir / "config.resolved.json").is_file()
    assert any((run_dir / "tensorboard").iterdir())


def test_zero_stages_give_the_same_losses(tmp_path_factory, cache_dir: Path) -> None:
    """fp32, dropout off: ZeRO-0, -2 and -3 compute the same ALUM losses step by step."""
    ref = _losses(_stage("zero0.json", tmp_path_factory, cache_dir)[0])
    for ds in ("zero2.json", "zero3.json"):
        other = _losses(_stage(ds, tmp_path_factory, cache_dir)[0])
        assert other == pytest.approx(ref, rel=1e-4, abs=1e-5), (ds, ref, other)


def _readme_main_command() -> str:
    text = (ROOT / "README.md").read_text()
    cmds = re.findall(r"^(deepspeed launch/pretrain\.py[^\n]*)$", text, flags=re.M)
    assert cmds, "README lost its main-job command"
    return cmds[0]


def test_readme_main_job_runs_in_a_fresh_folder(tmp_path: Path) -> None:
    """The main job exactly as the README writes it, in an empty folder with a new cache."""
    cmd = _readme_main_command()
    assert cmd == "deepspeed launch/pretrain.py --ds_config ds_configs/zero2.json"
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "launch", work / "launch")
    shutil.copytree(ROOT / "ds_configs", work / "ds_configs")
    deepspeed_bin = shutil.which("deepspeed")
    assert deepspeed_bin, "the deepspeed command is not on PATH"
    r = run(cmd.split(), work, {"ALUM_DS_CACHE": str(tmp_path / "cache"),
                                "MASTER_PORT": free_port()})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "starting 2 ranks" in log and "2 rank(s)" in log
    run_dir = work / "runs" / "default"
    assert f"run folder: {run_dir.resolve()}" in log
    losses = _losses(run_dir)
    assert losses[-1] < losses[0] - 1.0, losses
    # It learns context: its final eval loss lies well below a model of token frequencies alone
    # (measured 0.91 nats below on the whole split; bench/results/README.md, "The main job"). The
    # margin allows for another CPU's rounding, not for a recipe that learns less.
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if "eval_loss" in r][-1]
    assert final["eval_loss"] < final["unigram_loss"] - 0.8, final
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert list((tmp_path / "cache").glob("embedded-*/manifest.json"))
    assert "(DeepSpeed config " in log and "a model of token frequencies alone" in log
    # What it learned, shown at the end: fill-mask on held-out sentences through an export.
    assert "held-out sentences, one word masked" in log and not (run_dir / "fill_mask.tmp").exists()
    shown = json.loads((run_dir / "fill_mask.json").read_text())
    assert len(shown) == 3 and all(len(x["top"]) == 3 and x["word"] in log for x in shown)


def test_bf16_precision_guard_through_the_engine(tmp_path: Path, cache_dir: Path) -> None:
    """Under DeepSpeed bf16 the default radius rounds away: a one-line error naming a radius
    that survives; with that radius the same run trains."""
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    base = [f"--data.cache_dir={cache_dir}", "--schedule.steps=2", "--logging.every=1"]
    script = str(ROOT / "launch" / "pretrain.py")
    r = run(deepspeed_cmd(f"--master_port={free_port()}", script, "--ds_config", str(ds),
                          f"--run.dir={tmp_path / 'a'}", *base), ROOT)
    log = r.stdout + r.stderr
    assert r.returncode != 0 and "Traceback" not in log, log[-3000:]
    m = re.search(r"does not survive bfloat16.*--alum\.eta=([0-9.e-]+)", log)
    assert m, log[-3000:]
    radius = m.group(1)
    r = run(deepspeed_cmd(f"--master_port={free_port()}", script, "--ds_config", str(ds),
                          f"--run.dir={tmp_path / 'b'}", f"--alum.eta={radius}",
                          f"--alum.epsilon={radius}", *base), ROOT)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "bf16" in r.stderr + r.stdout


def test_grad_accumulation_equals_the_larger_batch(tmp_path_factory, cache_dir: Path) -> None:
    """2 ranks: 2 micro-batches of 2 accumulated give the losses of one micro-batch of 4 (the
    loss is normalised by the masked tokens of the whole optimizer step). The micro-batch-of-4
    run is the ZeRO-2 run of the test above."""
    one, log = _stage("zero2.json", tmp_path_factory, cache_dir)
    assert "global batch 8 (4 x 1 accumulation x 2)" in log
    two, log = _stage("zero2_accum", tmp_path_factory, cache_dir)
    assert "global batch 8 (2 x 2 accumulation x 2)" in log
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 8
    assert b == pytest.approx(a, rel=2e-5, abs=1e-6), (a, b)


def test_alum_ds_train_runs_without_a_launcher(tmp_path: Path, cache_dir: Path) -> None:
    """`alum-ds train` in one plain process: a one-rank world, no MPI discovery."""
    run_dir = tmp_path / "run"
    r = run(["alum-ds", "train", f"--run.dir={run_dir}", f"--data.cache_dir={cache_dir}",
             "--schedule.steps=2", "--logging.every=1"], tmp_path, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "1 rank(s)" in r.stderr and (run_dir / "checkpoints" / "latest").is_file()


def test_a_branch_from_a_plain_prefix_equals_the_run_from_scratch(tmp_path: Path, cache_dir: Path,
                                                                  capsys, monkeypatch) -> None:
    """run.branch_from: ALUM arms that share a plain-MLM prefix (the paper's curriculum) start
    from its checkpoint and compute what their run from scratch computes; a branch that changes
    more than alum.*, or had ALUM on before the checkpoint, is refused (in this process: the
    refusals come before any process group or engine, so a launch would only add its start-up)."""
    common = [f"--data.cache_dir={cache_dir}", "--schedule.steps=8", "--schedule.warmup_steps=1",
              "--logging.every=1", "--schedule.micro_batch_size=4", "--eval.fill_mask=0",
              "--eval.max_sequences=16", "--logging.tensorboard=false"]

    # The three runs in one plain process (one rank, no launcher, as `alum-ds train`, which
    # test_alum_ds_train_runs_without_a_launcher runs): tests/drivers/train_runs.py runs them one
    # after the other, the prefix's checkpoint written before the branch starts from it.
    from alum_ds.ds_config import DEFAULT as DEFAULT_DS

    tag = tmp_path / "prefix" / "checkpoints" / "step00000004"
    runs = [("scratch", ["--alum.start_step=4"]),
            ("prefix", ["--alum.enabled=false", "--run.stop_after=4"]),
            ("branch", ["--alum.start_step=4", f"--run.branch_from={tag}"])]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"runs": [[str(tmp_path / name), DEFAULT_DS, [*common, *extra]]
                                         for name, extra in runs]}))
    r = run([sys.executable, str(ROOT / "tests" / "drivers" / "train_runs.py"), str(spec)], tmp_path,
            {"MASTER_PORT": free_port()}, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert log.count("alum_ds: 1 rank(s)") == 3, log[-3000:]
    assert f"branched from {tag} at step 4" in log
    scratch, branch = _losses(tmp_path / "scratch"), _losses(tmp_path / "branch")
    assert len(scratch) == 8 and len(branch) == 4
    assert branch == pytest.approx(scratch[4:], rel=1e-6), (scratch, branch)
    from alum_ds.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one rank, as the runs above

    def refused(name: str, *extra: str) -> str:
        capsys.readouterr()
        assert main(["train", f"--run.dir={tmp_path / name}", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("alum-ds: error:") and "Traceback" not in err, err
        assert not (tmp_path / name).exists()
        return err

    err = refused("other_lr", "--alum.start_step=4", "--optim.lr=1e-3", f"--run.branch_from={tag}")
    assert "differ from this run's in more than the alum section" in err
    err = refused("early", "--alum.start_step=2", f"--run.branch_from={tag}")
    assert "this run has ALUM on from step 2, before the checkpoint's step 4" in err


def test_a_mixture_resumes_exactly_on_1_rank_and_back(tmp_path_factory, tmp_path: Path,
                                                      cache_dir: Path) -> None:
    """A 2-rank mixture run stopped after step 2 (in the shared launch), continued on 1 rank for
    steps 3-4 (a plain process: universal conversion 2 -> 1), then on 2 ranks for 5-8 (1 -> 2):
    every step's loss, every evaluation (per source and the mixture's) and each source's tokens
    and epochs equal the uninterrupted 2-rank run's; the small source's new epochs are announced."""
    ref, _ = _stage("mixture", tmp_path_factory, cache_dir)
    cut, _ = _stage("mixture_cut", tmp_path_factory, cache_dir)
    from tests.test_checkpoint import ARGS

    sources = json.loads((cut / "config.resolved.json").read_text())["config"]["data"]["sources"]
    args = [*ARGS, f"--data.sources={','.join(sources)}"]
    common = [f"--data.cache_dir={cache_dir}", *args]
    spec = tmp_path / "one.json"
    spec.write_text(json.dumps({"runs": [[str(cut), str(ROOT / "ds_configs" / "zero2.json"),
                                          [*common, "--run.stop_after=2"]]]}))
    r = run([sys.executable, str(ROOT / "tests" / "drivers" / "train_runs.py"), str(spec)], tmp_path,
            {"MASTER_PORT": free_port()}, timeout=600)
    one = r.stdout + r.stderr
    assert r.returncode == 0, one[-3000:]
    assert "at step 2 (universal: saved by 2 rank(s), now 1)" in one, one[-3000:]
    spec = tmp_path / "two.json"
    spec.write_text(json.dumps({"runs": [[str(cut), str(ROOT / "ds_configs" / "zero2.json"), common]]}))
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "tests" / "drivers" / "train_runs.py"),
                          str(spec)), ROOT, timeout=600)
    two = r.stdout + r.stderr
    assert r.returncode == 0, two[-3000:]
    assert "at step 4 (universal: saved by 1 rank(s), now 2)" in two, two[-3000:]

    def by_step(run_dir: Path) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
        return out

    want, got = by_step(ref), by_step(cut)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    keys = [k for k in want[8] if k.startswith(("tokens/", "epoch/", "eval_loss/"))]
    assert len([k for k in keys if k.startswith("eval_loss/")]) == 2 and len(keys) == 6, keys
    for step in range(1, 9):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4), step
        for k in keys + ["eval_loss", "consumed_sequences"]:
            if k in want[step]:
                assert got[step][k] == pytest.approx(want[step][k], rel=1e-4), (step, k)
    assert want[8]["epoch/small_source"] >= 2  # the small source repeated, in its own epochs
    assert "data source small_source starts epoch" in one + two
