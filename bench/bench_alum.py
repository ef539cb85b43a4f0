"""ALUM step cost in one script: plain MLM, this project's ALUM (unfused and fused first pass) and a
straightforward ALUM baseline, on the same model, batch and DeepSpeed engine.

    python bench/bench_alum.py [--quick] [--preset small] [--seq-len 128] [--micro-batch 8]
                               [--ranks 2] [--ds ds_configs/zero2.json] [--steps 20]

The script launches itself through DeepSpeed's runner (``--ranks`` ranks: CPU processes on a
CPU-only machine, one per GPU otherwise) with a random ``--master_port`` unless one is given.
Every rank builds the same model and wraps one module in one engine; each measured step is a
full training step (forward, ``engine.backward``, ``engine.step``) of one variant, the variants
interleaved step by step so that load drift on a shared machine hits them alike:

- ``plain``: masked-LM loss only (``AlumObjective`` with ALUM off).
- ``alum``: this project's ALUM step, K = 1 (masked-only head and KL, delta-only ascent).
- ``alum_fused``: the same with ``alum.fused_first_pass`` (clean + first perturbed pass batched).
- ``plain_compiled``, ``alum_compiled`` (with ``--compile``): ``plain`` and ``alum`` with the
  model's pieces compiled (``alum_ds.compiling``: each encoder layer, the embeddings, the head;
  the ascent with frozen parameters). One model, engine and optimizer for all: the eager variants
  run under ``torch.compiler.set_stance("force_eager")``. Compile time is reported on its own.
- ``baseline``: ALUM written the straightforward way, as the published code does: full-vocabulary
  logits at every position, an ascent gradient taken w.r.t. delta *and* every parameter (then
  discarded; through the wrapped module, so ZeRO's hooks do not fire), the symmetric KL over
  all positions. Needs ZeRO <= 2 (the parameters must be whole); skipped under ZeRO-3.

Reported per variant (rank 0): median step time with its forward / backward / optimizer-step
parts, and memory:

- ``peak_mb``: the process's peak during a full engine step (model, optimizer state, the
  engine's buffers: the same for every variant);
- ``peak_growth_mb``: that peak minus the level before the step (activations, logits, KLs and
  transients); the memory goal (ALUM <= 0.5 x baseline) is judged on this;
- ``objective_peak_growth_mb``: the same for the variant's forward and backward alone, outside
  the engine (gradients by ``torch.autograd.grad``, so ZeRO's hooks stay out of it): a check
  that the engine adds nothing variant-specific.

On a GPU memory is ``torch.cuda.max_memory_allocated``. On the CPU it is the process's RSS
high-water mark (reset through ``/proc/self/clear_refs`` before each step), measured in a second
launch with ``MALLOC_MMAP_THRESHOLD_=65536``: glibc then returns every freed block of 64 KiB or
more to the kernel, so the RSS follows what torch holds (checked against torch's profiler memory
timeline: equal to the MB). With glibc's defaults freed blocks mostly stay in the process and a
step's RSS growth reads ~0; the timed launch uses the trainer's allocator policy instead
(``alum_ds.runtime.tune_host``: freed memory kept for the next step under ZeRO-0/1/2).
``--quick`` does both in one launch (its timings are only a smoke test).

Saved to bench/results/alum.json (or ``--out``) and printed as a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("plain", "alum", "alum_fused", "rows25", "table", "table_rows50", "baseline")
# The cheaper variants (docs/ALUM.md, "Cheaper variants") as the alum settings each step uses.
# ``every4`` (alum.every_k_steps=4) is not a step of its own: its cost per step is derived from
# the measured ones, one ALUM step and three plain steps in four.
VARIANT_ALUM = {"rows25": {"row_fraction": 0.25}, "table": {"perturbation": "table"},
                "table_rows50": {"perturbation": "table", "row_fraction": 0.5}}
EVERY_K = 4
GOALS = {"alum_vs_plain_max": 2.2, "alum_vs_baseline_time_max": 0.6, "alum_vs_baseline_memory_max": 0.5}
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, short sequences, 2 timed steps, one launch")
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (the data default)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--ds", default="ds_configs/zero2.json")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--mem-steps", type=int, default=2, help="memory steps per variant")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--compile", action="store_true",
                   help="add plain_compiled and alum_compiled (torch.compile of the model's pieces)")
    p.add_argument("--master_port", type=int, default=0, help="0: a random port")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "alum.json"))
    p.add_argument("--phase", choices=("all", "time", "memory"), default="all", help=argparse.SUPPRESS)
    p.add_argument("--raw", default="", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.seq_len, a.micro_batch, a.vocab = "tiny", 32, 4, 1024
        a.steps, a.warmup, a.mem_steps = 2, 1, 1
    return a


# ------------------------------------------------------------------ the launcher side


def launch(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    load0 = os.getloadavg()
    busy = busy_processes()
    phases = ["all"] if args.quick else ["time", "memory"]
    raw: dict = {}
    for phase in phases:
        raw_path = out.with_name(out.name + f".{phase}.raw")
        opts = [f"--preset={args.preset}", f"--vocab={args.vocab}", f"--seq-len={args.seq_len}",
                f"--micro-batch={args.micro_batch}", f"--ranks={args.ranks}", f"--ds={args.ds}",
                f"--steps={args.steps}", f"--warmup={args.warmup}", f"--mem-steps={args.mem_steps}",
                f"--variants={args.variants}", f"--phase={phase}", f"--raw={raw_path}",
                *(["--compile"] if args.compile else [])]
        port = args.master_port or random.randint(20000, 45000)
        cmd = [sys.executable, "-u", "-c", "from deepspeed.launcher.runner import main; main()",
               f"--num_gpus={args.ranks}", f"--master_port={port}", str(Path(__file__).resolve()),
               *opts]
        env = {**os.environ, "ALUM_BENCH_RANK": "1", "PYTHONUNBUFFERED": "1",
               **(MMAP_ENV if phase != "time" else {})}
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write((r.stdout + r.stderr)[-6000:])
            return r.returncode
        part = json.loads(raw_path.read_text())
        raw_path.unlink()
        for key, value in part.items():
            if key == "variants":
                for v, fields in value.items():
                    raw.setdefault("variants", {}).setdefault(v, {}).update(fields)
            else:
                raw.setdefault(key, value)
    res = summarise(raw, quick=args.quick)
    res["load_avg_1m"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
    res["busy_processes_at_start"] = busy
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))
    return 0


def summarise(raw: dict, *, quick: bool) -> dict:
    from alum_ds.metrics import forward_equivalents

    vs = raw["variants"]
    plain = vs["plain"]
    flop = forward_equivalents(True, raw["setting"]["alum"]["ascent_steps"]) / forward_equivalents(False, 1)
    ratios: dict[str, float] = {}
    for v in ("alum", "alum_fused", "baseline"):
        if v in vs:
            ratios[f"{v}_vs_plain"] = vs[v]["step_s"] / plain["step_s"]
            ratios[f"{v}_compute_vs_plain"] = ((vs[v]["forward_s"] + vs[v]["backward_s"])
                                               / (plain["forward_s"] + plain["backward_s"]))
    if "baseline" in vs:
        base = vs["baseline"]
        for v in ("alum", "alum_fused"):
            if v in vs:
                ratios[f"{v}_vs_baseline_time"] = vs[v]["step_s"] / base["step_s"]
                ratios[f"{v}_vs_baseline_memory"] = vs[v]["peak_growth_mb"] / base["peak_growth_mb"]
                ratios[f"{v}_vs_baseline_objective_memory"] = (vs[v]["objective_peak_growth_mb"]
                                                               / base["objective_peak_growth_mb"])
                ratios[f"{v}_vs_baseline_peak_memory"] = vs[v]["peak_mb"] / base["peak_mb"]
    if "plain_compiled" in vs:
        ratios["plain_compiled_vs_plain"] = vs["plain_compiled"]["step_s"] / plain["step_s"]
        ratios["alum_compiled_vs_alum"] = vs["alum_compiled"]["step_s"] / vs["alum"]["step_s"]
        ratios["alum_compiled_vs_plain_compiled"] = (vs["alum_compiled"]["step_s"]
                                                     / vs["plain_compiled"]["step_s"])
    for v in VARIANT_ALUM:
        if v in vs:
            ratios[f"{v}_vs_plain"] = vs[v]["step_s"] / plain["step_s"]
    if "alum" in vs:
        # alum.every_k_steps=4: one ALUM step and three plain ones in every four
        ratios[f"every{EVERY_K}_vs_plain"] = (vs["alum"]["step_s"] + (EVERY_K - 1) * plain["step_s"]) \
            / EVERY_K / plain["step_s"]
    utilisation = flop_utilisation(vs, raw["setting"])
    if "alum" in vs:
        ratios["alum_vs_flop_model"] = ratios["alum_vs_plain"] / flop
        ratios["alum_compute_vs_flop_model"] = ratios["alum_compute_vs_plain"] / flop
    return {
        "setting": {**raw["setting"], "quick": quick},
        "variants": vs,
        "flop_model": {
            "plain_forward_equivalents": forward_equivalents(False, 1),
            "alum_forward_equivalents": forward_equivalents(True, raw["setting"]["alum"]["ascent_steps"]),
            "alum_vs_plain": flop,
            # Fused: the ascent's backward (1) and the clean backward (2) run over the doubled
            # batch, whose perturbed half contributes zeros: 3 more forward-equivalents.
            "alum_fused_vs_plain": (flop * 3 + 3) / 3,
        },
        "ratios": ratios,
        "flops": utilisation,
        "goals": GOALS,
    }


def model_passes(variant: str, ascent_steps: int) -> float:
    """Forward-equivalents of a variant's step in the FLOP model (metrics.forward_equivalents):
    plain 3; ALUM 3 + 2K + 3; the adversarial passes of ``row_fraction`` f scaled by f; the
    table: a perturbed forward and its full backward (3), no ascent."""
    from alum_ds.metrics import forward_equivalents

    alum = forward_equivalents(True, ascent_steps) - 3
    if variant.startswith("plain"):
        return 3.0
    if variant == f"every{EVERY_K}":
        return 3.0 + alum / EVERY_K
    settings = VARIANT_ALUM.get(variant, {})
    extra = 3.0 if settings.get("perturbation") == "table" else alum
    return 3.0 + settings.get("row_fraction", 1.0) * extra


def flop_utilisation(vs: dict, setting: dict) -> dict:
    """Per variant (per rank and step): the hardware FLOPs counted, the model FLOPs (the FLOP
    model's 6N + 12 L h s per token per 3 forward-equivalents, times the variant's passes), and
    both achieved rates as a fraction of the GEMM rate this machine reached at the step's own
    matrix shapes in the same run (``gemm_seconds``)."""
    tokens = setting["micro_batch"] * setting["seq_len"]
    fpt = setting["flops_per_token"]
    out = {}
    rows = {v: vs[v] for v in vs if "hardware_flops" in vs[v]}
    if "alum" in rows and "plain" in rows:  # every4 from its parts, as its step time
        a, p = rows["alum"], rows["plain"]
        rows[f"every{EVERY_K}"] = {
            "step_s": (a["step_s"] + (EVERY_K - 1) * p["step_s"]) / EVERY_K,
            **{k: (a[k] + (EVERY_K - 1) * p[k]) / EVERY_K
               for k in ("hardware_flops", "gemm_flops", "gemm_limit_s")}}
    for v, r in rows.items():
        gemm_rate = r["gemm_flops"] / r["gemm_limit_s"]
        model = tokens * fpt * model_passes(v, setting["alum"]["ascent_steps"]) / 3
        out[v] = {"hardware_flops": r["hardware_flops"], "model_flops": model,
                  "hardware_vs_plain_model": r["hardware_flops"] / (tokens * fpt),
                  "gemm_rate_flops_per_s": gemm_rate,
                  "hardware_fraction_of_gemm_rate": r["hardware_flops"] / r["step_s"] / gemm_rate,
                  "model_fraction_of_gemm_rate": model / r["step_s"] / gemm_rate}
    return out


def busy_processes(interval: float = 0.5) -> list[str]:
    """Other processes using >= 10% of a core when the benchmark starts (what else was running)."""
    try:
        import psutil
    except ImportError:
        return []
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.pid != os.getpid()]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(interval)
    out = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            if cpu >= 10:
                out.append(f"{cpu:.0f}% {' '.join(p.info['cmdline'] or [])[:100]}")
        except psutil.Error:
            pass
    return out


def table(res: dict) -> str:
    s = res["setting"]
    lines = [f"{s['device']}, {s['ranks']} ranks, ZeRO-{s['zero_stage']}, {s['precision']}, preset "
             f"{s['preset']}, seq {s['seq_len']}, micro-batch {s['micro_batch']}, median of "
             f"{s['steps']} steps (load avg {res['load_avg_1m'][0]} -> {res['load_avg_1m'][1]})",
             f"{'variant':<15} {'step s':>7} {'fwd s':>7} {'bwd s':>7} {'opt s':>7} {'x plain':>7} "
             f"{'peak MB':>8} {'+step MB':>8} {'+obj MB':>8}"]
    plain = res["variants"]["plain"]["step_s"]
    for name, v in res["variants"].items():
        lines.append(f"{name:<15} {v['step_s']:7.3f} {v['forward_s']:7.3f} {v['backward_s']:7.3f} "
                     f"{v['optimizer_s']:7.3f} {v['step_s'] / plain:7.2f} {v['peak_mb']:8.0f} "
                     f"{v['peak_growth_mb']:8.0f} {v['objective_peak_growth_mb']:8.0f}")
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in res["ratios"].items()))
    if res.get("flops"):
        lines.append(f"{'variant':<15} {'hw GFLOP':>9} {'model GFLOP':>11} {'hw/plain model':>14} "
                     f"{'GEMM GFLOP/s':>12} {'hw % GEMM':>9} {'model % GEMM':>12}")
        for name, f in res["flops"].items():
            lines.append(f"{name:<15} {f['hardware_flops'] / 1e9:9.2f} {f['model_flops'] / 1e9:11.2f} "
                         f"{f['hardware_vs_plain_model']:14.2f} {f['gemm_rate_flops_per_s'] / 1e9:12.1f} "
                         f"{f['hardware_fraction_of_gemm_rate']:9.0%} "
                         f"{f['model_fraction_of_gemm_rate']:12.0%}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the baseline


def baseline_loss(mlm, input_ids, labels, cfg):
    """Straightforward ALUM (the published code's shape): full-vocabulary logits everywhere, an
    ascent that also computes (and throws away) every parameter's gradient, the symmetric KL over
    all positions. The published max|g| + 1e-6 normalisation, projection onto the eps ball."""
    import torch
    import torch.nn.functional as F

    from alum_ds import model as M

    def kl_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        """KL(p || q) from logits in fp32 by plain autograd, as the published code computes it."""
        logp = F.log_softmax(p_logits.float(), dim=-1)
        logq = F.log_softmax(q_logits.float(), dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1).mean()

    V = mlm.config.vocab_size
    h0 = M.embed(mlm, input_ids)
    logits = mlm.lm_head(M.encode(mlm, h0)).reshape(-1, V)
    mlm_loss = F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=-100)
    delta = (torch.randn(h0.shape, device=h0.device) * cfg.sigma).requires_grad_()
    adv = mlm.lm_head(M.encode(mlm, h0.detach() + delta.to(h0.dtype))).reshape(-1, V)
    params = [p for p in mlm.parameters() if p.requires_grad]
    grads = torch.autograd.grad(kl_logits(logits.detach(), adv), [delta, *params], allow_unused=True)
    g = grads[0]
    del grads
    g = g / (g.abs().amax(-1, keepdim=True) + 1e-6)
    delta = (delta.detach() + cfg.eta * g).clamp(-cfg.epsilon, cfg.epsilon)
    adv = mlm.lm_head(M.encode(mlm, h0.detach() + delta.to(h0.dtype))).reshape(-1, V)
    sym = kl_logits(logits.detach(), adv) + kl_logits(adv.detach(), logits)
    return mlm_loss + cfg.alpha * sym


def bench_module(mlm, alum, any_rank, reduce_sum=lambda t: t):
    import contextlib

    import torch

    from alum_ds.objective import AlumObjective

    class BenchModule(torch.nn.Module):
        """One module for every variant, so they share parameters, engine and optimizer."""

        def __init__(self) -> None:
            super().__init__()
            self.objective = AlumObjective(mlm, alum, any_rank=any_rank, reduce_sum=reduce_sum)

        def forward(self, input_ids, labels, variant: str):
            compiled = variant.endswith("_compiled")
            eager = contextlib.nullcontext() if compiled else torch.compiler.set_stance("force_eager")
            with eager:
                if variant == "baseline":
                    return baseline_loss(self.objective.mlm, input_ids, labels, alum)
                alum.fused_first_pass = variant == "alum_fused"
                settings = VARIANT_ALUM.get(variant, {})
                alum.row_fraction = settings.get("row_fraction", 1.0)
                alum.perturbation = settings.get("perturbation", "adversarial")
                self.objective.freeze_ascent = compiled
                loss, _ = self.objective(input_ids, labels, not variant.startswith("plain"))
            return loss

    return BenchModule()


# ------------------------------------------------------------------ FLOPs and the GEMM limit


def flop_profile(fn) -> tuple[int, list[tuple[tuple, int]]]:
    """What ``fn()`` (one variant's forward and backward) executes: its total FLOPs as PyTorch's
    counter counts them (every matrix product of every pass, the head at the rows it really ran
    on) and each matrix product as ((op, shapes), FLOPs), for timing at the same shapes."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    ops = {aten.mm.default: "mm", aten.addmm.default: "addmm", aten.bmm.default: "bmm",
           aten.baddbmm.default: "baddbmm"}
    seen: list[tuple[str, tuple]] = []

    class Shapes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                seen.append((ops[func], tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    with FlopCounterMode(display=False) as fc, Shapes():
        fn()
    gemms = []
    for op, shapes in seen:
        a, b = shapes[-2], shapes[-1]  # addmm/baddbmm: (bias, a, b)
        batch = a[0] if op in ("bmm", "baddbmm") else 1
        m, k, n = a[-2], a[-1], b[-1]
        gemms.append(((op, (batch, m, k, n)), 2 * batch * m * k * n))
    return int(fc.get_total_flops()), gemms


def gemm_seconds(gemms: list[tuple[tuple, int]], on_gpu: bool, reps: int = 5) -> float:
    """The time the step's matrix products take alone on this machine (this rank's threads: one
    per rank on the CPU): each distinct shape timed as a plain matmul of random fp32 matrices,
    the median of ``reps``, summed over the step's products. The step's FLOPs over this time is
    the machine's GEMM rate at the step's own shapes: the limit a step of pure GEMMs reaches."""
    import torch

    dev = "cuda" if on_gpu else "cpu"
    cost: dict[tuple, float] = {}
    for key, _ in gemms:
        if key in cost:
            continue
        batch, m, k, n = key[1]
        x = torch.randn(batch, m, k, device=dev)
        y = torch.randn(batch, k, n, device=dev)
        ts = []
        for _ in range(reps + 1):
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.bmm(x, y) if batch > 1 else torch.mm(x[0], y[0])
            if on_gpu:
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        cost[key] = statistics.median(ts[1:])
    return sum(cost[key] for key, _ in gemms)


# ------------------------------------------------------------------ memory


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMeter:
    """Peak memory of ``fn()`` in MB: (peak, peak minus the level before)."""

    def __init__(self, on_gpu: bool) -> None:
        import torch

        self.torch = torch
        self.mode = "cuda.max_memory_allocated" if on_gpu else "rss_high_water_mark"

    def measure(self, fn) -> tuple[float, float]:
        torch = self.torch
        if self.mode.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return peak / 2**20, (peak - base) / 2**20
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = _status_kb("VmRSS")
        fn()
        peak = _status_kb("VmHWM")
        return peak / 1024, (peak - base) / 1024


# ------------------------------------------------------------------ the rank side


def rank_main(args: argparse.Namespace) -> None:
    import deepspeed
    import torch

    from alum_ds import compiling
    from alum_ds import distributed as D
    from alum_ds import runtime as R
    from alum_ds.config import AlumConfig, RunConfig, batching_for, cache_dir
    from alum_ds.ds_config import plan_ds
    from alum_ds.metrics import flops_per_token
    from alum_ds.model import build_model, non_embedding_params
    from alum_ds.optim import make_optimizer

    dev = R.detect()
    rt = R.start(dev)
    rank, world, device, on_gpu = rt.rank, rt.world, rt.device, rt.on_gpu
    if on_gpu:
        torch.cuda.set_device(device)
    cfg = RunConfig()
    cfg.schedule.micro_batch_size = args.micro_batch
    cfg.data.seq_len = args.seq_len
    cfg.schedule.warmup_steps = 0
    plan = plan_ds(str(ROOT / args.ds), cfg, batching_for(cfg, world),
                   bf16_supported=dev.bf16_supported, on_gpu=on_gpu)
    ds, stage, precision = plan.config, plan.zero_stage, plan.precision
    if not on_gpu and args.phase == "time":
        # The trainer's allocator policy; the memory phase keeps MALLOC_MMAP_THRESHOLD_ instead,
        # so that the RSS follows what torch holds.
        R.tune_host(rt, plan)
    alum = AlumConfig()
    if precision != "fp32":  # the default radius rounds away in 16-bit (the precision guard)
        alum.eta = alum.epsilon = 1e-2
    variants = [v for v in args.variants.split(",") if v]
    if stage == 3 and "baseline" in variants:
        variants.remove("baseline")  # parameter gradients w.r.t. partitioned parameters

    torch.manual_seed(0)
    mlm = R.adapt_model(rt, build_model(preset=args.preset, vocab_size=args.vocab,
                                        seq_len=args.seq_len, dropout=0.1))  # RoBERTa's
    if args.compile:
        if stage == 3:
            raise SystemExit("bench_alum --compile: not under ZeRO-3 (alum_ds.compiling refuses it)")
        compiling.use_cache(cache_dir() / "inductor")
        compiling.compile_model(mlm)
        variants += ["plain_compiled", "alum_compiled"]
    module = bench_module(mlm, alum, rt.any_rank(), lambda t: D.all_reduce(t, "sum"))
    opt = make_optimizer(list(module.named_parameters()), cfg.optim, ds, on_gpu)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=ds)
    engine.train()

    g = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(3, args.vocab, (args.micro_batch, args.seq_len), generator=g)
    sel = torch.rand(ids.shape, generator=g) < 0.15
    sel[:, 1] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100)).to(device)
    ids = torch.where(sel, torch.full_like(ids, 4), ids).to(device)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize()

    last_loss: dict[str, float] = {}

    def step(variant: str) -> tuple[float, float, float]:
        D.barrier()
        sync()
        t0 = time.perf_counter()
        loss = engine(ids, labels, variant)
        sync()
        t1 = time.perf_counter()
        engine.backward(loss)
        sync()
        t2 = time.perf_counter()
        engine.step()
        sync()
        t3 = time.perf_counter()
        last_loss[variant] = float(loss.detach())
        return t1 - t0, t2 - t1, t3 - t2

    def objective_only(variant: str) -> None:
        """The variant's forward and backward alone, outside the engine: gradients by
        torch.autograd.grad (no accumulation, so ZeRO's hooks and buckets stay out of it)."""
        loss = engine.module(ids, labels, variant)
        grads = torch.autograd.grad(loss, [p for p in engine.module.parameters() if p.requires_grad],
                                    allow_unused=True)
        del grads

    load0 = os.getloadavg()
    for _ in range(args.warmup):
        for v in variants:
            step(v)
    compile_s = compiling.compile_seconds() if args.compile else 0.0  # all in the warm-up
    out: dict[str, dict] = {v: {} for v in variants}
    if args.phase in ("all", "time"):
        times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        for i in range(args.steps):
            k = i % len(variants)
            for v in variants[k:] + variants[:k]:
                times[v].append(step(v))
        for v in variants:
            f, b, o = zip(*times[v])
            total = [sum(t) for t in times[v]]
            q = statistics.quantiles(total, n=4) if len(total) >= 2 else [total[0]] * 3
            out[v].update(step_s=statistics.median(total), forward_s=statistics.median(f),
                          backward_s=statistics.median(b), optimizer_s=statistics.median(o),
                          step_s_p25_p75=[q[0], q[2]], last_loss=last_loss[v])
    if args.phase in ("all", "time"):
        for v in variants:
            if v.endswith("_compiled"):
                continue
            hw, gemms = flop_profile(lambda v=v: objective_only(v))
            out[v].update(hardware_flops=hw, gemm_flops=sum(f for _, f in gemms),
                          gemm_limit_s=gemm_seconds(gemms, on_gpu))
    meter = PeakMeter(on_gpu)
    if args.phase in ("all", "memory"):
        mem = {v: [] for v in variants}
        obj_mem = {v: [] for v in variants}
        for _ in range(args.mem_steps):
            for v in variants:
                mem[v].append(meter.measure(lambda v=v: step(v)))
                D.barrier()
                obj_mem[v].append(meter.measure(lambda v=v: objective_only(v)))
        for v in variants:
            out[v].update(peak_mb=max(p for p, _ in mem[v]), peak_growth_mb=max(g_ for _, g_ in mem[v]),
                          objective_peak_growth_mb=max(g_ for _, g_ in obj_mem[v]))
    if rank != 0:
        return
    alum_settings = dataclasses.asdict(alum)
    for key in ("fused_first_pass", "row_fraction", "perturbation"):  # set per variant
        alum_settings.pop(key)
    raw = {
        "setting": {"device": torch.cuda.get_device_name() if on_gpu else f"cpu ({os.cpu_count()} cores)",
                    "ranks": world, "zero_stage": stage, "precision": precision, "preset": args.preset,
                    "vocab": args.vocab, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
                    "steps": args.steps, "warmup": args.warmup, "mem_steps": args.mem_steps,
                    "ds_config": args.ds, "alum": alum_settings, "memory_measure": meter.mode,
                    "flops_per_token": flops_per_token(non_embedding_params(mlm),
                                                       mlm.config.num_hidden_layers,
                                                       mlm.config.hidden_size, args.seq_len),
                    "compile_seconds_rank0": round(compile_s, 1),
                    "graphs_compiled_rank0": compiling.graphs_compiled() if args.compile else 0,
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__},
        f"load_avg_1m_{args.phase}": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "variants": out,
    }
    Path(args.raw).write_text(json.dumps(raw))


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if os.environ.get("ALUM_BENCH_RANK") and "RANK" in os.environ:
        rank_main(args)
        return 0
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
