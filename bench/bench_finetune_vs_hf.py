"""Fine-tuning throughput of alum_ds (plain and ALUM) against Hugging Face Trainer + DeepSpeed.

    python bench/bench_finetune_vs_hf.py [--preset small] [--steps 40] [--ranks 2] [--quick]

The same work on both sides: one model folder (a RoBERTa of the preset with the embedded
corpus's BPE, saved as a Hugging Face folder), the embedded topic task's training set (four
classes, real paragraphs), each example truncated to ``--seq-len`` tokens and batches padded to
their longest row, the same micro-batch, number of ranks, DeepSpeed ZeRO config, optimizer
settings and dropout. The baseline is ``AutoModelForSequenceClassification`` under ``Trainer``
with ``DataCollatorWithPadding`` (what ``run_glue.py`` does); alum_ds runs ``launch/finetune.py``
with ALUM off, then on. All three run through the real ``deepspeed`` launcher, one after the
other, in this script, and the three again for each of ``--rounds`` (so that a change of the
machine's load over the run touches every side alike); each is timed as wall time over windows
of whole steps (data, collation and the step) after warm-up, and the figure is the median window
over all rounds.

Goals (issue 21): plain alum_ds at least 1.0x the Trainer's throughput, and an ALUM step at most
2.5x a plain one (ALUM's FLOP model is 8/3 of plain: docs/ALUM.md, "Cost"). Results are printed
and saved to ``bench/results/finetune_vs_hf.json``; nothing is asserted. Needs ``accelerate``
(the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from _common import machine
from bench_vs_hf import _ds_config, _launcher

ROOT = Path(__file__).resolve().parent.parent
LR, WD, BETAS, EPS, CLIP, DROPOUT, SEED = 1e-4, 0.01, (0.9, 0.98), 1e-6, 1.0, 0.1, 42


def hf_worker(args: argparse.Namespace) -> None:
    """Runs under the deepspeed launcher: one Trainer rank."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from alum_ds import distributed as D
    from alum_ds.finetune.tasks import LABELS

    rows = [json.loads(x) for x in Path(args.train).read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(args.model)
    enc = tok([r["text"] for r in rows], truncation=True, max_length=args.seq_len)
    train = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                               "labels": [LABELS.index(r["label"]) for r in rows]})
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(LABELS))
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall time between consecutive step ends: the whole step, data loading and collation
        included."""

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    on_gpu = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=str(Path(args.out_json).parent / "hf_out"), per_device_train_batch_size=args.micro_batch,
        max_steps=args.steps, learning_rate=LR, warmup_steps=max(1, args.steps // 10),
        weight_decay=WD, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=CLIP,
        logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True,
        deepspeed=_ds_config(ROOT / args.ds), use_cpu=not on_gpu, seed=SEED,
        dataloader_drop_last=True, bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train,
                      data_collator=DataCollatorWithPadding(tok), callbacks=[StepTimer()])
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out_json).write_text(json.dumps({"step_ends": ends}))
    D.shutdown()


def make_model(args: argparse.Namespace, work: Path) -> Path:
    """A Hugging Face folder: the preset's RoBERTa (random weights: throughput does not depend on
    them) with the embedded corpus's tokenizer."""
    import torch

    from alum_ds.data.prepare import ensure_embedded
    from alum_ds.data.tokenizer import load_tokenizer
    from alum_ds.model import build_model

    data = ensure_embedded(args.cache, vocab_size=args.vocab, seed=1234)
    tok = load_tokenizer(data / "tokenizer")
    torch.manual_seed(SEED)
    model = build_model(preset=args.preset, vocab_size=len(tok), seq_len=args.seq_len, dropout=DROPOUT)
    out = work / "model"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def run_alum_ds(args: argparse.Namespace, work: Path, port: int, model: Path, alum: bool) -> list[float]:
    """Mean step time per logged window (each record covers the ``window`` steps since the last)."""
    run_dir = work / f"alum_ds-{'alum' if alum else 'plain'}-{port}"
    cmd = _launcher(args.ranks, port) + [
        str(ROOT / "launch" / "finetune.py"), "--ds_config", str(ROOT / args.ds), "--checkpoint", str(model),
        f"--task.cache_dir={args.cache}", f"--task.max_length={args.seq_len}",
        f"--schedule.steps={args.steps}", f"--schedule.warmup_steps={max(1, args.steps // 10)}",
        "--schedule.warmup_fraction=0", f"--schedule.micro_batch_size={args.micro_batch}",
        f"--logging.every={args.window}", f"--alum.enabled={str(alum).lower()}", f"--run.dir={run_dir}",
        f"--optim.lr={LR}", f"--optim.weight_decay={WD}", f"--optim.betas={BETAS[0]},{BETAS[1]}",
        f"--optim.eps={EPS}", f"--optim.grad_clip={CLIP}", f"--model.dropout={DROPOUT}",
        f"--run.seed={SEED}", "--run.save_model=false", "--eval.pgd_steps=0",
        "--logging.tensorboard=false",
    ]
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL,
                   env={**os.environ, "ALUM_DS_CPU_RANKS": "1"})
    from alum_ds import records  # metrics.jsonl: a non-finite value is null, named
    recs = [records.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in recs if "step_time_s" in r]


def run_hf(args: argparse.Namespace, work: Path, port: int, model: Path, train: Path) -> list[float]:
    out = work / "hf.json"
    cmd = _launcher(args.ranks, port) + [
        str(Path(__file__).resolve()), "--hf-worker", f"--out-json={out}", f"--model={model}",
        f"--train={train}", f"--steps={args.steps}", f"--seq-len={args.seq_len}",
        f"--micro-batch={args.micro_batch}", f"--ds={args.ds}",
    ]
    threads = str(max(1, (os.cpu_count() or 1) // args.ranks))  # as alum_ds's runtime chooses
    out.unlink(missing_ok=True)
    r = subprocess.run(cmd, cwd=work, stdout=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    ends = json.loads(out.read_text())["step_ends"] if out.is_file() else []
    if r.returncode != 0 and len(ends) < args.steps:
        raise SystemExit(f"bench_finetune_vs_hf: the HF Trainer baseline failed (exit code "
                         f"{r.returncode}) after {len(ends)} of {args.steps} steps")
    w = args.window
    return [(ends[i] - ends[i - w]) / w for i in range(w, len(ends), w)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the figures")
    p.add_argument("--window", type=int, default=5, help="steps per timing window")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example after truncation")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ds", default="ds_configs/zero2.json")
    p.add_argument("--rounds", type=int, default=2, help="times the three runs are repeated, in turn")
    p.add_argument("--vocab", type=int, default=8192, help="the embedded BPE's vocabulary")
    p.add_argument("--cache", default="")
    p.add_argument("--quick", action="store_true", help="tiny preset, few steps (smoke test)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "finetune_vs_hf.json"))
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--model", default="", help=argparse.SUPPRESS)
    p.add_argument("--train", default="", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        hf_worker(args)
        return
    if args.quick:
        args.preset, args.steps, args.warmup, args.window, args.vocab = "tiny", 6, 2, 2, 2048
        args.rounds = 1
    port = 29000 + os.getpid() % 800
    res: dict = {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                 "ranks": args.ranks, "ds_config": args.ds, "window_steps": args.window,
                 "steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds,
                 "machine": {**machine(), "load_avg_before": list(os.getloadavg())}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.cache = args.cache or str(work / "cache")
        from alum_ds.finetune.tasks import ensure_topic_task

        train = ensure_topic_task(args.cache) / "train.jsonl"
        model = make_model(args, work)
        skip = -(-args.warmup // args.window)  # windows that hold a warm-up step
        plain: list[float] = []
        hf: list[float] = []
        alum: list[float] = []
        for r in range(args.rounds):
            plain += run_alum_ds(args, work, port + 3 * r, model, alum=False)[skip:]
            hf += run_hf(args, work, port + 3 * r + 1, model, train)[skip:]
            alum += run_alum_ds(args, work, port + 3 * r + 2, model, alum=True)[skip:]
    rows = args.ranks * args.micro_batch
    res["windows_measured"] = len(plain)
    res["alum_ds_plain_step_s"] = statistics.median(plain)
    res["hf_trainer_step_s"] = statistics.median(hf)
    res["alum_ds_alum_step_s"] = statistics.median(alum)
    res["alum_ds_plain_examples_per_s"] = rows / res["alum_ds_plain_step_s"]
    res["hf_trainer_examples_per_s"] = rows / res["hf_trainer_step_s"]
    res["alum_ds_alum_examples_per_s"] = rows / res["alum_ds_alum_step_s"]
    res["plain_vs_hf_throughput"] = res["hf_trainer_step_s"] / res["alum_ds_plain_step_s"]
    res["alum_vs_plain_step"] = res["alum_ds_alum_step_s"] / res["alum_ds_plain_step_s"]
    res["goals"] = {"plain_vs_hf_throughput >= 1.0": res["plain_vs_hf_throughput"] >= 1.0,
                    "alum_vs_plain_step <= 2.5": res["alum_vs_plain_step"] <= 2.5}
    res["windows_s"] = {"alum_ds_plain": plain, "hf_trainer": hf, "alum_ds_alum": alum}
    res["load_avg_after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
