"""Plain-MLM throughput of alum_ds against Hugging Face Trainer + DeepSpeed on the same work.

    python bench/bench_vs_hf.py [--preset small] [--steps 40] [--ranks 2] [--quick]

The baseline is the ``run_mlm.py`` recipe: ``Trainer`` with the same DeepSpeed ZeRO config,
``DataCollatorForLanguageModeling`` (15% masking, full-vocabulary logits at every position), the
same model shape, tokenizer, packed sequences, sequence length, micro-batch, number of ranks and
optimizer settings. Both run through the real ``deepspeed`` launcher, one after the other, in this
script; the figure is the median step time after warm-up. Results are printed and saved to
``bench/results/vs_hf.json``; nothing is asserted. Needs ``accelerate`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _launcher(ranks: int, port: int) -> list[str]:
    return [sys.executable, "-c", "from deepspeed.launcher.runner import main; main()",
            f"--num_gpus={ranks}", f"--master_port={port}"]


def _ds_config(ds_path: Path) -> dict:
    """The same ZeRO settings; batch/accumulation/clipping left to the Trainer ('auto')."""
    ds = json.loads(ds_path.read_text())
    ds["bf16"] = {"enabled": "auto"}
    for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
              "gradient_clipping", "train_batch_size"):
        ds[k] = "auto"
    return ds


def hf_worker(args: argparse.Namespace) -> None:
    """Runs under the deepspeed launcher: one Trainer rank."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from alum_ds.data.prepare import ensure_embedded
    from alum_ds.data.stream import PackedSequences
    from alum_ds.data.tokenizer import load_tokenizer
    from alum_ds.model import build_model

    data_dir = ensure_embedded(args.cache, vocab_size=8192, seed=1234)
    tok = load_tokenizer(data_dir / "tokenizer")
    seqs = PackedSequences(data_dir, "train", args.seq_len)
    ids = seqs.get(np.arange(len(seqs)))
    train = Dataset.from_dict({"input_ids": ids.tolist()})
    torch.manual_seed(42)
    model = build_model(preset=args.preset, vocab_size=len(tok), seq_len=args.seq_len, dropout=0.1)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    on_gpu = torch.cuda.is_available()
    targs = TrainingArguments(
        output_dir=str(Path(args.out_json).parent / "hf_out"), per_device_train_batch_size=args.micro_batch,
        max_steps=args.steps, learning_rate=5e-4, warmup_steps=max(1, args.steps // 10),
        weight_decay=0.01, adam_beta2=0.98, adam_epsilon=1e-6, max_grad_norm=1.0,
        logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True,
        deepspeed=_ds_config(ROOT / args.ds), use_cpu=not on_gpu, seed=42,
        dataloader_drop_last=True, bf16=on_gpu and torch.cuda.is_bf16_supported(),
    )
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator,
                      callbacks=[StepTimer()])
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out_json).write_text(json.dumps({"step_times": times}))


def run_alum_ds(args: argparse.Namespace, work: Path, port: int) -> list[float]:
    run_dir = work / "alum_ds"
    cmd = _launcher(args.ranks, port) + [
        str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(ROOT / args.ds),
        f"--model.preset={args.preset}", f"--schedule.steps={args.steps}",
        f"--schedule.warmup_steps={max(1, args.steps // 10)}", "--logging.every=1",
        "--alum.enabled=false", f"--run.dir={run_dir}", f"--data.seq_len={args.seq_len}",
        f"--schedule.micro_batch_size={args.micro_batch}", f"--data.cache_dir={args.cache}",
        "--logging.tensorboard=false",
    ]
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL,
                   env={**os.environ, "ALUM_DS_CPU_RANKS": "1"})
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in recs if "step_time_s" in r]


def run_hf(args: argparse.Namespace, work: Path, port: int) -> list[float]:
    out = work / "hf.json"
    cmd = _launcher(args.ranks, port) + [
        str(Path(__file__).resolve()), "--hf-worker", f"--out-json={out}",
        f"--preset={args.preset}", f"--steps={args.steps}", f"--seq-len={args.seq_len}",
        f"--micro-batch={args.micro_batch}", f"--ds={args.ds}", f"--cache={args.cache}",
    ]
    # The same threads per rank as alum_ds uses (accelerate would give every rank all cores).
    threads = str(max(1, (os.cpu_count() or 1) // args.ranks))
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    return json.loads(out.read_text())["step_times"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ds", default="ds_configs/zero2.json")
    p.add_argument("--cache", default="")
    p.add_argument("--quick", action="store_true", help="tiny preset, few steps (smoke test)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_hf.json"))
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        hf_worker(args)
        return
    if args.quick:
        args.preset, args.steps, args.warmup = "tiny", 6, 2
    port = 29000 + os.getpid() % 900
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.cache = args.cache or str(work / "cache")
        ours = run_alum_ds(args, work, port)[args.warmup:]
        hf = run_hf(args, work, port + 1)[args.warmup:]
    tokens = args.ranks * args.micro_batch * args.seq_len
    res = {
        "preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
        "ranks": args.ranks, "ds_config": args.ds, "steps_measured": len(ours),
        "alum_ds_step_s": statistics.median(ours), "hf_trainer_step_s": statistics.median(hf),
    }
    res["alum_ds_tokens_per_s"] = tokens / res["alum_ds_step_s"]
    res["hf_trainer_tokens_per_s"] = tokens / res["hf_trainer_step_s"]
    res["speedup"] = res["hf_trainer_step_s"] / res["alum_ds_step_s"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
