"""The GPU checks in one prepared script: base and large presets, bf16 and fp16, plain MLM and ALUM,
eager and compiled; tokens/s and MFU per case (goal: large, plain, 45% MFU).

    python bench/gpu_suite.py [--budget 450] [--out bench/results/gpu.json]

Runs ``bench/bench_alum.py`` once per (preset, precision) on one GPU (``--ranks``, default 1),
each with the variants plain, alum and, with compile, plain_compiled and alum_compiled (one
model, engine and optimizer per case; eager variants under ``force_eager``). Cases run in order of
priority and a case is skipped, and said so, when the time left under ``--budget`` seconds is less
than its estimate (a device session has minutes). ALUM in 16-bit uses eta = epsilon = 1e-2 (the
precision guard: 1e-3 rounds away in bf16). MFU = tokens/s x FLOPs per token x forward-equivalents
/ 3 / the GPU's peak (``alum_ds.metrics``: 989 TFLOP/s dense bf16/fp16 for H100/H200). Saved to
``--out``; nothing is asserted. On a machine without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (preset, precision, seq_len, micro_batch, compile, estimated seconds): the goal's case first.
CASES = [
    ("large", "bf16", 512, 16, True, 150),
    ("base", "bf16", 512, 32, True, 110),
    ("large", "fp16", 512, 16, False, 60),
    ("base", "fp16", 512, 32, False, 50),
]


def ds_config(precision: str, folder: Path) -> Path:
    ds = {"zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
          precision: {"enabled": True, **({"loss_scale": 0, "initial_scale_power": 16}
                                          if precision == "fp16" else {})}}
    path = folder / f"zero2_{precision}.json"
    path.write_text(json.dumps(ds))
    return path


def mfu(res: dict, variant: str, preset: str, seq_len: int, micro_batch: int, ranks: int) -> dict:
    import torch

    from alum_ds.metrics import flops_per_token, forward_equivalents, peak_flops
    from alum_ds.model import build_model, non_embedding_params

    with torch.device("meta"):
        m = build_model(preset=preset, vocab_size=res["setting"]["vocab"], seq_len=seq_len, dropout=0.0)
    fpt = flops_per_token(non_embedding_params(m), m.config.num_hidden_layers, m.config.hidden_size, seq_len)
    step = res["variants"][variant]["step_s"]
    tps = micro_batch * seq_len * ranks / step
    passes = forward_equivalents(not variant.startswith("plain"), 1)
    peak = peak_flops(torch.cuda.get_device_name()) * ranks
    return {"step_s": step, "tokens_per_s": tps, "mfu": tps * fpt * passes / 3.0 / peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=450, help="seconds for all cases together")
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu.json"))
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device here; nothing run (bench/gpu_suite.py is for a GPU machine)")
        return 0
    t0 = time.time()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cases": [],
                 "skipped": [], "goal": {"large_plain_mfu": 0.45}}
    with tempfile.TemporaryDirectory() as tmp:
        for preset, precision, seq_len, mb, compile_, estimate in CASES:
            name = f"{preset}-{precision}{'-compiled' if compile_ else ''}"
            left = a.budget - (time.time() - t0)
            if left < estimate:
                out["skipped"].append({"case": name, "seconds_left": round(left), "estimate": estimate})
                continue
            raw = Path(tmp) / f"{name}.json"
            variants = "plain,alum"
            cmd = [sys.executable, str(ROOT / "bench" / "bench_alum.py"), f"--preset={preset}",
                   f"--ds={ds_config(precision, Path(tmp))}", f"--ranks={a.ranks}", f"--seq-len={seq_len}",
                   f"--micro-batch={mb}", f"--steps={a.steps}", "--warmup=3", "--mem-steps=1",
                   f"--variants={variants}", "--vocab=50265", f"--out={raw}",
                   *(["--compile"] if compile_ else [])]
            start = time.time()
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(60, left))
            case = {"case": name, "seconds": round(time.time() - start, 1), "returncode": r.returncode}
            if r.returncode == 0:
                res = json.loads(raw.read_text())
                case["setting"] = res["setting"]
                case["variants"] = {v: mfu(res, v, preset, seq_len, mb, a.ranks) for v in res["variants"]}
                case["ratios"] = res["ratios"]
            else:
                case["error"] = (r.stdout + r.stderr)[-3000:]
            out["cases"].append(case)
            print(json.dumps(case)[:2000], flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"gpu_suite: {len(out['cases'])} case(s), {len(out['skipped'])} skipped, {out['seconds']} s; "
          f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
