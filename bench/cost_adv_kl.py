"""What the held-out smoothness measure costs next to a training step, at the main job's shapes.

    python bench/cost_adv_kl.py

One thread, one process: a plain MLM forward+backward on one micro-batch of the main job (tiny
preset, 32 sequences of 32 tokens, its masking rate) against the smoothness measure on the same
batch at r = epsilon and 3 epsilon with the eval.adv_kl_steps default, interleaved, medians of
10 after 2 warm-up rounds. Prints the ratio; nothing is saved or asserted.
"""

from __future__ import annotations

import statistics
import time

import torch

from alum_ds import cpu_fastpath
from alum_ds import model as M
from alum_ds.config import AlumConfig, RunConfig
from alum_ds.objective import AlumObjective


def main() -> None:
    torch.set_num_threads(1)
    cfg = RunConfig()
    vocab, seq, b = cfg.data.vocab_size, cfg.data.seq_len, cfg.schedule.micro_batch_size
    torch.manual_seed(0)
    m = M.build_model(preset=cfg.model.preset, vocab_size=vocab, seq_len=seq, dropout=0.0)
    cpu_fastpath.install(m)
    obj = AlumObjective(m, AlumConfig())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (b, seq), generator=g)
    sel = torch.rand(b, seq, generator=g) < cfg.masking.prob
    sel[:, 1] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    ids = torch.where(sel, torch.full_like(ids, 4), ids)
    eps = cfg.alum.epsilon

    def plain() -> None:
        obj.train()
        loss, _ = obj(ids, labels, False, None)
        loss.backward()

    def adv() -> None:
        obj.eval()
        obj(ids, labels, mode="adv_kl", radii=(eps, 3 * eps), steps=cfg.eval.adv_kl_steps)
        obj.train()

    ts: dict[str, list[float]] = {"plain": [], "adv": []}
    for _ in range(12):
        for name, fn in (("plain", plain), ("adv", adv)):
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    p, a = statistics.median(ts["plain"][2:]), statistics.median(ts["adv"][2:])
    print(f"plain forward+backward {p * 1e3:.1f} ms; smoothness measure on the same batch "
          f"{a * 1e3:.1f} ms: {a / p:.2f} plain steps' worth")


if __name__ == "__main__":
    main()
