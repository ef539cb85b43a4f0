"""bench/experiment_mini_alum.py's summary: paired per seed, and claims only what 6 seeds support."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import experiment_mini_alum as E  # noqa: E402


def _results(seeds: list[int]) -> tuple[dict, list[dict]]:
    """Per seed, plain's figures vary a lot between seeds; ALUM is 0.01 below plain's PGD r2 loss
    in every seed, the random arm's offset alternates in sign, K=2 matches plain exactly."""
    pre, ft = {}, []
    for s in seeds:
        base = {"eval_loss": 5.0 + 0.1 * s, "unigram_line": 6.4, "pgd_loss_r1": 5.5 + 0.1 * s,
                "pgd_loss_r2": 6.0 + 0.2 * s}
        pre[f"s{s}-plain"] = base
        pre[f"s{s}-alum"] = {**base, "pgd_loss_r2": base["pgd_loss_r2"] - 0.01}
        pre[f"s{s}-random"] = {**base, "pgd_loss_r2": base["pgd_loss_r2"] + (0.01 if s % 2 else -0.01)}
        pre[f"s{s}-alum_k2"] = dict(base)
        for arm in E.ARMS:
            for mode in ("plain", "alum"):
                ft.append({"seed": s, "arm": arm, "finetuning": mode, "ft_seed": 1,
                           **{m: 0.5 + 0.01 * s for m in E.FT_METRICS}})
    return pre, ft


def test_six_seeds_support_a_consistent_effect_and_not_an_alternating_one() -> None:
    seeds = list(range(1, 7))
    pre, ft = _results(seeds)
    a = argparse.Namespace(seeds=6, ft_seeds=1, scale="cpu", workers=2, finetune_steps=200,
                           ft_radii="0.01,0.02", mlm_radii="0.01,0.03", pgd_steps=5, cache_dir="")
    r = E.summarise(pre, ft, seeds, a, 60.0)
    alum = r["comparisons"]["pretrain/pgd_loss_r2/alum"]
    # The seed-to-seed spread of plain (0.2 per seed) cancels in the pairing: exactly -0.01.
    assert abs(alum["mean"] + 0.01) < 1e-9 and alum["hi"] < 0 and alum["p_sign_flip"] == 2 / 64
    assert E.supported(alum)
    rnd = r["comparisons"]["pretrain/pgd_loss_r2/random"]
    assert abs(rnd["mean"]) < 1e-9 and not rnd["excludes_zero"] and not E.supported(rnd)
    assert not E.supported(r["comparisons"]["pretrain/pgd_loss_r2/alum_k2"])  # no difference at all
    md = r["markdown"]
    assert "Primary comparison" in md and "-0.0100 [-0.0100, -0.0100] *, sign-flip p = 0.0312" in md
    assert f"The other {len(r['comparisons']) - 1} comparisons are secondary" in md


def test_three_seeds_never_claim() -> None:
    seeds = [1, 2, 3]
    pre, ft = _results(seeds)
    a = argparse.Namespace(seeds=3, ft_seeds=1, scale="cpu")
    alum = E.summarise(pre, ft, seeds, a, 1.0)["comparisons"]["pretrain/pgd_loss_r2/alum"]
    assert alum["excludes_zero"] and alum["p_sign_flip"] == 0.25 and not E.supported(alum)
