"""ALUM's passes timed one by one, in one process on one CPU thread (no DeepSpeed, no ranks).

    python bench/bench_alum_passes.py [--preset small] [--vocab 8192] [--seq-len 128]
                                      [--micro-batch 8] [--steps 15]

Where an ALUM step's time goes against a plain step's, pass by pass: the clean forward, the
perturbed forward and its delta-only backward (the ascent), the adversarial forward, and the final
backward through both graphs; a plain step is the clean forward and its backward. The passes are
the ones ``AlumObjective`` runs (``alum_ds.model``'s embed/encode/head_at and
``alum_ds.adversarial``), written out here only to put a clock between them, with the trainer's
allocator policy and the model's CPU fast path. Median per pass over ``--steps`` steps, plain and
ALUM steps interleaved.

Then the CPU fast path against the stock model (``build_model`` without ``cpu_fastpath.install``, same
weights): whole ``AlumObjective`` steps (forward and backward, plain and ALUM) of both models
interleaved step by step in this process, so machine drift hits both alike.

Saved to bench/results/alum_passes.json. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "alum_passes.json"))
    args = p.parse_args(argv)

    import torch

    from alum_ds import adversarial as A
    from alum_ds import cpu_fastpath
    from alum_ds import model as M
    from alum_ds.config import AlumConfig
    from alum_ds.host import keep_freed_memory
    from alum_ds.objective import cross_entropy

    keep_freed_memory()  # the trainer's policy under ZeRO-0/1/2
    torch.set_num_threads(1)  # one rank's share of the reference machine
    torch.manual_seed(0)
    mlm = cpu_fastpath.install(M.build_model(preset=args.preset, vocab_size=args.vocab,
                                             seq_len=args.seq_len, dropout=0.1)).train()  # as a CPU run
    cfg = AlumConfig()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.micro_batch, args.seq_len), generator=g)
    flat = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100).reshape(-1)
    positions = (flat != -100).nonzero().squeeze(1)
    targets = flat[positions]
    params = list(mlm.parameters())
    times: dict[str, list[float]] = {}

    def clock(name: str, t0: float) -> float:
        t = time.perf_counter()
        times.setdefault(name, []).append(t - t0)
        return t

    def run(h: torch.Tensor) -> torch.Tensor:
        return M.head_at(mlm, M.encode(mlm, h), positions)

    def step(alum: bool) -> None:
        pre = ("alum" if alum else "plain") + "/"
        t = time.perf_counter()
        h0 = M.embed(mlm, ids)
        clean = run(h0)
        target = A.Target.of(clean)
        loss = cross_entropy(clean, targets, target)
        t = clock(pre + "clean forward", t)
        if alum:
            delta = A.init_delta(h0, cfg.sigma).requires_grad_()
            kl = A.kl_to_target(target, run(A.add_perturbation(h0.detach(), delta)))
            t = clock(pre + "perturbed forward", t)
            (grad,) = torch.autograd.grad(kl / kl.detach().abs().clamp_min(1e-8), delta)
            t = clock(pre + "ascent backward", t)
            with torch.no_grad():
                delta = A.project(delta + cfg.eta * A.normalize(grad, cfg.norm), cfg.epsilon,
                                  cfg.norm)
            adv = run(A.add_perturbation(h0.detach(), delta))
            loss = loss + cfg.alpha * A.symmetric_kl(clean, adv, target)
            t = clock(pre + "adversarial forward", t)
        loss.backward()
        clock(pre + ("final backward" if alum else "backward"), t)
        for q in params:
            q.grad = None

    for _ in range(3):  # warm-up
        step(False)
        step(True)
    times.clear()
    for _ in range(args.steps):
        step(False)
        step(True)
    med = {k: statistics.median(v) for k, v in times.items()}
    plain = sum(v for k, v in med.items() if k.startswith("plain/"))
    alum = sum(v for k, v in med.items() if k.startswith("alum/"))
    fwd, bwd = med["plain/clean forward"], med["plain/backward"]
    res = {"setting": vars(args) | {"threads": 1, "torch": torch.__version__},
           "median_s": med, "plain_s": plain, "alum_s": alum, "alum_vs_plain": alum / plain,
           "forward_vs_backward": fwd / bwd, "flop_model_alum_vs_plain": 8 / 3,
           "fast_path_vs_stock": fast_vs_stock(args, ids, flat.view(ids.shape))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    for k, v in med.items():
        print(f"{k:28s} {v * 1e3:7.1f} ms")
    print(f"plain {plain * 1e3:.1f} ms, ALUM {alum * 1e3:.1f} ms: {alum / plain:.2f}x "
          f"(FLOP model 2.67x); a forward costs {fwd / bwd:.2f} of a backward (FLOP model 0.5)")
    for k, v in res["fast_path_vs_stock"].items():
        print(f"fast path vs stock, {k}: " + ", ".join(f"{n} {x * 1e3:.1f} ms" if n != "speedup"
                                                       else f"{x:.3f}x" for n, x in v.items()))
    return 0


def fast_vs_stock(args: argparse.Namespace, ids, labels) -> dict[str, dict[str, float]]:
    """Median forward / backward / step seconds of whole objective steps, fast path and stock."""
    import torch

    from alum_ds import cpu_fastpath
    from alum_ds import model as M
    from alum_ds.config import AlumConfig
    from alum_ds.objective import AlumObjective

    objs = {}
    for name in ("fast", "stock"):
        torch.manual_seed(0)
        mlm = M.build_model(preset=args.preset, vocab_size=args.vocab, seq_len=args.seq_len,
                            dropout=0.1)
        if name == "fast":
            cpu_fastpath.install(mlm)
        objs[name] = AlumObjective(mlm, AlumConfig()).train()
    times: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for i in range(3 + args.steps):
        for name, obj in objs.items():
            for kind in ("plain", "alum"):
                t0 = time.perf_counter()
                loss, _ = obj(ids, labels, kind == "alum")
                t1 = time.perf_counter()
                loss.backward()
                t2 = time.perf_counter()
                obj.zero_grad(set_to_none=True)
                if i >= 3:  # after warm-up
                    times.setdefault((kind, name), []).append((t1 - t0, t2 - t1))
    out: dict[str, dict[str, float]] = {}
    for (kind, name), v in times.items():
        out.setdefault(kind, {}).update({
            f"{name}_forward_s": statistics.median(f for f, _ in v),
            f"{name}_backward_s": statistics.median(b for _, b in v),
            f"{name}_step_s": statistics.median(f + b for f, b in v)})
    for d in out.values():
        d["speedup"] = d["stock_step_s"] / d["fast_step_s"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
