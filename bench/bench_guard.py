"""What the divergence guard and the checkpoint checksums cost.

1. The guard per step, in one process on the main job's model (one rank, ZeRO-2 and ZeRO-0
   fp32): each optimizer step of a real DeepSpeed engine is timed whole, and the guard's own work
   in it (summing the loss on the device, the two extra values in the step's all-reduce, the
   verdict on the host; under ZeRO-0 fp32 also the finite check of the gradient norm the guard
   adds to the plain torch optimizer, on the norm DeepSpeed's clipping computed) is timed on its
   own inside the same step. Medians over the steps; the figure is guard / step.
2. sha256 of checkpoint files: a file of ``--mib`` MiB written with torch.save, then hashed as
   the save does it (just written: in the page cache) and again after dropping it from the page
   cache where the OS allows (``posix_fadvise``), as a resume on another machine reads it; seconds
   per GiB, beside the time torch.save took to write it.
3. Whole checkpoint saves of a real ZeRO-2 engine (``--save-preset``), with and without the
   hashing, alternating in one process: medians, their ratio and the hashing's share.

    python bench/bench_guard.py [--steps 40] [--mib 512] [--saves 5] [--save-preset small]
                                [--out bench/results/guard.json]
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


def _engine(ds_name: str, overrides: list[str]):
    """A real one-rank DeepSpeed engine on the main job's plain-MLM model (``overrides`` on top)."""
    from alum_ds import runtime as R
    from alum_ds.config import batching_for, cache_dir, load_config
    from alum_ds.data.prepare import ensure_embedded
    from alum_ds.data.shards import read_manifest
    from alum_ds.ds_config import plan_ds
    from alum_ds.model import build_model
    from alum_ds.objective import AlumObjective

    cfg = load_config(None, ["--alum.enabled=false", *overrides])  # the main job's plain-MLM steps
    dev = R.detect()
    rt = R.start(dev)
    ds = plan_ds(ds_name, cfg, batching_for(cfg, 1), bf16_supported=False, on_gpu=dev.on_gpu)
    R.tune_host(rt, ds)
    data = ensure_embedded(cache_dir(), vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    vocab = int(read_manifest(data)["tokenizer"]["vocab_size"])
    torch.manual_seed(0)
    mlm = build_model(arch="roberta", preset=cfg.model.preset, vocab_size=vocab, seq_len=cfg.data.seq_len,
                      dropout=cfg.model.dropout)
    R.adapt_model(rt, mlm)
    obj = AlumObjective(mlm, cfg.alum, any_rank=rt.any_rank())
    engine = R.build_engine(obj, optim=cfg.optim, schedule=cfg.schedule, ds=ds.config, total_steps=10_000,
                            on_gpu=dev.on_gpu)
    return cfg, rt, data, engine


def guard_cost(ds_name: str, steps: int) -> dict:
    from alum_ds import guard as G
    from alum_ds import runtime as R
    from alum_ds.data.stream import TrainStream
    from alum_ds.metrics import StepWindow

    cfg, rt, data, engine = _engine(ds_name, [])
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
        before = engine.skipped_steps
        engine.step()
        check = 0.0
        if installed:  # the wrapper's own work inside engine.step(), repeated here to time it
            tc = time.perf_counter()
            bool(torch.isfinite(engine.optimizer._global_grad_norm))
            check = time.perf_counter() - tc
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


def save_cost(preset: str, saves: int) -> dict:
    """Whole checkpoint saves (``alum_ds.checkpoint.save``: write, hash, record, move ``latest``,
    prune) of a real ZeRO-2 engine, alternating with saves whose hashing is replaced by an empty
    record, in the same process; the hashing itself timed inside the hashed saves. Medians."""
    from alum_ds import checkpoint as C

    _, _, _, engine = _engine("zero2.json", [f"--model.preset={preset}"])
    real_hash = C.hash_own_files
    spent: list[float] = []

    def timed_hash(tag_dir: Path, rank: int) -> dict:
        t0 = time.perf_counter()
        out = real_hash(tag_dir, rank)
        spent.append(time.perf_counter() - t0)
        return out

    with_s, without_s = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(2 * saves + 2):
            hashed = i % 2 == 0
            C.hash_own_files = timed_hash if hashed else (lambda tag_dir, rank: {})
            t0 = time.perf_counter()
            path = C.save(engine, Path(d), i + 1, {"step": i + 1}, keep=1)
            (with_s if hashed else without_s).append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    C.hash_own_files = real_hash
    with_s, without_s, spent = with_s[1:], without_s[1:], spent[1:]  # the first of each: warm-up
    med_with, med_without = statistics.median(with_s), statistics.median(without_s)
    return {"preset": preset, "saves_each": len(with_s), "checkpoint_mib": size / 2**20,
            "save_s_median": med_with, "save_without_hashing_s_median": med_without,
            "hashing_s_median": statistics.median(spent), "ratio_with_to_without": med_with / med_without,
            "hashing_fraction_of_save": statistics.median(spent) / med_with}


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
    ap.add_argument("--saves", type=int, default=5, help="checkpoint saves with and without hashing")
    ap.add_argument("--save-preset", default="small")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "guard.json"))
    a = ap.parse_args()
    load_before = os.getloadavg()
    out = {"machine": machine(), "settings": {"steps": a.steps, "mib": a.mib},
           "guard": [guard_cost(n, a.steps) for n in ("zero2.json", "zero0.json")],
           "hashing": hash_cost(a.mib), "save": save_cost(a.save_preset, a.saves)}
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
    sv = out["save"]
    print(f"checkpoint save ({sv['preset']} model, {sv['checkpoint_mib']:.0f} MiB): "
          f"{sv['save_s_median']:.2f} s with hashing, {sv['save_without_hashing_s_median']:.2f} s "
          f"without (x{sv['ratio_with_to_without']:.3f}); hashing {sv['hashing_s_median']:.2f} s = "
          f"{sv['hashing_fraction_of_save']:.1%} of the save")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
