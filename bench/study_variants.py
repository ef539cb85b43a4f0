"""Which cheaper ALUM variants keep what ALUM buys? Cost against effect, paired over seeds.

    python bench/study_variants.py [--seeds 6] [--workers 2] [--scale cpu|smoke|gpu]

For each seed a plain-MLM prefix is trained once; every arm branches from its checkpoint
(``run.branch_from``) and trains the same remaining steps on the same data in the same order:

- ``plain``: masked-LM only; ``alum``: exact ALUM (K = 1, the paper's defaults);
- ``every4``: the adversarial term on every 4th optimizer step (``alum.every_k_steps=4``);
- ``every4_lazy``: the same at 4x alpha, lazy regularization's rescaling (Karras et al. 2020);
- ``rows25``: the adversarial passes on a quarter of each micro-batch's sequences
  (``alum.row_fraction=0.25``);
- ``table``: the warm-started free perturbation, no ascent pass (``alum.perturbation=table``);
- ``table_rows50``: the table with the perturbed pass on half the sequences.

Per arm, from the run itself: the clean MLM eval loss and the held-out adversarial smoothness
at r = epsilon and 3 epsilon (the trainer's final evaluation, ``eval_adv_kl_eps`` /
``eval_adv_kl_3eps``, on ``--adv-kl-sequences`` held-out sequences), the step cost relative to
plain (median of the ALUM phase's logged step times over the same seed's plain median: the arms
of a seed run side by side on the same machine), and the MLM loss under a PGD attack at two
radii (bench/experiment_mini_alum.py's measure). Comparisons are paired per seed against plain
(bench/_stats.py: exact percentile bootstrap over seeds, sign-flip test), and for each variant
the share of exact ALUM's reduction of the smoothness it keeps: mean(plain - variant) /
mean(plain - alum) with its bootstrap interval. Writes ``bench/results/study_variants.json``,
``.md`` and ``.png`` (cost against kept share, the Pareto front); nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from _stats import paired_bootstrap, paired_ratio_bootstrap
from experiment_mini_alum import SCALES as MINI_SCALES
from experiment_mini_alum import _done, _finished, _worker_init, measure_job, pretrain_job

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"plain": ["--alum.enabled=false"], "alum": [], "every4": ["--alum.every_k_steps=4"],
        # Lazy regularization (Karras et al. 2020, StyleGAN2, sec. 3.1: R1 every 16th minibatch,
        # scaled by the interval): the term on every 4th step at 4x alpha, the same mean pull.
        "every4_lazy": ["--alum.every_k_steps=4", "--alum.alpha=40"],
        "rows25": ["--alum.row_fraction=0.25"], "table": ["--alum.perturbation=table"],
        "table_rows50": ["--alum.perturbation=table", "--alum.row_fraction=0.5"]}
COST_AS = {"every4_lazy": "every4"}  # alpha changes no compute: the same step costs
METRICS = ("adv_kl_eps", "adv_kl_3eps", "eval_loss", "pgd_loss_r1", "pgd_loss_r2", "cost")
GOAL = {"cost_max": 1.5, "kept_min": 0.8, "kept_lo_above": 0.5}
SCALES = {
    # The main job's recipe (tiny preset, seq 32, vocabulary 2,048, 40% masking, lr 2e-3, no
    # dropout) at micro-batch 16 on one rank, sized for a 2-core machine shared with other jobs
    # (about 40 minutes for 6 seeds there). ALUM from step 200 of 260: 23% of training, against
    # the 10% of the paper's curriculum and of bench/experiment_mini_alum.py. No dropout and
    # the same data order make the arms of a seed differ by the regulariser alone, and the
    # smoothness is the very quantity alpha x symKL penalises, so a small effect is consistent
    # across seeds where the MLM loss under PGD (150 ALUM steps there) was not.
    "cpu": {"steps": 260, "start": 200, "overrides": ["--schedule.micro_batch_size=16"]},
    "smoke": {"steps": 12, "start": 8, "overrides": ["--schedule.micro_batch_size=8",
                                                     "--schedule.warmup_steps=2"]},  # plumbing only
    # The base preset's recipe of the ALUM study, ALUM from 60% of training.
    "gpu": {"steps": 20000, "start": 12000, "overrides": MINI_SCALES["gpu"]["overrides"]},
}


def run_figures(run_dir: Path, start: int) -> dict:
    """The run's final eval record and the median step time of its ALUM phase."""
    from alum_ds import records  # metrics.jsonl: a non-finite value is null, named
    recs = [records.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in recs if "eval_loss" in r][-1]
    times = [r["step_time_s"] for r in recs if "step_time_s" in r and r["step"] > start]
    return {"eval_loss": final["eval_loss"], "adv_kl_eps": final["eval_adv_kl_eps"],
            "adv_kl_3eps": final["eval_adv_kl_3eps"], "step_time_s": statistics.median(times)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=6, help="pretraining seeds (6: the fewest at which "
                   "the sign-flip test can reach p < 0.05)")
    p.add_argument("--scale", choices=tuple(SCALES), default="cpu")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--radius", type=float, default=0.0,
                   help="alum.eta = alum.epsilon of every arm (the smoothness is measured at it and "
                   "3x); 0: the run-config default (1e-3)")
    p.add_argument("--alum-from", type=int, default=0, metavar="STEP",
                   help="the arms branch from the plain prefix at this step (0: the scale's)")
    p.add_argument("--adv-kl-sequences", type=int, default=128)
    p.add_argument("--mlm-radii", default="0.01,0.03")
    p.add_argument("--pgd-steps", type=int, default=5)
    p.add_argument("--pgd-sequences", type=int, default=64)
    p.add_argument("--cache-dir", default="")
    p.add_argument("--work", default="", help="keep the runs here (a kept folder continues)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "study_variants.json"))
    p.add_argument("--from-json", default="", metavar="PATH", help="re-summarise a saved results file")
    p.add_argument("--bench-json", default="", metavar="PATH",
                   help="bench/bench_alum.py's results: its interleaved step costs are charted "
                   "and tabled beside the study's own")
    a = p.parse_args()
    if a.from_json:
        saved = json.loads(Path(a.from_json).read_text())
        write(summarise(saved["runs"], saved["seeds"], saved["settings"], saved["seconds"],
                        bench_costs(a.bench_json)), Path(a.out))
        return 0
    scale = dict(SCALES[a.scale])
    if a.alum_from:
        if not 0 < a.alum_from < scale["steps"]:
            p.error(f"--alum-from {a.alum_from}: expected a step in 1..{scale['steps'] - 1}")
        scale["start"] = a.alum_from
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="alum_study_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = a.cache_dir or os.environ.get("ALUM_DS_CACHE", str(Path.home() / ".cache" / "alum_ds"))
    threads = max(1, (os.cpu_count() or 1) // a.workers)
    t0 = time.time()
    common = [*scale["overrides"], f"--schedule.steps={scale['steps']}", f"--data.cache_dir={cache}",
              "--logging.every=10", "--logging.tensorboard=false", "--eval.fill_mask=0",
              "--checkpoint.keep=1", f"--eval.adv_kl_sequences={a.adv_kl_sequences}"]
    seeds = list(range(1, a.seeds + 1))
    radii = [float(r) for r in a.mlm_radii.split(",")]

    def run_dir(seed: int, arm: str) -> Path:
        return work / f"s{seed}-{arm}"

    runs: dict[str, dict] = {}
    try:
        with ProcessPoolExecutor(a.workers, initializer=_worker_init, initargs=(threads,)) as pool:
            prefix = {s: _done() if _finished(run_dir(s, "prefix"), scale["start"]) else
                      pool.submit(pretrain_job, [*common, f"--run.seed={s}", "--alum.enabled=false",
                                                 f"--run.stop_after={scale['start']}",
                                                 f"--run.dir={run_dir(s, 'prefix')}"], "zero2.json")
                      for s in seeds}
            arms = {}
            for s in seeds:
                prefix[s].result()
                print(f"seed {s}: plain prefix done ({time.time() - t0:.0f} s)", flush=True)
                tag = run_dir(s, "prefix") / "checkpoints" / f"step{scale['start']:08d}"
                for arm, flags in ARMS.items():
                    argv = [*common, f"--run.seed={s}", f"--run.dir={run_dir(s, arm)}",
                            f"--run.branch_from={tag}", *flags]
                    if a.radius:
                        argv += [f"--alum.eta={a.radius}", f"--alum.epsilon={a.radius}"]
                    if arm != "plain":
                        argv.append(f"--alum.start_step={scale['start']}")
                    arms[s, arm] = _done() if _finished(run_dir(s, arm), scale["steps"]) else \
                        pool.submit(pretrain_job, argv, "zero2.json")
            meas, key_of = {}, {f: k for k, f in arms.items()}
            for f in as_completed(key_of):
                f.result()
                s, arm = key_of[f]
                print(f"seed {s} {arm}: trained ({time.time() - t0:.0f} s)", flush=True)
                meas[s, arm] = pool.submit(measure_job, str(run_dir(s, arm)), radii, a.pgd_steps,
                                           a.pgd_sequences)
            for (s, arm), f in meas.items():
                m = f.result()
                runs[f"s{s}-{arm}"] = {**run_figures(run_dir(s, arm), scale["start"]),
                                       "pgd_loss_r1": m["pgd_loss_r1"], "pgd_loss_r2": m["pgd_loss_r2"]}
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    settings = {k: v for k, v in vars(a).items() if k not in ("work", "out", "from_json")}
    settings["scale_spec"] = scale
    write(summarise(runs, seeds, settings, time.time() - t0, bench_costs(a.bench_json)), Path(a.out))
    return 0


def bench_costs(path: str) -> dict[str, float]:
    """Each arm's step time over plain's from bench/bench_alum.py (interleaved in one engine)."""
    if not path:
        return {}
    ratios = json.loads(Path(path).read_text())["ratios"]
    out = {"plain": 1.0}
    out.update({arm: ratios[f"{arm}_vs_plain"] for arm in ARMS if f"{arm}_vs_plain" in ratios})
    out.update({arm: out[same] for arm, same in COST_AS.items() if same in out})
    return out


def summarise(runs: dict, seeds: list[int], settings: dict, seconds: float,
              bench: dict[str, float] | None = None) -> dict:
    # The arms every seed ran (a results file written before an arm existed re-summarises).
    arms = [a for a in ARMS if all(f"s{s}-{a}" in runs for s in seeds)]
    variants = _variants(arms)
    for s in seeds:
        plain_t = runs[f"s{s}-plain"]["step_time_s"]
        for arm in arms:
            runs[f"s{s}-{arm}"]["cost"] = runs[f"s{s}-{arm}"]["step_time_s"] / plain_t
    means = {arm: {m: statistics.mean(runs[f"s{s}-{arm}"][m] for s in seeds) for m in METRICS}
             for arm in arms}
    for arm in arms:
        means[arm]["cost_median"] = statistics.median(runs[f"s{s}-{arm}"]["cost"] for s in seeds)
    comparisons = {f"{m}/{arm}": paired_bootstrap([runs[f"s{s}-{arm}"][m] - runs[f"s{s}-plain"][m]
                                                   for s in seeds])
                   for arm in arms[1:] for m in METRICS if m != "cost"}
    kept = {}
    for r in ("adv_kl_eps", "adv_kl_3eps"):
        ref = [runs[f"s{s}-plain"][r] - runs[f"s{s}-alum"][r] for s in seeds]
        for arm in variants:
            red = [runs[f"s{s}-plain"][r] - runs[f"s{s}-{arm}"][r] for s in seeds]
            kept[f"{r}/{arm}"] = paired_ratio_bootstrap(red, ref)
    bench = bench or {}
    for arm in arms:
        if arm in bench:
            means[arm]["cost_bench"] = bench[arm]
    goal = {arm: bool(means[arm].get("cost_bench", means[arm]["cost_median"]) <= GOAL["cost_max"]
                      and kept[f"adv_kl_eps/{arm}"]["ratio"] >= GOAL["kept_min"]
                      and kept[f"adv_kl_eps/{arm}"]["lo"] > GOAL["kept_lo_above"]) for arm in variants}
    result = {"settings": settings, "seeds": seeds, "runs": runs, "means": means,
              "comparisons": comparisons, "kept": kept, "goal": GOAL, "meets_goal": goal,
              "seconds": round(seconds, 1)}
    result["markdown"] = markdown(result)
    return result


def _variants(arms: list[str]) -> list[str]:
    return [a for a in arms if a not in ("plain", "alum")]


def supported(c: dict) -> bool:
    return bool(c["excludes_zero"] and c["p_sign_flip"] < 0.05)


def _fmt(c: dict, scale: float = 1.0, digits: int = 3) -> str:
    mark = " *" if supported(c) else ""
    lo, hi = c["lo"] * scale, c["hi"] * scale
    return f"{c['mean'] * scale:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def _kept(k: dict) -> str:
    lo = "-inf" if k["lo"] == float("-inf") else f"{k['lo']:.0%}"
    return f"{k['ratio']:.0%} [{lo}, {k['hi']:.0%}]"


def markdown(r: dict) -> str:
    n = len(r["seeds"])
    means, comps, kept = r["means"], r["comparisons"], r["kept"]
    lines = [f"Means over {n} seeds (smoothness S_r: mean symmetric KL at the masked tokens under "
             "the strongest perturbation found, x 1e-6; losses in nats; cost: ALUM-phase step time "
             "over plain's, median over seeds):", "",
             "| arm | cost x plain | S_eps (1e-6) | S_3eps (1e-6) | MLM eval loss | PGD r1 | PGD r2 |",
             "|---|---|---|---|---|---|---|"]
    for arm, m in means.items():
        lines.append(f"| {arm} | {m['cost_median']:.2f} | {m['adv_kl_eps'] * 1e6:.3f} | "
                     f"{m['adv_kl_3eps'] * 1e6:.3f} | {m['eval_loss']:.4f} | {m['pgd_loss_r1']:.4f} | "
                     f"{m['pgd_loss_r2']:.4f} |")
    lines += ["", f"Paired difference against plain, mean [95% bootstrap interval over {n} seeds]; "
              "* the interval excludes 0 and the sign-flip test gives p < 0.05:", "",
              "| arm | S_eps (1e-6) | S_3eps (1e-6) | MLM eval loss | PGD r1 | PGD r2 |",
              "|---|---|---|---|---|---|"]
    for arm in list(means)[1:]:
        lines.append(f"| {arm} | {_fmt(comps[f'adv_kl_eps/{arm}'], 1e6)} | "
                     f"{_fmt(comps[f'adv_kl_3eps/{arm}'], 1e6)} | {_fmt(comps[f'eval_loss/{arm}'], 1, 4)} | "
                     f"{_fmt(comps[f'pgd_loss_r1/{arm}'], 1, 4)} | "
                     f"{_fmt(comps[f'pgd_loss_r2/{arm}'], 1, 4)} |")
    lines += ["", "Share of exact ALUM's reduction of the smoothness each variant keeps, "
              "mean(plain - variant) / mean(plain - alum) [95% bootstrap interval]; goal: cost <= "
              f"{GOAL['cost_max']}x plain, share >= {GOAL['kept_min']:.0%} with the interval above "
              f"{GOAL['kept_lo_above']:.0%}:", "",
              "| variant | cost x plain (study) | cost x plain (bench_alum, interleaved; the goal's) "
              "| kept at eps | kept at 3 eps | meets the goal |",
              "|---|---|---|---|---|---|"]
    for arm in _variants(list(means)):
        cb = means[arm].get("cost_bench")
        lines.append(f"| {arm} | {means[arm]['cost_median']:.2f} | {'-' if cb is None else f'{cb:.2f}'} | "
                     f"{_kept(kept[f'adv_kl_eps/{arm}'])} | "
                     f"{_kept(kept[f'adv_kl_3eps/{arm}'])} | {'yes' if r['meets_goal'][arm] else 'no'} |")
    return "\n".join(lines)


def pareto(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points no other point beats on both cost (lower) and kept share (higher)."""
    return sorted((p for p in points if not any(q[1] <= p[1] and q[2] >= p[2] and q != p
                                                for q in points)), key=lambda p: p[1])


def chart(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cost(arm: str) -> float:
        m = r["means"][arm]
        return m.get("cost_bench", m["cost_median"])

    pts = [("plain", 1.0, 0.0), ("alum", cost("alum"), 1.0)]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for arm in _variants(list(r["means"])):
        k = r["kept"][f"adv_kl_eps/{arm}"]
        c = cost(arm)
        if not math.isfinite(k["ratio"]):
            continue  # no reference effect to keep a share of
        lo, hi = min(max(k["lo"], -0.5), k["ratio"]), max(k["hi"], k["ratio"])  # -inf drawn at -0.5
        ax.errorbar(c, k["ratio"], yerr=[[k["ratio"] - lo], [hi - k["ratio"]]], fmt="o", capsize=3)
        ax.annotate(arm, (c, k["ratio"]), textcoords="offset points", xytext=(6, 4))
        pts.append((arm, c, k["ratio"]))
    for name, c, y in pts[:2]:
        ax.plot(c, y, "ks")
        ax.annotate(name, (c, y), textcoords="offset points", xytext=(6, 4))
    front = pareto(pts)
    ax.plot([p[1] for p in front], [p[2] for p in front], "k--", lw=0.8, label="Pareto front")
    ax.axvline(GOAL["cost_max"], color="C3", lw=0.8)
    ax.axhline(GOAL["kept_min"], color="C3", lw=0.8, label="goal: cost <= 1.5x, kept >= 80%")
    bench = "cost_bench" in r["means"]["alum"]
    ax.set_xlabel("step cost, x plain MLM (" + ("bench/bench_alum.py, interleaved in one engine" if bench
                                               else "median over seeds") + ")")
    ax.set_ylabel("share of exact ALUM's reduction of S_eps kept")
    ax.set_title(f"cheaper ALUM variants: cost against effect ({len(r['seeds'])} seeds, 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(result["markdown"] + "\n")
    chart(result, out.with_suffix(".png"))
    print("\n" + result["markdown"])
    print(f"\n{result['seconds'] / 60:.1f} minutes; wrote {out}, {out.with_suffix('.md')}, "
          f"{out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
