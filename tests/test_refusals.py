"""Each input that once gave a traceback, or was accepted and did the wrong thing, is refused with
one line ``alum-ds: error: ...`` naming the key or file, exit code 2, before anything is written.

The commands run in this process, without ``--check``: the refusal comes before a process group,
a model or an engine, so none is started.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from alum_ds.adversarial import PrecisionError, adversarial_loss
from alum_ds.cli import main
from alum_ds.config import AlumConfig


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alum-ds: error: "), lines
    return rc, lines[0]


@pytest.fixture()
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("override, needle", [
    ("--optim.betas=2,5", "optim.betas"),
    ("--optim.eps=-1", "optim.eps"),
    ("--data.seed=-1", "data.seed"),
    (f"--run.seed={2**70}", "run.seed"),
    ("--alum.eta=1e300", "alum.eta"),
    ("--alum.epsilon=1e300", "alum.epsilon"),
    ("--optim.lr=inf", "optim.lr"),
    ("--optim.lr=nan", "optim.lr"),
    ("--run.dir=", "run.dir"),
])
def test_bad_value_is_refused_before_anything(here: Path, override: str, needle: str) -> None:
    rc, line = _cli(["train", override])
    assert rc == 2 and needle in line
    assert not any(here.iterdir())


@pytest.mark.parametrize("ds, needle", [
    ({"zero_optimization": {"stage": 2, "bogus": 1}}, "zero_optimization.bogus"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -1}}, "zero_optimization.reduce_bucket_size"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
     "zero_optimization.offload_param.device"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": 2}, "zero_optimisation": {"stage": 3}}, "'zero_optimisation'"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False, "loss_scale": 1}}, "bf16.loss_scale"),
])
def test_ds_json_deepspeed_refuses_is_one_line(here: Path, ds: dict, needle: str) -> None:
    (here / "ds.json").write_text(json.dumps(ds))
    rc, line = _cli(["train", "--ds_config", "ds.json"])
    assert rc == 2 and "ds.json" in line and needle in line, line
    assert [p.name for p in here.iterdir()] == ["ds.json"]


def test_an_unknown_top_level_key_names_the_near_one(here: Path) -> None:
    (here / "ds.json").write_text('{"zero_optimisation": {"stage": 2}}')
    rc, line = _cli(["train", "--ds_config", "ds.json"])
    assert rc == 2 and "did you mean 'zero_optimization'" in line


@pytest.mark.parametrize("option, name, text, key", [
    ("--ds_config", "ds.json", '{"zero_optimization": {"stage": 2}, "zero_optimization": {"stage": 0}}',
     "'zero_optimization'"),
    ("--ds_config", "ds.json", '{"zero_optimization": {"stage": 2, "stage": 3}}', "'stage'"),
    ("--config", "run.json", '{"optim": {"lr": 1e-3, "lr": 2e-3}}', "'lr'"),
    ("--config", "run.json", '{"optim": {"lr": 1e-3}, "optim": {"eps": 1e-8}}', "'optim'"),
])
def test_a_key_given_twice_is_refused(here: Path, option: str, name: str, text: str, key: str) -> None:
    (here / name).write_text(text)
    rc, line = _cli(["train", option, name])
    assert rc == 2 and name in line and key in line and "twice" in line


def test_run_dir_naming_a_file_is_refused(here: Path) -> None:
    (here / "afile").write_text("x")
    for run_dir in ("afile", "afile/sub"):
        rc, line = _cli(["train", f"--run.dir={run_dir}"])
        assert rc == 2 and "afile" in line and "--run.dir" in line
    assert (here / "afile").read_text() == "x" and [p.name for p in here.iterdir()] == ["afile"]


@pytest.mark.parametrize("text", ['{"config_', "", "\x80\x81", "[1, 2]", '{"config": {}}',
                                  '{"config_hash": 5}'])
def test_a_damaged_resolved_config_keeps_the_other_run_guard(here: Path, text: str) -> None:
    run = here / "run"
    run.mkdir()
    (run / "config.resolved.json").write_bytes(text.encode("latin-1"))
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    rc, line = _cli(["train", "--run.dir=run"])
    assert rc == 2 and "config.resolved.json is damaged" in line and "--run.dir" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # the old metrics stay


def test_training_refuses_data_without_validation_sequences(here: Path, docs40: list[str]) -> None:
    from alum_ds.data.prepare import prepare

    prepare(documents=docs40, out_dir=here / "noval", vocab_size=300, val_fraction=0.0, progress=False)
    rc, line = _cli(["train", f"--data.dir={here / 'noval'}", "--run.dir=run"])
    assert rc == 2 and "validation split holds 0 documents" in line
    assert not (here / "run").exists()


def test_a_mixture_source_without_validation_sequences_is_refused(here: Path, data_dir: Path,
                                                                   docs40: list[str]) -> None:
    from alum_ds.data.prepare import prepare

    prepare(documents=docs40, out_dir=here / "noval", tokenizer=str(data_dir / "tokenizer"),
            val_fraction=0.0, progress=False)
    rc, line = _cli(["train", f"--data.sources={data_dir}:0.5,{here / 'noval'}:0.5", "--run.dir=run"])
    assert rc == 2 and line.startswith(f"alum-ds: error: data.sources: {here / 'noval'}: ")
    assert "validation split holds 0 documents" in line
    assert not (here / "run").exists()


def test_training_refuses_a_validation_split_shorter_than_one_sequence(here: Path, data_dir: Path) -> None:
    rc, line = _cli(["train", f"--data.dir={data_dir}", "--run.dir=run", "--data.seq_len=100000"])
    assert rc == 2 and "not one sequence of data.seq_len=100000" in line
    assert not (here / "run").exists()


def test_prepare_refuses_an_empty_validation_split(here: Path, docs40: list[str]) -> None:
    (here / "one.txt").write_text(docs40[0])
    rc, line = _cli(["prepare", "one.txt", "--out", "d1", "--quiet", "--vocab-size", "300"])
    assert rc == 2 and "validation split holds no tokens" in line and "one.txt" in line
    assert not (here / "d1" / "manifest.json").exists()
    (here / "many.txt").write_text("\n\n".join(docs40))
    for fraction in ("0", "1", "-0.5", "nan"):
        rc, line = _cli(["prepare", "many.txt", "--out", "d2", "--val-fraction", fraction])
        assert rc == 2 and "--val-fraction" in line
    assert not (here / "d2").exists()


@pytest.mark.parametrize("key, value", [("vocab_size", 2100), ("mask_id", 3), ("bos_id", 2),
                                        ("special_ids", [0, 1, 2, 3])])
def test_verify_checks_the_manifests_tokenizer_entries(here: Path, data_dir: Path, key: str,
                                                       value: object) -> None:
    shutil.copytree(data_dir, here / "d")
    mpath = here / "d" / "manifest.json"
    m = json.loads(mpath.read_text())
    assert m["tokenizer"][key] != value
    m["tokenizer"][key] = value
    mpath.write_text(json.dumps(m))
    rc, line = _cli(["prepare", "--verify", str(here / "d")])
    assert rc == 2 and f"tokenizer.{key}" in line and "manifest.json" in line


def test_verify_passes_a_good_folder(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", "--verify", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["validation"]["documents"] > 0


def test_check_plans_without_writing(here: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--check", f"--data.dir={data_dir}", "--run.dir=run"]) == 0
    out = capsys.readouterr().out
    assert "check passed" in out and "checkpoint: new run" in out and "ZeRO-2" in out
    assert not any(here.iterdir())


def _diverged(h: torch.Tensor) -> str:
    w = torch.randn(h.shape[-1], 11, generator=torch.Generator().manual_seed(1))

    def f(x: torch.Tensor) -> torch.Tensor:  # a head that brings 1e30 back to O(1) logits
        return (x * 1e-30) @ w

    with pytest.raises(PrecisionError) as err:
        adversarial_loss(f, h, f(h), AlumConfig(), generator=torch.Generator().manual_seed(0))
    return str(err.value)


def test_precision_guard_after_divergence_says_the_run_diverged() -> None:
    # fp32 activations of 1e30 (weights after lr=1e30): a radius of 1e-3 rounds away, and the
    # guard named a radius of "at least 0" for fp32.
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) * 1e30
    msg = _diverged(h)
    assert "diverged" in msg and "optim.lr" in msg and "at least 0" not in msg
    assert "alum.eta" in msg  # and what to raise if such activations are meant


def test_precision_guard_names_non_finite_activations() -> None:
    from alum_ds.adversarial import _lost_perturbation

    h = torch.ones(2, 3, 8)
    h[0, 0, 0] = float("inf")
    msg = _lost_perturbation(h, torch.full_like(h, 1e-3), 0.0, AlumConfig())
    assert "not finite" in msg and "diverged" in msg and "radius of at least" not in msg
