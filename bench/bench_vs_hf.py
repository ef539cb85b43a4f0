"""Plain-MLM throughput of alum_ds against Hugging Face Trainer + DeepSpeed on the same work.

    python bench/bench_vs_hf.py [--vocab embedded,roberta] [--preset small] [--steps 40] [--quick]

The baseline is the ``run_mlm.py`` recipe: ``Trainer`` with the same DeepSpeed ZeRO config,
``DataCollatorForLanguageModeling`` (15% masking, full-vocabulary logits at every position), the
same model shape, tokenizer, packed sequences, sequence length, micro-batch, number of ranks and
optimizer settings. Both run through the real ``deepspeed`` launcher, one after the other, in this
script; each side is timed the same way, as wall time over windows of whole steps (data loading,
masking and the step itself) after warm-up, and the figure is the median window. alum_ds also runs
ALUM on the same work, for its tokens/s and its ratio to plain.

Two vocabularies (``--vocab``): ``embedded``, the ~6.5k-entry BPE the embedded default corpus
supports (the project's reference setting), and ``roberta``, a RoBERTa-size BPE (50,265 requested,
~43k learned from this Python's standard library; see bench/_common.py), the shape a user of
RoBERTa's tokenizer trains. The LM head's share of the work, and so the saving of predicting only
the masked positions, grows with the vocabulary.

MFU counts every pass in forward-equivalents (3 plain, 8 ALUM) with the FLOP model
6 x non-embedding parameters + 12 x layers x hidden x sequence per token; on a CPU there is no
peak figure, so it is reported as achieved FLOP/s. Results are printed and saved to
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

from _common import machine, stdlib_data

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

    from alum_ds import distributed as D
    from alum_ds.data.stream import PackedSequences
    from alum_ds.data.tokenizer import load_tokenizer
    from alum_ds.model import build_model

    data_dir = Path(args.data_dir)
    tok = load_tokenizer(data_dir / "tokenizer")
    seqs = PackedSequences(data_dir, "train", args.seq_len)
    ids = seqs.get(np.arange(min(len(seqs), 4 * args.steps * args.micro_batch * args.ranks)))
    train = Dataset.from_dict({"input_ids": ids.tolist()})
    torch.manual_seed(42)
    # The stock model: the baseline is what a user of the Trainer runs (no alum_ds CPU kernels).
    model = build_model(preset=args.preset, vocab_size=len(tok), seq_len=args.seq_len, dropout=0.1)
    ends: list[float] = []

    class StepTimer(TrainerCallback):
        """Wall time between consecutive step ends: the whole step, data loading and masking
        included (``on_step_begin`` comes after the batch is fetched and collated)."""

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

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
        Path(args.out_json).write_text(json.dumps({"step_ends": ends}))
    D.shutdown()  # an orderly teardown, as alum_ds's own entry points do


def _compiled_ds(args: argparse.Namespace, work: Path) -> Path:
    """The same DeepSpeed config with torch.compile on."""
    ds = json.loads((ROOT / args.ds).read_text())
    ds["torch_compile"] = {"enabled": True}
    path = work / "compiled.json"
    path.write_text(json.dumps(ds))
    return path


def run_alum_ds(args: argparse.Namespace, work: Path, port: int, data_dir: Path, alum: bool,
                compiled: bool = False) -> tuple[list[float], dict]:
    """Mean step time per logged window (each record covers the `window` steps since the last;
    compilation is left out of it by the trainer), and the compile figures when compiled."""
    run_dir = work / f"alum_ds-{'alum' if alum else 'plain'}{'-compiled' if compiled else ''}-{data_dir.name}"
    ds = _compiled_ds(args, work) if compiled else ROOT / args.ds
    cmd = _launcher(args.ranks, port) + [
        str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(ds), "--eval.fill_mask=0",
        f"--model.preset={args.preset}", f"--schedule.steps={args.steps}",
        f"--schedule.warmup_steps={max(1, args.steps // 10)}", f"--logging.every={args.window}",
        f"--alum.enabled={str(alum).lower()}", f"--run.dir={run_dir}", f"--data.seq_len={args.seq_len}",
        f"--schedule.micro_batch_size={args.micro_batch}", f"--data.dir={data_dir}",
        "--logging.tensorboard=false", "--checkpoint.every=0", "--eval.max_sequences=16",
        # As the Trainer side: dropout 0.1, 15% masking (its collator's); ALUM throughout.
        "--model.dropout=0.1", "--masking.prob=0.15", "--alum.start_step=0",
    ]
    subprocess.run(cmd, check=True, cwd=work, stdout=subprocess.DEVNULL,
                   env={**os.environ, "ALUM_DS_CPU_RANKS": "1"})
    from alum_ds import records  # metrics.jsonl: a non-finite value is null, named
    recs = [records.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    comp = {"compile_seconds": sum(r["compile_seconds"] for r in recs if "compile_seconds" in r),
            "graphs_compiled": max((r["graphs_compiled"] for r in recs if "graphs_compiled" in r), default=0)}
    return [r["step_time_s"] for r in recs if "step_time_s" in r], comp


def run_hf(args: argparse.Namespace, work: Path, port: int, data_dir: Path) -> list[float]:
    """Mean step time per window of `window` consecutive steps, from the Trainer's step ends."""
    out = work / f"hf-{data_dir.name}.json"
    cmd = _launcher(args.ranks, port) + [
        str(Path(__file__).resolve()), "--hf-worker", f"--out-json={out}",
        f"--preset={args.preset}", f"--steps={args.steps}", f"--seq-len={args.seq_len}",
        f"--micro-batch={args.micro_batch}", f"--ds={args.ds}", f"--data-dir={data_dir}",
        f"--ranks={args.ranks}",
    ]
    # The same threads per rank as alum_ds uses (accelerate would give every rank all cores).
    threads = str(max(1, (os.cpu_count() or 1) // args.ranks))
    out.unlink(missing_ok=True)
    r = subprocess.run(cmd, cwd=work, stdout=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    ends = json.loads(out.read_text())["step_ends"] if out.is_file() else []
    if r.returncode != 0:
        if len(ends) < args.steps:
            raise SystemExit(f"bench_vs_hf: the HF Trainer baseline failed (exit code "
                             f"{r.returncode}) after {len(ends)} of {args.steps} steps")
        # Every step was timed and written: a crash at teardown does not change the figures.
        print(f"bench_vs_hf: the HF Trainer baseline exited with code {r.returncode} after "
              f"writing all {len(ends)} step times; using them", file=sys.stderr)
    w = args.window
    return [(ends[i] - ends[i - w]) / w for i in range(w, len(ends), w)]


def data_for(vocab: str, args: argparse.Namespace) -> Path:
    if vocab == "embedded":
        from alum_ds.data.prepare import ensure_embedded

        return ensure_embedded(args.cache, vocab_size=args.embedded_vocab, seed=1234)
    return stdlib_data(50265)


def flops_per_token(preset: str, data_dir: Path, seq_len: int) -> tuple[float, int]:
    """(training FLOPs per token of one forward+backward by the FLOP model, vocabulary size)."""
    import torch

    from alum_ds.metrics import flops_per_token as fpt
    from alum_ds.model import build_model, non_embedding_params

    vocab = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    with torch.device("meta"):
        m = build_model(preset=preset, vocab_size=vocab, seq_len=seq_len, dropout=0.0)
    return fpt(non_embedding_params(m), m.config.num_hidden_layers, m.config.hidden_size, seq_len), vocab


def measure(vocab: str, args: argparse.Namespace, work: Path, port: int) -> dict:
    from alum_ds.metrics import forward_equivalents

    data_dir = data_for(vocab, args)
    skip = -(-args.warmup // args.window)  # windows that hold a warm-up step
    plain = run_alum_ds(args, work, port, data_dir, alum=False)[0][skip:]
    hf = run_hf(args, work, port + 1, data_dir)[skip:]
    alum = run_alum_ds(args, work, port + 2, data_dir, alum=True)[0][skip:] if args.alum else []
    tokens = args.ranks * args.micro_batch * args.seq_len
    fpt, vocab_size = flops_per_token(args.preset, data_dir, args.seq_len)
    res: dict = {"vocab_size": vocab_size, "windows_measured": len(plain),
                 "alum_ds_step_s": statistics.median(plain), "hf_trainer_step_s": statistics.median(hf)}
    res["alum_ds_tokens_per_s"] = tokens / res["alum_ds_step_s"]
    res["hf_trainer_tokens_per_s"] = tokens / res["hf_trainer_step_s"]
    res["speedup"] = res["hf_trainer_step_s"] / res["alum_ds_step_s"]
    # Model FLOP/s: the FLOP model's work per token (the same for both sides) times tokens/s.
    res["alum_ds_model_gflops_per_s"] = res["alum_ds_tokens_per_s"] * fpt / 1e9
    res["hf_trainer_model_gflops_per_s"] = res["hf_trainer_tokens_per_s"] * fpt / 1e9
    if alum:
        passes = forward_equivalents(True, 1) / forward_equivalents(False, 1)
        res["alum_step_s"] = statistics.median(alum)
        res["alum_tokens_per_s"] = tokens / res["alum_step_s"]
        res["alum_vs_plain_step"] = res["alum_step_s"] / res["alum_ds_step_s"]
        res["alum_flop_model_ratio"] = passes
        # Counting its extra passes, how well an ALUM step uses the hardware relative to plain
        # (1.0 = the same efficiency; docs/ALUM.md's "efficiency parity").
        res["alum_efficiency_vs_plain"] = passes / res["alum_vs_plain_step"]
        res["alum_model_gflops_per_s"] = res["alum_tokens_per_s"] * fpt * passes / 1e9
    if args.compile:  # the same runs with torch.compile (alum_ds.compiling), in this script
        for name, alum_on in [("plain", False)] + ([("alum", True)] if args.alum else []):
            steps, comp = run_alum_ds(args, work, port + 5, data_dir, alum=alum_on, compiled=True)
            res[f"compiled_{name}_step_s"] = statistics.median(steps[skip:])
            res[f"compiled_{name}_compile_seconds"] = comp["compile_seconds"]
            res[f"compiled_{name}_graphs"] = comp["graphs_compiled"]
        res["compiled_speedup"] = res["hf_trainer_step_s"] / res["compiled_plain_step_s"]
        res["compiled_vs_eager_plain"] = res["alum_ds_step_s"] / res["compiled_plain_step_s"]
        if args.alum:
            res["compiled_alum_vs_plain_step"] = res["compiled_alum_step_s"] / res["compiled_plain_step_s"]
            res["compiled_vs_eager_alum"] = res["alum_step_s"] / res["compiled_alum_step_s"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", default="embedded,roberta",
                   help="comma-separated: embedded (~6.5k entries), roberta (RoBERTa-size)")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the figures")
    p.add_argument("--window", type=int, default=5,
                   help="steps per timing window: both sides timed as wall time over whole windows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ds", default="ds_configs/zero2.json")
    p.add_argument("--cache", default="")
    p.add_argument("--no-alum", dest="alum", action="store_false", help="skip the ALUM run")
    p.add_argument("--compile", action="store_true",
                   help="also run alum_ds with torch.compile (plain and ALUM), same shapes")
    p.add_argument("--quick", action="store_true", help="tiny preset, few steps, embedded (smoke test)")
    p.add_argument("--embedded-vocab", type=int, default=8192,
                   help="vocabulary of the embedded setting (quick: 2048, the run config's default)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "vs_hf.json"))
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-json", default="", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        hf_worker(args)
        return
    if args.quick:
        args.preset, args.steps, args.warmup, args.window, args.vocab = "tiny", 6, 2, 2, "embedded"
        args.embedded_vocab = 2048  # the corpus other runs already prepared in a shared cache
    vocabs = [v for v in args.vocab.split(",") if v]
    for v in vocabs:
        if v not in ("embedded", "roberta"):
            p.error(f"--vocab {v}: choose embedded or roberta")
    port = 29000 + os.getpid() % 800
    out = {"preset": args.preset, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
           "ranks": args.ranks, "ds_config": args.ds, "window_steps": args.window,
           "steps": args.steps, "warmup_steps": args.warmup,
           "machine": {**machine(), "load_avg_before": list(os.getloadavg())}, "settings": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        args.cache = args.cache or str(work / "cache")
        for i, v in enumerate(vocabs):
            out["settings"][v] = measure(v, args, work, port + 3 * i)
            print(f"bench_vs_hf: {v}: {json.dumps(out['settings'][v])}", file=sys.stderr, flush=True)
    out["load_avg_after"] = list(os.getloadavg())
    # The headline: the project's reference setting when it ran, else the first one.
    head = out["settings"].get("embedded") or next(iter(out["settings"].values()))
    out["speedup"] = head["speedup"]
    if "roberta" in out["settings"]:
        out["speedup_roberta_vocab"] = out["settings"]["roberta"]["speedup"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
