"""Fine-tuning: the classifier objective, data inputs, bad inputs, and two real runs (from an
exported folder with ALUM on 2 ranks through the launcher; from a DeepSpeed run folder, plain, in
one process) on the embedded topic task."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from alum_ds.cli import main
from alum_ds.config import AlumConfig
from alum_ds.finetune import data as FD
from alum_ds.finetune.evaluate import macro_f1
from alum_ds.finetune.objective import ClassifierObjective, classify
from alum_ds.finetune.tasks import LABELS, build_topic_task, ensure_topic_task
from tests.conftest import ROOT, deepspeed_cmd, free_port, run

CHANCE = 1 / len(LABELS)
# Seen with these settings from this 8-step pretraining, over 5 fine-tuning seeds each, plain on
# one rank and ALUM on two: 0.38-0.54 validation accuracy after 100 steps (a classifier stuck on
# one class, the failure this guards against, scores exactly 0.25).
MIN_ACCURACY = 0.34
# One intra-op thread per rank: the test machine is shared, and spinning OpenMP threads that
# lose their core make steps 10-20x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
FT = ["--task.max_length=64", "--schedule.steps=100", "--schedule.warmup_steps=10", "--optim.lr=2e-3",
      "--model.dropout=0", "--logging.every=10", "--eval.pgd_steps=2", "--eval.robust_radius=0.05"]


# ---------------------------------------------------------------- units (no engine, < 1 s each)


def _tiny_classifier(num_labels: int = 3, vocab: int = 300):
    from transformers import RobertaForSequenceClassification

    from alum_ds.model import roberta_config

    cfg = roberta_config("tiny", vocab_size=vocab, seq_len=32, dropout=0.0)
    cfg.num_labels = num_labels
    torch.manual_seed(0)
    return RobertaForSequenceClassification(cfg).eval()


def _batch(rows: list[list[int]], pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    enc = FD.Encoded(rows, np.zeros(len(rows), dtype=np.int64), "t")
    b = enc.batch(list(range(len(rows))), pad)
    x, mask = b["input_ids"], b["attention_mask"]
    return torch.from_numpy(x), torch.from_numpy(mask)


def test_padded_classify_matches_the_model_and_the_unpadded_rows() -> None:
    model = _tiny_classifier()
    rows = [[0, 50, 60, 70, 80, 2], [0, 90, 2]]
    x, mask = _batch(rows)
    from alum_ds.model import embed

    with torch.no_grad():
        ours = classify(model, embed(model, x), mask)
        ref = model(input_ids=x, attention_mask=mask).logits
        assert torch.equal(ours, ref)
        for i, r in enumerate(rows):  # padding changes nothing: the mask reaches the encoder
            alone = model(input_ids=torch.tensor([r])).logits[0]
            assert torch.allclose(ours[i], alone, atol=1e-5)


def test_alum_term_is_on_with_alpha_and_absent_without() -> None:
    model = _tiny_classifier()
    x, mask = _batch([[0, 5, 6, 7, 2], [0, 8, 9, 2]])
    y = torch.tensor([0, 2])
    # A radius large enough that the term shows in fp32 next to the cross-entropy.
    on = ClassifierObjective(model, AlumConfig(alpha=1.0, eta=0.5, epsilon=0.5)).train()
    loss, st = on(x, mask, y)
    assert float(st["adv_loss"]) > 0
    assert float(loss.detach()) == pytest.approx(float(st["ce_loss"] + st["adv_loss"]), rel=1e-6)
    assert float(loss.detach()) > float(st["ce_loss"])
    off = ClassifierObjective(model, AlumConfig(alpha=0.0)).train()
    loss0, st0 = off(x, mask, y)
    assert "adv_loss" not in st0 and float(loss0.detach()) == pytest.approx(float(st0["ce_loss"]))
    # Dropout off and no ALUM: the loss is exactly the model's own cross-entropy.
    ref = model(input_ids=x, attention_mask=mask, labels=y).loss
    assert float(loss0.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)



def test_fused_first_pass_skip_keeps_weights_finite_and_refuses_zero3(monkeypatch) -> None:
    """The shared fused pass: a non-finite perturbed half is skipped and the clean pass rebuilt,
    so 0 * NaN never reaches a weight gradient; ZeRO-3 is refused with a clear error."""
    import alum_ds.finetune.objective as FO
    from alum_ds.config import ConfigError

    model = _tiny_classifier()
    x, mask = _batch([[0, 5, 6, 7, 2], [0, 8, 9, 2]])
    y = torch.tensor([0, 2])
    real = FO.classify

    def poisoned(m, hidden, attn):
        if hidden.shape[0] == 2 * len(y):  # only the doubled (fused) batch
            bad = torch.ones_like(hidden)
            bad[len(y):] = float("nan")
            hidden = hidden * bad
        return real(m, hidden, attn)

    monkeypatch.setattr(FO, "classify", poisoned)
    obj = ClassifierObjective(model, AlumConfig(alpha=1.0, fused_first_pass=True)).train()
    loss, st = obj(x, mask, y)
    assert float(st["adv_skipped"]) == 1 and bool(torch.isfinite(loss))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)

    next(model.parameters()).ds_id = 0  # how ZeRO-3 marks its partitioned parameters
    with pytest.raises(ConfigError, match="fused_first_pass.*ZeRO-3"):
        obj(x, mask, y)

def test_pgd_never_raises_robust_accuracy_and_zero_radius_is_clean() -> None:
    model = _tiny_classifier()
    x, mask = _batch([[0, 5, 6, 7, 2], [0, 8, 9, 2], [0, 11, 12, 13, 14, 2]])
    obj = ClassifierObjective(model, AlumConfig()).eval()
    logits, _ = obj(x, mask, torch.zeros(3, dtype=torch.long), mode="predict")
    y = logits.argmax(-1)  # every example right on the clean input
    clean, _ = obj(x, mask, y, mode="robust", radius=0.0, steps=3)
    assert clean.all()
    attacked, _ = obj(x, mask, y, mode="robust", radius=5.0, steps=3)
    assert attacked.sum() < 3  # a large radius flips at least one prediction


def test_macro_f1_matches_a_hand_count() -> None:
    # true 0: 2 right, 1 as class 1; true 1: 1 right; class 2 never occurs.
    c = np.array([[2, 1, 0], [0, 1, 0], [0, 0, 0]])
    f0, f1 = 2 * 2 / (3 + 2), 2 * 1 / (1 + 2)
    assert macro_f1(c) == pytest.approx((f0 + f1) / 2)


def test_embedded_task_is_deterministic_balanced_and_disjoint(tmp_path: Path) -> None:
    a, b = build_topic_task(), build_topic_task()
    assert a == b
    counts = {label: sum(r["label"] == label for r in a["train"]) for label in LABELS}
    assert len(set(counts.values())) == 1 and min(counts.values()) >= 50
    train_texts = {r["text"] for r in a["train"]}
    assert not train_texts & {r["text"] for r in a["validation"]}
    for adv, val in zip(a["adversarial"], a["validation"]):  # a distractor sentence appended
        assert adv["label"] == val["label"] and adv["text"].startswith(val["text"] + " ")
    folder = ensure_topic_task(tmp_path)
    assert ensure_topic_task(tmp_path) == folder
    meta = json.loads((folder / "task.json").read_text())
    assert meta["labels"] == LABELS and meta["sizes"]["train"] == len(a["train"])


def test_pairs_from_jsonl_csv_and_a_saved_dataset(tmp_path: Path) -> None:
    import datasets

    rows = [{"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": "entailment"},
            {"premise": "A cat sat.", "hypothesis": "Nobody sat.", "label": "contradiction"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "p.csv").write_text("premise,hypothesis,label\n" + "".join(
        f"{r['premise']},{r['hypothesis']},{r['label']}\n" for r in rows))
    feats = datasets.Features({"premise": datasets.Value("string"),
                               "hypothesis": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["entailment", "contradiction"])})
    ds = datasets.Dataset.from_dict({"premise": [r["premise"] for r in rows],
                                     "hypothesis": [r["hypothesis"] for r in rows],
                                     "label": [0, 1]}, features=feats)
    datasets.DatasetDict({"train": ds, "dev_r1": ds}).save_to_disk(str(tmp_path / "hf"))
    cols = FD.Columns("premise", "hypothesis", "label")
    for spec in ("p.jsonl", "p.csv", "hf", "hf@dev_r1"):
        ex = FD.read_examples(str(tmp_path / spec), cols, "train")
        assert ex.pairs == ["An animal sat.", "Nobody sat."] and ex.labels == ["entailment",
                                                                               "contradiction"]
    from transformers import RobertaTokenizerFast

    from alum_ds.data.tokenizer import learn_bpe

    tok = learn_bpe(["A cat sat. An animal sat. Nobody sat."] * 20, 300)
    assert isinstance(tok, RobertaTokenizerFast)
    enc = FD.encode(ex, FD.LabelSet.from_examples(ex), tok, 32)
    first = tok.convert_ids_to_tokens(enc.ids[0])
    assert first[0] == "<s>" and first.count("</s>") == 3 and first[-1] == "</s>"
    assert enc.labels.tolist() == [1, 0]  # sorted label set: contradiction, entailment


def test_train_batches_partition_each_epoch_over_ranks() -> None:
    seen, positions = [], []
    for step in range(5):  # 5 steps x 2 ranks x 2 micro x 3 = 60 = 3 epochs of 20
        for rank in range(2):
            for position, idx in FD.train_batch_indices(20, step=step, micro=3, accum=2, rank=rank,
                                                        world=2, seed=7):
                seen.extend(idx.tolist())
                positions.append(position)
    assert sorted(seen) == sorted(list(range(20)) * 3)
    assert sorted(positions) == list(range(0, 60, 3))  # each micro-batch's first global position


# ------------------------------------------------------------- bad inputs: one line, exit 2


def _fails(capsys, *args: str) -> str:
    assert main(["finetune", *args]) == 2
    out = capsys.readouterr().err.strip()
    # The error is the last line (DeepSpeed's consolidation may print progress bars before it).
    err = out.splitlines()[-1]
    assert err.startswith("alum-ds: error:") and "Traceback" not in out, out
    return err


# The pretraining the real runs below start from: ZeRO-2, 2 ranks, these settings. It is one run
# of tests/test_distributed.py's shared launch (one launcher start for every quick 2-rank run).
PRETRAIN = ["--schedule.steps=8", "--schedule.warmup_steps=1", "--optim.lr=3e-3", "--logging.every=4",
            "--schedule.micro_batch_size=4", "--model.dropout=0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict[str, Path]:
    """One quick pretraining run through the real launcher (2 ranks) and its export."""
    from tests.test_distributed import _stage

    run_dir, log = _stage("finetune_pretrain", tmp_path_factory, cache_dir)
    assert "2 rank(s)" in log and "ZeRO-2" in log
    export = tmp_path_factory.mktemp("ft_pre") / "hf"
    assert main(["export", str(run_dir), str(export)]) == 0
    return {"run": run_dir, "export": export, "cache": cache_dir}


@pytest.fixture(scope="module")
def hf_local(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Hugging Face folder (random weights, a learned tokenizer) without any training."""
    from transformers import RobertaForMaskedLM

    from alum_ds.data.corpus import embedded_documents
    from alum_ds.data.tokenizer import learn_bpe
    from alum_ds.model import roberta_config

    out = tmp_path_factory.mktemp("hf_local")
    tok = learn_bpe(embedded_documents()[:40], 400)
    RobertaForMaskedLM(roberta_config("tiny", vocab_size=len(tok), seq_len=64, dropout=0.0)
                       ).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _other_tokenizer(tmp_path: Path) -> Path:
    from alum_ds.data.tokenizer import learn_bpe

    other = tmp_path / "tok"
    learn_bpe(["some other text for another vocabulary"] * 50, 300).save_pretrained(str(other))
    return other


def test_bad_inputs_are_one_line_errors(tmp_path: Path, capsys, hf_local: Path) -> None:
    hf, cache = str(hf_local), str(tmp_path / "cache")
    csv = tmp_path / "d.csv"
    csv.write_text("sentence,label\n" + "hello there,a\nbye now,b\n" * 10)
    err = _fails(capsys, "--checkpoint", hf, f"--task.train={csv}")
    assert "no column 'text'" in err and "task.text_column" in err and "sentence" in err
    err = _fails(capsys, "--checkpoint", hf, f"--task.train={csv}", "--task.text_column=sentence",
                 "--task.label_column=gold")
    assert "no column 'gold'" in err
    val = tmp_path / "v.jsonl"
    val.write_text(json.dumps({"sentence": "x", "label": "c"}) + "\n")
    err = _fails(capsys, "--checkpoint", hf, f"--task.train={csv}", f"--task.validation={val}",
                 "--task.text_column=sentence")
    assert "label 'c' is not in the label set (a, b)" in err and "v.jsonl:1" in err
    err = _fails(capsys, "--checkpoint", hf, f"--task.train={csv}", "--task.text_column=sentence",
                 "--task.labels=a,z")
    assert "label 'b' is not in the label set (a, z)" in err
    err = _fails(capsys, "--checkpoint", hf, f"--task.train={tmp_path / 'missing.csv'}")
    assert "task.train" in err and "no such file" in err
    err = _fails(capsys, "--checkpoint", str(tmp_path / "nothing"), f"--task.cache_dir={cache}")
    assert "no such folder" in err
    err = _fails(capsys, "--checkpoint", str(tmp_path), f"--task.cache_dir={cache}")
    assert "neither a Hugging Face model folder" in err
    err = _fails(capsys, "--checkpoint", hf, f"--task.tokenizer={_other_tokenizer(tmp_path)}",
                 f"--task.cache_dir={cache}")
    assert "has a vocabulary of" in err and "the tokenizer" in err
    err = _fails(capsys, "--checkpoint", hf, "--data.seq_len=64")  # a pretraining section
    assert "unknown config key 'data.seq_len'" in err and "task" in err
    err = _fails(capsys, "--checkpoint", hf, "--train", "x.csv")  # options are config keys now
    assert "unrecognised argument '--train'" in err
    err = _fails(capsys, "--checkpoint", hf, "--eval.robust_radius=0.1,x")
    assert "eval.robust_radius" in err


# ------------------------------------------------------------------- real fine-tuning runs


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
def test_alum_finetune_from_export_on_two_ranks(tmp_path: Path, pretrained) -> None:
    out = tmp_path / "ft"
    r = run(deepspeed_cmd(f"--master_port={free_port()}", str(ROOT / "launch" / "finetune.py"),
                          "--checkpoint", str(pretrained["export"]),
                          f"--task.cache_dir={pretrained['cache']}", f"--run.dir={out}",
                          "--schedule.micro_batch_size=8", *FT), ROOT, ONE_THREAD)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "2 rank(s)" in log and "ALUM on (alpha=1)" in log
    train = [x for x in _records(out) if "ce_loss" in x]
    assert len(train) == 10 and all(x["adv_loss"] > 0 for x in train), train
    res = json.loads((out / "results.json").read_text())
    v = res["validation"]
    assert v["accuracy"] > MIN_ACCURACY > CHANCE, v
    assert 0 <= v["robust_accuracy@0.05"] <= v["accuracy"]
    (adv,) = res["adversarial"].values()  # the embedded task's distractor set
    assert adv["examples"] == v["examples"] and 0 <= adv["accuracy"] <= 1
    # The saved model is a standard Hugging Face classifier with the task's labels.
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert [model.config.id2label[i] for i in range(4)] == LABELS


@pytest.mark.distributed
def test_plain_finetune_from_deepspeed_run_in_one_process(tmp_path: Path, pretrained) -> None:
    out = tmp_path / "ft"
    r = run([sys.executable, "-m", "alum_ds.cli", "finetune", "--checkpoint", str(pretrained["run"]),
             f"--task.cache_dir={pretrained['cache']}", f"--run.dir={out}", "--alum.alpha=0",
             "--run.save_model=false", *FT], ROOT, {"MASTER_PORT": free_port(), **ONE_THREAD})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "1 rank(s)" in log and "ALUM off" in log and "consolidated to fp32" in log
    train = [x for x in _records(out) if "ce_loss" in x]
    assert len(train) == 10 and not any("adv_loss" in x for x in train)
    res = json.loads((out / "results.json").read_text())
    assert res["validation"]["accuracy"] > MIN_ACCURACY, res["validation"]
    assert not (out / "model").exists()


@pytest.mark.distributed
def test_deepspeed_run_with_another_vocabulary_is_refused(tmp_path: Path, capsys, pretrained) -> None:
    err = _fails(capsys, "--checkpoint", str(pretrained["run"]),
                 f"--task.tokenizer={_other_tokenizer(tmp_path)}", f"--task.cache_dir={pretrained['cache']}")
    assert "DeepSpeed checkpoint" in err and "has a vocabulary of" in err
