"""``alum-ds evaluate``: the suite runner on tiny GLUE-shaped local tasks (a classification, a pair
task with a second evaluation set and a pooled column, a regression, a CoLA-like MCC task) from a
tiny checkpoint, in one process: every cell of the table, a rerun that skips finished runs, and
a task with a bad column refused in one line before any training."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from alum_ds.cli import main
from tests.conftest import ROOT, free_port, run

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "run", "sit", "fly", "big", "small", "old"]


def _sentence(rng: random.Random, n: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _tasks(root: Path, n_train: int = 40, n_val: int = 16) -> dict[str, dict[str, Path]]:
    """Four local tasks in three file formats; labels follow the words, so they are learnable."""
    rng = random.Random(0)
    out: dict[str, dict[str, Path]] = {}

    def jsonl(path: Path, rows: list[dict]) -> Path:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def topic(s: str) -> str:
        return "animal" if sum(w in ("cat", "dog", "bird") for w in s.split()) >= 2 else \
            "colour" if "red" in s or "blue" in s else "other"

    def rows(n: int, make) -> list[dict]:
        return [make() for _ in range(n)]

    def cls_row() -> dict:
        s = _sentence(rng)
        return {"text": s, "label": topic(s)}

    out["Topic"] = {k: jsonl(root / f"topic_{k}.jsonl", rows(n, cls_row))
                    for k, n in (("train", n_train), ("val", n_val))}

    def pair_row() -> dict:
        a = _sentence(rng)
        b = a if rng.random() < 0.5 else _sentence(rng)
        return {"s1": a, "s2": b, "gold": "same" if a == b else "different"}

    for k, n in (("train", n_train), ("val", n_val), ("val2", n_val)):
        path = root / f"pair_{k}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["s1", "s2", "gold"])
            w.writeheader()
            w.writerows(rows(n, pair_row))
        out.setdefault("Pair", {})[k] = path

    def sts_row() -> dict:
        a, b = _sentence(rng), _sentence(rng)
        overlap = len(set(a.split()) & set(b.split()))
        return {"sentence1": a, "sentence2": b, "score": round(min(5.0, overlap * 1.25), 2)}

    out["STS"] = {k: jsonl(root / f"sts_{k}.jsonl", rows(n, sts_row)) for k, n in (("train", n_train),
                                                                                   ("val", n_val))}

    def cola_row() -> dict:
        s = _sentence(rng, rng.randint(3, 8))
        return {"sentence": s, "label": int(len(s.split()) > 5)}

    for k, n in (("train", n_train), ("val", n_val)):
        path = root / f"cola_{k}.tsv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["sentence", "label"], delimiter="\t")
            w.writeheader()
            w.writerows(rows(n, cola_row))
        out.setdefault("CoLA-like", {})[k] = path
    return out


def _suite_toml(path: Path, t: dict[str, dict[str, Path]], pair_text: str = "s1") -> Path:
    path.write_text(f"""
[suite]
name = "tiny"
description = "Four GLUE-shaped tasks."

[defaults]
"schedule.steps" = 3
"schedule.micro_batch_size" = 8
"schedule.warmup_fraction" = 0.0
"optim.lr" = 1e-3
"model.dropout" = 0.0
"task.max_length" = 24
"logging.every" = 3

[[tasks]]
name = "Topic"
train = "{t['Topic']['train']}"
validation = "{t['Topic']['val']}"
labels = ["animal", "colour", "other"]
metrics = ["accuracy", "macro_f1"]

[[tasks]]
name = "Pair"
validation_name = "Pair-a"
train = "{t['Pair']['train']}"
validation = "{t['Pair']['val']}"
eval = {{ "Pair-b" = "{t['Pair']['val2']}" }}
pool = {{ "Pair-all" = ["Pair-b"] }}
text_column = "{pair_text}"
text_pair_column = "s2"
label_column = "gold"
labels = ["different", "same"]
metrics = ["accuracy"]

[[tasks]]
name = "STS"
train = "{t['STS']['train']}"
validation = "{t['STS']['val']}"
text_column = "sentence1"
text_pair_column = "sentence2"
label_column = "score"
type = "regression"
config = {{ "optim.lr" = 5e-4 }}

[[tasks]]
name = "CoLA-like"
train = ["{t['CoLA-like']['train']}", "{t['CoLA-like']['val']}"]
validation = "{t['CoLA-like']['val']}"
text_column = "sentence"
metrics = ["mcc", "accuracy"]
ranges = {{ "optim.lr" = [1e-5, 2e-5] }}
""")
    return path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RoBERTa Hugging Face folder (random weights) with a tokenizer learned on the words."""
    from transformers import RobertaForMaskedLM

    from alum_ds.data.tokenizer import learn_bpe
    from alum_ds.model import roberta_config

    out = tmp_path_factory.mktemp("suite_model") / "tiny-roberta"
    rng = random.Random(1)
    tok = learn_bpe([_sentence(rng, 20) for _ in range(200)], 300)
    RobertaForMaskedLM(roberta_config("tiny", vocab_size=len(tok), seq_len=64, dropout=0.0)
                       ).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _evaluate(args: list[str]) -> str:
    r = run([sys.executable, "-m", "alum_ds.cli", "evaluate", *args], ROOT,
            {"MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return log


def test_suite_table_has_every_cell_and_a_rerun_skips_finished_runs(tmp_path: Path, tiny_model: Path) -> None:
    tasks = _tasks(tmp_path)
    out = tmp_path / "suite"
    args = [str(tiny_model), "--suite", str(_suite_toml(tmp_path / "tiny.toml", tasks)), "--out", str(out)]
    log = _evaluate([*args, "--mode", "both"])
    n = 4 * 2
    assert all(f"task {i}/{n}:" in log for i in range(1, n + 1)) and "done before" not in log
    doc = json.loads((out / "suite.json").read_text())
    cols = ["Topic", "Pair-a", "Pair-b", "Pair-all", "STS", "CoLA-like"]
    assert doc["columns"] == cols
    assert [(r["model"], r["mode"]) for r in doc["rows"]] == [("tiny-roberta", m) for m in ("plain", "alum")]
    for row in doc["rows"]:
        for c in cols:
            for m, v in row["cells"][c].items():
                assert len(v["values"]) == 1 and v["values"][0] == v["values"][0], (c, m, v)  # not NaN
    assert set(doc["rows"][0]["cells"]["STS"]) == {"pearson", "spearman"}
    assert set(doc["rows"][0]["cells"]["CoLA-like"]) == {"mcc", "accuracy"}
    for row in doc["rows"]:  # a pool of one set is that set's accuracy
        assert row["cells"]["Pair-all"]["accuracy"]["values"] == row["cells"]["Pair-b"]["accuracy"]["values"]
    md = (out / "suite.md").read_text()
    assert "| STS (Pearson/Spearman) | CoLA-like (MCC/Acc) |" in md
    rows = [line for line in md.splitlines() if line.startswith("| tiny-roberta")]
    assert len(rows) == 2 and all(len(line.split("|")) == len(cols) + 4 for line in rows), md
    # Each run is one alum-ds finetune: ALUM in the alum row only, the task's own settings.
    runs = out / "runs" / "tiny-roberta"
    alum = json.loads((runs / "STS" / "alum-seed0" / "results.json").read_text())
    plain = json.loads((runs / "STS" / "plain-seed0" / "results.json").read_text())
    assert alum["alum"] and not plain["alum"] and alum["labels"] == ["score"]
    assert alum["config"]["optim"]["lr"] == 5e-4 and plain["config"]["optim"]["lr"] == 5e-4
    records = [json.loads(x) for x in (runs / "STS" / "alum-seed0" / "metrics.jsonl").open()]
    assert any(r.get("adv_loss", 0) > 0 and "mse_loss" in r for r in records), records
    # CoLA-like trains on two sources, concatenated once into the suite's data folder.
    assert sum(1 for _ in open(out / "data" / "CoLA-like.train.jsonl")) == 40 + 16
    if importlib.util.find_spec("matplotlib"):
        assert (out / "suite.png").stat().st_size > 1000

    # A second seed, plain only: the first seed's plain runs are skipped, not rerun.
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")}
    log = _evaluate([*args, "--mode", "plain", "--seeds", "2"])
    assert log.count("done before, skipped") == 4 and log.count("alum_ds finetune:") == 4
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    doc2 = json.loads((out / "suite.json").read_text())
    (row,) = doc2["rows"]
    assert row["mode"] == "plain"
    for c in cols:
        for m, v in row["cells"][c].items():
            assert v["values"][0] == doc["rows"][0]["cells"][c][m]["values"][0] and len(v["values"]) == 2
            assert v["std"] == pytest.approx(float(np.std(v["values"], ddof=1)))
    seed1 = json.loads((runs / "STS" / "plain-seed1" / "results.json").read_text())
    assert seed1["config"]["run"]["seed"] == plain["config"]["run"]["seed"] + 1
    line = next(x for x in (out / "suite.md").read_text().splitlines() if x.startswith("| tiny-roberta"))
    assert line.count("±") == 9, line  # every number of the row has its spread


def test_bad_task_is_one_line_error_before_any_training(tmp_path: Path, tiny_model: Path, capsys) -> None:
    tasks = _tasks(tmp_path, n_train=12, n_val=4)
    out = tmp_path / "suite"

    def fails(toml: Path, *extra: str) -> str:
        assert main(["evaluate", str(tiny_model), "--suite", str(toml), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("alum-ds: error:"), err
        assert not out.exists()  # nothing written, nothing trained
        return err

    err = fails(_suite_toml(tmp_path / "bad.toml", tasks, pair_text="sentence"))
    assert "suite task Pair" in err and "no column 'sentence'" in err and "task.text_column" in err
    toml = _suite_toml(tmp_path / "ok.toml", tasks).read_text()
    (tmp_path / "reg.toml").write_text(toml.replace('label_column = "score"', 'label_column = "sentence2"'))
    err = fails(tmp_path / "reg.toml")
    assert "suite task STS" in err and "is not a number" in err and "sts_train.jsonl:1" in err
    err = fails(tmp_path / "ok.toml", "--optim.lr=-1")
    assert "suite task Topic" in err and "optim.lr" in err
    (tmp_path / "owned.toml").write_text(toml.replace('"optim.lr" = 1e-3', '"run.dir" = "x"'))
    err = fails(tmp_path / "owned.toml")
    assert "run.dir is set by the suite runner" in err
    (tmp_path / "metric.toml").write_text(toml.replace('["mcc", "accuracy"]', '["pearson"]'))
    err = fails(tmp_path / "metric.toml")
    assert "task CoLA-like" in err and "'pearson' is not a classification metric" in err
    err = fails(tmp_path / "ok.toml", "--seeds", "0")
    assert "--seeds 0" in err
    assert main(["evaluate", str(tiny_model), "--suite", "nosuch", "--out", str(out)]) == 2
    assert "neither a shipped suite (anli, anli_nli, glue)" in capsys.readouterr().err
