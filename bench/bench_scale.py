"""Scale smoke: RoBERTa-large-shaped ALUM steps on 2 CPU ranks, and what ZeRO sharding saves.

    python bench/bench_scale.py [--cases PRESET:DS_CONFIG,...] [--steps 3] [--micro-batch 1]
                                [--seq-len 128] [--corpus stdlib] [--append]

The default cases: large:zero3_offload,large:zero2,base:zero1,base:zero2,base:zero3,
base:zero3_offload.

Each case is one real run of launch/pretrain.py through the deepspeed launcher (2 CPU ranks,
fp32, ALUM on, K=1). While it runs, the launcher's child processes are polled: the peak resident
memory of each rank is its VmHWM (the kernel's high-water mark, so nothing between two polls is
missed); the peak of the ranks' summed RSS is sampled, and so is each rank's RSS from the first
logged step on (after model construction and DeepSpeed's partitioning; it includes the final
checkpoint save). Step times come from metrics.jsonl (step 1 apart: it includes first-touch
allocation). Evaluation is cut to 2 held-out sequences.

--corpus stdlib (default) learns a BPE of RoBERTa's size (50,265 requested) on this Python's
standard-library sources, which yield about 43k entries: large has ~348M parameters (RoBERTa-large
355M), base ~119M. --corpus embedded uses the small embedded default (~6.5k entries: large ~310M).
Figures are printed and saved to bench/results/scale.json; nothing is asserted. The trainer pins
glibc's mmap threshold on CPU runs under ZeRO-3 (alum_ds/host.py): figures
saved before that change held up to ~2 GiB per rank of freed-but-resident heap. RSS counts shared
library pages in every rank (about 0.5 GB of torch and friends), so the ranks' sum overstates
what the machine gives.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import stdlib_data

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


def prepare_data(args: argparse.Namespace) -> list[str]:
    """Data arguments for the runs (the prepared stdlib folder is cached between bench runs)."""
    return [] if args.corpus == "embedded" else [f"--data.dir={stdlib_data(args.vocab)}"]


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    out = {}
    for p in launcher.children(recursive=True):
        try:
            m = re.search(r"--local_rank=(\d+)", " ".join(p.cmdline()))
        except psutil.Error:
            continue
        if m:
            out[int(m.group(1))] = p
    return out


def _hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def count_params_m(preset: str, run_dir: Path, seq_len: int) -> float | None:
    """The model's parameter count, built on the meta device from the run's data vocabulary (the
    trainer's own log line counts ZeRO-3's partitioned placeholders, which are empty)."""
    import torch

    from alum_ds.model import build_model

    resolved = run_dir / "config.resolved.json"
    if not resolved.is_file():
        return None
    data_dir = Path(json.loads(resolved.read_text())["data_dir"])
    vocab = json.loads((data_dir / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    with torch.device("meta"):
        model = build_model(preset=preset, vocab_size=vocab, seq_len=seq_len, dropout=0.0)
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


def run_case(preset: str, ds: str, args: argparse.Namespace, data_args: list[str], work: Path,
             port: int) -> dict:
    ds_path = Path(ds) if ds.endswith(".json") else ROOT / "ds_configs" / f"{ds}.json"
    run_dir = work / f"{preset}-{ds_path.stem}"
    cmd = [sys.executable, "-u", "-c", "from deepspeed.launcher.runner import main; main()",
           f"--num_gpus={args.ranks}", f"--master_port={port}", str(ROOT / "launch" / "pretrain.py"),
           "--ds_config", str(ds_path), f"--model.preset={preset}",
           f"--schedule.steps={args.steps}", "--schedule.warmup_steps=1", "--logging.every=1",
           f"--schedule.micro_batch_size={args.micro_batch}", f"--data.seq_len={args.seq_len}",
           "--eval.max_sequences=2", "--checkpoint.keep=1", "--logging.tensorboard=false",
           # The settings these figures were measured with before the main job's recipe became
           # the defaults: ALUM on every step, dropout 0.1, 15% masking, the 8,192-token embedded
           # vocabulary.
           "--alum.start_step=0", "--model.dropout=0.1", "--masking.prob=0.15", "--data.vocab_size=8192",
           "--eval.fill_mask=0",
           f"--run.dir={run_dir}", *data_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "ALUM_DS_CPU_RANKS": str(args.ranks)}
    log_path = work / f"{preset}-{ds_path.stem}.log"
    t0 = time.time()
    load0 = os.getloadavg()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        launcher = psutil.Process(proc.pid)
        hwm: dict[int, int] = {}
        training: dict[int, int] = {}  # RSS once step 1 is logged: without model construction
        peak_sum = 0
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None:
            try:
                stepping = metrics.is_file() and '"step_time_s"' in metrics.read_text()
                ranks = _ranks(launcher)
                rss = 0
                for r, p in ranks.items():
                    hwm[r] = max(hwm.get(r, 0), _hwm_bytes(p.pid))
                    now = p.memory_info().rss
                    rss += now
                    if stepping:
                        training[r] = max(training.get(r, 0), now)
                peak_sum = max(peak_sum, rss)
            except (psutil.Error, OSError):
                pass
            time.sleep(args.poll_s)
    wall = time.time() - t0
    text = log_path.read_text()
    shown = ds_path.relative_to(ROOT).as_posix() if ds_path.is_relative_to(ROOT) else str(ds_path)
    res: dict = {"preset": preset, "ds_config": shown,
                 "zero_optimization": json.loads(ds_path.read_text()).get("zero_optimization"),
                 "exit_code": proc.returncode,
                 "wall_s": round(wall, 1), "load_avg_1min_start": round(load0[0], 2),
                 "load_avg_1min_end": round(os.getloadavg()[0], 2)}
    res["params_m"] = count_params_m(preset, run_dir, args.seq_len)
    res["peak_rss_gib_per_rank"] = [round(hwm[r] / GIB, 2) for r in sorted(hwm)]
    res["peak_rss_gib_max_rank"] = round(max(hwm.values(), default=0) / GIB, 2)
    res["peak_rss_gib_ranks_sum_sampled"] = round(peak_sum / GIB, 2)
    res["rss_gib_while_stepping_max_rank"] = round(max(training.values(), default=0) / GIB, 2)
    times = []
    if metrics.is_file():
        from alum_ds import records  # metrics.jsonl: a non-finite value is null, named
        recs = [records.loads(x) for x in metrics.read_text().splitlines()]
        times = [r["step_time_s"] for r in recs if "step_time_s" in r]
    res["first_step_s"] = round(times[0], 2) if times else None
    res["step_time_s_median_after_first"] = round(statistics.median(times[1:]), 2) if len(times) > 1 else None
    res["steps_logged"] = len(times)
    if proc.returncode != 0:
        res["log_tail"] = text[-3000:]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=("large:zero3_offload,large:zero2,base:zero1,base:zero2,base:zero3,"
                                       "base:zero3_offload"),
                   help="comma-separated PRESET:DS_CONFIG (a name in ds_configs/, or a .json path)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--corpus", choices=["stdlib", "embedded"], default="stdlib")
    p.add_argument("--vocab", type=int, default=50265)
    p.add_argument("--poll-s", type=float, default=0.2)
    p.add_argument("--master-port", type=int, default=29000 + os.getpid() % 900)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    p.add_argument("--append", action="store_true",
                   help="merge into --out (a case run again replaces its earlier result)")
    args = p.parse_args()
    cases = [c.split(":") for c in args.cases.split(",")]
    mem = psutil.virtual_memory()
    results = []
    with tempfile.TemporaryDirectory(prefix="alum_scale_") as tmp:
        work = Path(tmp)
        data_args = prepare_data(args)
        for i, (preset, ds) in enumerate(cases):
            print(f"bench_scale: {preset} under {ds} ...", file=sys.stderr, flush=True)
            res = run_case(preset, ds, args, data_args, work, args.master_port + i)
            print(json.dumps(res), file=sys.stderr, flush=True)
            results.append(res)
    doc = {
        "machine": {"cpus": os.cpu_count(), "mem_total_gib": round(mem.total / GIB, 1),
                    "note": "shared machine: other processes ran alongside; see load_avg_*"},
        "settings": {"ranks": args.ranks, "steps": args.steps, "micro_batch": args.micro_batch,
                     "seq_len": args.seq_len, "corpus": args.corpus,
                     "vocab_requested": args.vocab if args.corpus == "stdlib" else None,
                     "precision": "fp32 (bf16 auto is off on CPU)", "alum": "on, K=1",
                     "malloc": ("the trainer's alum_ds.host.tune_allocator: under ZeRO-3 freed "
                                "memory returned (mmap threshold 128 KiB), under ZeRO-0/1/2 kept")},
        "cases": results,
    }
    out = Path(args.out)
    if args.append and out.is_file():
        old = json.loads(out.read_text())
        if old.get("settings") != doc["settings"]:
            raise SystemExit(f"--append: {out} was written with other settings: {old.get('settings')}")
        # A case run again replaces its earlier result in place; new cases go to the end.
        fresh = {(c["preset"], c["ds_config"]): c for c in results}
        kept = [fresh.pop((c["preset"], c["ds_config"]), c) for c in old["cases"]]
        doc["cases"] = kept + list(fresh.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
