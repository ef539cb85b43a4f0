"""What the divergence guard and the checkpoint checksums cost.

1. The guard per step, in one process on the main job's model (one rank, ZeRO-2 and ZeRO-0
   fp32): each optimizer step of a real DeepSpeed engine is timed whole, and the guard's own work
   in it (summing the loss on the device, the two extra values in the step's all-reduce, the
   verdict on the host; under ZeRO-0 fp32 also the gradient-norm check the guard adds to the
   plain torch optimizer) is timed on its own inside the same step. Medians over the steps; the
   figure is guard / step.
2. sha256 of checkpoint files: a file of ``--mib`` MiB written with torch.save, then hashed as
   the save does it (just written: in the page cache) and again after dropping it from the page
   cache where the OS allows (``posix_fadvise``), as a resume on another machine reads it; seconds
   per GiB, beside the time torch.save took to write it.

    python bench/bench_guard.py [--steps 40] [--mib 512] [--out bench/results/guard.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import ROOT, machine  # noqa: E402


def guard_cost(ds_name: str, steps: int) -> dict:
    from alum_ds import guard as G
    from alum_ds import runtime as R
    from alum_ds.config import batching_for, load_config
    from alum_ds.data.prepare import ensure_embedded
    from alum_ds.data.shards import read_manifest
    from alum_ds.data.stream import TrainStream
    from alum_ds.ds_config import plan_ds
    from alum_ds.metrics import StepWindow
    from alum_ds.model import build_model
    from alum_ds.objective import AlumObjective

    cfg = load_config(None, ["--alum.enabled=false"])  # the main job's plain-MLM steps (90% of it)
    dev = R.detect()
    rt = R.start(dev)
    ds = plan_ds(ds_name, cfg, batching_for(cfg, 1), bf16_supported=False, on_gpu=dev.on_gpu)
    R.tune_host(rt, ds)
    data = ensure_embedded(R.cache_dir(), vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    vocab = int(read_manifest(data)["tokenizer"]["vocab_size"])
    torch.manual_seed(0)
    mlm = build_model(arch="roberta", preset=cfg.model.preset, vocab_size=vocab, seq_len=cfg.data.seq_len,
                      dropout=cfg.model.dropout)
    R.adapt_model(rt, mlm)
    obj = AlumObjective(mlm, cfg.alum, any_rank=rt.any_rank())
    engine = R.build_engine(obj, optim=cfg.optim, schedule=cfg.schedule, ds=ds.config, total_steps=10_000,
                            on_gpu=dev.on_gpu)
    inner_step = engine.optimizer.step
    G.install(engine)
    installed = engine.optimizer.step != inner_step  # bound methods: equal, never identical
    stream = TrainStream(data, seq_len=cfg.data.seq_len, seed=cfg.data.seed, masking=cfg.masking)
    window = StepWindow(rt.device)
    guard = G.Guard(cfg.guard, rt.device)
    mb = cfg.schedule.micro_batch_size
    step_s, guard_s = [], []
    for step in range(steps + 3):
        x, y = stream.next_for_rank(rank=0, world=1, micro_batch=mb)
        t0 = time.perf_counter()
        tg = time.perf_counter()
        reduced = torch.cat([torch.tensor([float((y != -100).sum()), 0.0]), guard.payload()]).tolist()
        guard.judge(reduced[2:])
        spent = time.perf_counter() - tg
        mbatch = R.MicroBatch(0, torch.from_numpy(x), torch.from_numpy(y), False,
                              token_weight=1.0 / max(reduced[0], 1.0))
        loss, stats = engine(**mbatch.inputs())
        engine.backward(loss)
        check = 0.0
        if installed:  # the check the wrapper runs inside engine.step(), timed here on its own
            tc = time.perf_counter()
            grads = [q.grad for g in engine.optimizer.param_groups for q in g["params"] if q.grad is not None]
            bool(torch.isfinite(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))))
            check = time.perf_counter() - tc
        before = engine.skipped_steps
        engine.step()
        window.add(stats)
        tg = time.perf_counter()
        guard.add(stats)
        guard.stepped(step + 1, engine, before)
        spent += time.perf_counter() - tg
        total = time.perf_counter() - t0 - check
        if step >= 3:  # warm-up steps left out
            step_s.append(total)
            guard_s.append(spent + check)
    med_step, med_guard = statistics.median(step_s), statistics.median(guard_s)
    return {"ds_config": ds_name, "steps": steps, "step_s_median": med_step,
            "guard_s_median": med_guard, "guard_fraction_of_step": med_guard / med_step,
            "optimizer_check_installed": installed}


def hash_cost(mib: int) -> dict:
    from alum_ds.checkpoint import file_digest

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "shard.pt"
        t = torch.randn(mib * 2**20 // 4)
        t0 = time.perf_counter()
        torch.save({"t": t}, path)
        os.sync()
        write_s = time.perf_counter() - t0
        gib = path.stat().st_size / 2**30
        hot = []
        for _ in range(3):
            t0 = time.perf_counter()
            file_digest(path)
            hot.append(time.perf_counter() - t0)
        cold = None
        if hasattr(os, "posix_fadvise"):
            with open(path, "rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            file_digest(path)
            cold = (time.perf_counter() - t0) / gib
    return {"file_gib": gib, "torch_save_s_per_gib": write_s / gib,
            "sha256_page_cache_s_per_gib": statistics.median(hot) / gib,
            "sha256_after_fadvise_s_per_gib": cold}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "guard.json"))
    a = ap.parse_args()
    load_before = os.getloadavg()
    out = {"machine": machine(), "settings": {"steps": a.steps, "mib": a.mib},
           "guard": [guard_cost(n, a.steps) for n in ("zero2.json", "zero0.json")],
           "hashing": hash_cost(a.mib)}
    out["load_average"] = {"before": load_before, "after": os.getloadavg()}
    for g in out["guard"]:
        print(f"{g['ds_config']}: step {g['step_s_median'] * 1e3:.1f} ms, guard "
              f"{g['guard_s_median'] * 1e6:.0f} us = {g['guard_fraction_of_step']:.3%} of the step"
              f"{' (with the optimizer check)' if g['optimizer_check_installed'] else ''}")
    h = out["hashing"]
    cold = h["sha256_after_fadvise_s_per_gib"]
    print(f"sha256: {h['sha256_page_cache_s_per_gib']:.2f} s/GiB from the page cache"
          f"{f', {cold:.2f} s/GiB after dropping it' if cold is not None else ''}; "
          f"torch.save wrote {h['torch_save_s_per_gib']:.2f} s/GiB")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
