"""The fine-tuning run: check every input, start DeepSpeed, train, evaluate, save.

Everything that can be wrong with the inputs (model folder, tokenizer, files, columns, labels) is
checked before the process group and the engine start, so a mistake is a one-line error on every
rank rather than a hang or a traceback. The run folder receives ``metrics.jsonl`` (and
TensorBoard), ``results.json`` and ``model/`` (a Hugging Face folder that loads with
``AutoModelForSequenceClassification``). Fine-tuning runs are short and not resumable: running
again into the same folder replaces them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from alum_ds import distributed as D
from alum_ds import metrics as MT
from alum_ds.config import ConfigError, RunConfig
from alum_ds.data.shards import DataError
from alum_ds.finetune import data as FD
from alum_ds.finetune.evaluate import evaluate
from alum_ds.finetune.source import ModelSource, build_classifier, load_checked_tokenizer, resolve_source
from alum_ds.finetune.tasks import ensure_topic_task
from alum_ds.host import tune_allocator


@dataclass
class FinetuneOptions:
    """What to fine-tune on and how to evaluate (the ML settings are the run config's sections
    run, model.dropout, alum, optim, schedule and logging)."""

    checkpoint: str = "runs/default"
    tokenizer: str = ""
    train: str = ""
    """Training data; empty: the embedded topic task (generated into the cache on first use)."""
    validation: str = ""
    adv_eval: list[str] = field(default_factory=list)
    """Extra evaluation sets (ANLI-style adversarial files); accuracy on each is reported."""
    text_column: str = "text"
    text_pair_column: str = ""
    label_column: str = "label"
    labels: list[str] = field(default_factory=list)
    max_length: int = 128
    cache_dir: str = ""
    robust_radius: list[float] = field(default_factory=lambda: [0.02])
    pgd_steps: int = 5
    eval_every: int = 0
    eval_batch: int = 64
    save_model: bool = True


# Per-micro-step statistics summed over a logging window (then over ranks), in this order.
WINDOW = ("ce_loss", "adv_loss", "delta_norm", "adv_skipped", "train_correct")


@dataclass
class Prepared:
    source: ModelSource
    tokenizer: Any
    labels: FD.LabelSet
    train: FD.Encoded
    validation: FD.Encoded
    extra: dict[str, FD.Encoded]
    task: str


def _cache_dir(opts: FinetuneOptions) -> Path:
    """--cache-dir, else $ALUM_DS_CACHE or ~/.cache/alum_ds (where pretraining prepares its data)."""
    if opts.cache_dir:
        return Path(opts.cache_dir)
    return Path(os.environ.get("ALUM_DS_CACHE", Path.home() / ".cache" / "alum_ds"))


def prepare(opts: FinetuneOptions) -> Prepared:
    """Resolve the model, the tokenizer and the data; raise DataError/ConfigError on any problem."""
    if opts.max_length < 8:
        raise ConfigError(f"--max-length must be at least 8, got {opts.max_length}")
    if opts.pgd_steps < 0 or any(not (r >= 0) for r in opts.robust_radius):
        raise ConfigError("--pgd-steps and --robust-radius must be >= 0")
    if opts.validation and not opts.train:
        raise ConfigError("--validation needs --train (without --train the embedded task is used)")
    cols = FD.Columns(opts.text_column, opts.text_pair_column, opts.label_column)
    extra_specs = list(opts.adv_eval)
    labels = list(opts.labels)
    if opts.train:
        train = FD.read_examples(opts.train, cols, "train")
        if opts.validation:
            val = FD.read_examples(opts.validation, cols, "validation")
        else:  # hold out every 10th example
            train, val = _split(train)
        task = opts.train
    else:
        if cols != FD.Columns():
            raise ConfigError("column options need --train (the embedded task has text and label)")
        folder = ensure_topic_task(_cache_dir(opts))
        meta = json.loads((folder / "task.json").read_text())
        train = FD.read_examples(str(folder / "train.jsonl"), cols, "train")
        val = FD.read_examples(str(folder / "validation.jsonl"), cols, "validation")
        extra_specs = [str(folder / "adversarial.jsonl"), *extra_specs]
        labels = labels or meta["labels"]
        task = f"embedded topic task ({folder})"
    extra = {s: FD.read_examples(s, cols, "adversarial") for s in extra_specs}
    label_set = FD.LabelSet(labels) if labels else FD.LabelSet.from_examples(train)

    src = resolve_source(opts.checkpoint, opts.tokenizer)
    try:
        tok = load_checked_tokenizer(src)
        limit = int(src.config.get("max_position_embeddings", 514)) - 2
        max_length = min(opts.max_length, limit)
        enc = {name: FD.encode(ex, label_set, tok, max_length)
               for name, ex in (("train", train), ("validation", val), *extra.items())}
    except BaseException:
        src.cleanup()
        raise
    return Prepared(src, tok, label_set, enc.pop("train"), enc.pop("validation"), enc, task)


def _split(ex: FD.Examples) -> tuple[FD.Examples, FD.Examples]:
    if len(ex) < 10:
        raise DataError(f"{ex.source} has {len(ex)} examples: too few to hold out a validation set "
                        "(pass --validation)")
    keep = [i for i in range(len(ex)) if i % 10 != 9]
    held = [i for i in range(len(ex)) if i % 10 == 9]

    def sub(idx: list[int], name: str) -> FD.Examples:
        return FD.Examples([ex.texts[i] for i in idx],
                           None if ex.pairs is None else [ex.pairs[i] for i in idx],
                           [ex.labels[i] for i in idx], [ex.rows[i] for i in idx], name)

    return sub(keep, ex.source), sub(held, f"{ex.source} (every 10th example)")


def _init_distributed() -> None:
    """``alum-ds finetune`` without a launcher: a process group of one."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    D.init()


def cpu_threads() -> int:
    """Intra-op threads per rank on the CPU: OMP_NUM_THREADS when set (on a machine shared with
    other jobs 1 is much faster: spinning OpenMP threads that lose their core stall every op, seen
    here as 10-20x slower steps), else the cores divided among the local ranks."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_SIZE", "1"))))


def _prepare_run_dir(run_dir: Path) -> None:
    if (run_dir / "checkpoints").is_dir() or (run_dir / "config.resolved.json").is_file():
        raise ConfigError(f"--run.dir {run_dir} is a pretraining run folder; fine-tune into another")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "results.json", "tensorboard", "model"):
        p = run_dir / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def finetune(opts: FinetuneOptions, cfg: RunConfig, ds_path: str) -> dict[str, Any]:
    """Run one fine-tuning; return the results (also written to RUN/results.json on rank 0)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    from alum_ds.ds_config import precision_of, resolve_ds_config, zero_stage_of
    from alum_ds.finetune.objective import ClassifierObjective
    from alum_ds.optim import lr_lambda, make_optimizer

    run_dir = Path(cfg.run.dir)
    if (run_dir / "checkpoints").is_dir() or (run_dir / "config.resolved.json").is_file():
        raise ConfigError(f"--run.dir {run_dir} is a pretraining run folder; fine-tune into another")
    prep = prepare(opts)
    try:
        _init_distributed()
        rank, world = D.rank(), D.world()
        acc = get_accelerator()
        on_gpu = acc.device_name() == "cuda"
        if not on_gpu:
            torch.set_num_threads(cpu_threads())
        device = torch.device(acc.device_name(D.local_rank())) if on_gpu else torch.device("cpu")
        ds = resolve_ds_config(ds_path, cfg, world_size=world,
                               bf16_supported=bool(acc.is_bf16_supported()), on_gpu=on_gpu)
        if not on_gpu:
            tune_allocator(ds)
        torch.manual_seed(cfg.run.seed)  # the same classifier head on every rank
        model = build_classifier(prep.source, prep.labels.names, dropout=cfg.model.dropout)
    finally:
        prep.source.cleanup()
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    objective = ClassifierObjective(model, cfg.alum, any_rank=D.any_rank_fn(device))
    opt = make_optimizer(list(objective.named_parameters()), cfg, ds, on_gpu)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.schedule.steps))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=opt, lr_scheduler=sched,
                                           config=ds)
    if rank == 0:
        _prepare_run_dir(run_dir)
    D.barrier()
    log = MT.MetricsLogger(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                           total_steps=cfg.schedule.steps)
    alum_on = cfg.alum.enabled and cfg.alum.alpha > 0
    pair = " (text pairs)" if prep.train.pairs else ""
    log.message(
        f"alum_ds finetune: {world} rank(s) on {acc.device_name()}, ZeRO-{zero_stage_of(ds)}, "
        f"{precision_of(ds)}, model from {prep.source.description} "
        f"({n_params / 1e6:.2f}M params), "
        f"ALUM {'on (alpha=' + format(cfg.alum.alpha, 'g') + ')' if alum_on else 'off'}, "
        f"task {prep.task}{pair}: {len(prep.train)} training / {len(prep.validation)} validation "
        f"examples, labels {', '.join(prep.labels.names)}")

    pad = int(prep.tokenizer.pad_token_id)
    eval_kw = dict(num_labels=len(prep.labels.names), pad_id=pad, batch=opts.eval_batch, device=device)
    mb, accum = cfg.schedule.micro_batch_size, cfg.schedule.grad_accum
    window = torch.zeros(len(WINDOW) + 1, dtype=torch.float64, device=device)  # sums + micro-steps
    zero, one = window[0].clone(), window[0].clone() + 1
    t_last, steps_since = time.time(), 0
    engine.train()
    for step in range(cfg.schedule.steps):
        for micro, idx in enumerate(FD.train_batch_indices(
                len(prep.train), step=step, micro=mb, accum=accum, rank=rank, world=world,
                seed=cfg.run.seed)):
            # Dropout and the perturbation's noise: reproducible, different per micro-step and rank.
            torch.manual_seed((cfg.run.seed * 1_000_003 + (step * accum + micro) * 7919 + rank) % 2**63)
            x, mask, y = (torch.from_numpy(a).to(device) for a in prep.train.batch(idx, pad))
            loss, st = engine(x, mask, y, alum_on=alum_on)
            engine.backward(loss)
            engine.step()
            window += torch.stack([st[k].double() if k in st else zero for k in WINDOW] + [one])
        done = step + 1
        steps_since += 1
        if done % cfg.logging.every == 0 or done == cfg.schedule.steps:
            now = time.time()
            _log_window(log, engine, objective, cfg, done, window, steps_since, now - t_last, alum_on)
            window.zero_()
            t_last, steps_since = now, 0
        if opts.eval_every and done % opts.eval_every == 0 and done < cfg.schedule.steps:
            ev = evaluate(engine, prep.validation, **eval_kw)
            log.log(done, {f"eval_{k}": v for k, v in ev.items()})
            log.message(f"eval at step {done}: accuracy {ev['accuracy']:.4f}, "
                        f"macro F1 {ev['macro_f1']:.4f}")

    results = _final_eval(engine, prep, opts, eval_kw)
    log.log(cfg.schedule.steps, {f"eval_{k}": v for k, v in _flat(results).items()})
    for line in _result_lines(results):
        log.message(line)
    results.update(steps=cfg.schedule.steps, alum=alum_on, alpha=cfg.alum.alpha if alum_on else 0.0,
                   checkpoint=opts.checkpoint, task=prep.task, labels=prep.labels.names,
                   world_size=world, options=asdict(opts))
    if opts.save_model:
        _save_model(engine, model, prep, run_dir / "model", rank)
    if rank == 0:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.message(f"run folder: {run_dir.resolve()}")
    log.close()
    return results


def _log_window(log: MT.MetricsLogger, engine: Any, objective: Any, cfg: RunConfig, step: int,
                window: torch.Tensor, steps: int, seconds: float, alum_on: bool) -> None:
    """Reduce the window's sums over ranks, log them and print one progress line."""
    s = D.all_reduce(window.clone(), "sum").cpu().tolist()
    n = s[-1]  # micro-steps, summed over ranks
    mb = cfg.schedule.micro_batch_size
    values: dict[str, Any] = {
        "ce_loss": s[0] / n, "train_accuracy": s[4] / (n * mb), "lr": float(engine.get_lr()[0]),
        "examples_per_s": n * mb / seconds, "step_time_s": seconds / steps,
    }
    values["loss"] = values["ce_loss"]
    if alum_on:
        values.update(adv_loss=s[1] / n, delta_norm=s[2] / n, adv_skipped_total=objective.skipped_total)
        values["loss"] += cfg.alum.alpha * values["adv_loss"]
        if s[3]:
            log.message(f"warning: adversarial term skipped on {int(s[3] / D.world())} micro-step(s) "
                        f"before step {step} (non-finite ascent gradient or loss)")
    gn = engine.get_global_grad_norm()
    if gn is not None:
        values["grad_norm"] = float(gn)
    log.log(step, values)
    adv = f" | adv {values['adv_loss']:.4g}" if alum_on else ""
    log.message(f"step {step}/{cfg.schedule.steps} | loss {values['loss']:.4f} | ce "
                f"{values['ce_loss']:.4f}{adv} | train acc {values['train_accuracy']:.3f} | "
                f"lr {values['lr']:.2e} | {values['examples_per_s']:.0f} ex/s")
    if not math.isfinite(values["loss"]):
        raise FloatingPointError(f"fine-tuning loss became non-finite at step {step}")


def _final_eval(engine: Any, prep: Prepared, opts: FinetuneOptions, kw: dict) -> dict[str, Any]:
    radii = tuple(r for r in opts.robust_radius if r > 0) if opts.pgd_steps else ()
    out: dict[str, Any] = {"validation": evaluate(engine, prep.validation, robust_radii=radii,
                                                  pgd_steps=opts.pgd_steps, **kw)}
    out["pgd"] = {"steps": opts.pgd_steps, "radii": list(radii), "norm": "linf per element"}
    out["adversarial"] = {name: evaluate(engine, enc, **kw) for name, enc in prep.extra.items()}
    return out


def _flat(results: dict[str, Any]) -> dict[str, float]:
    flat = {k: v for k, v in results["validation"].items() if k != "examples"}
    for i, ev in enumerate(results["adversarial"].values()):
        flat[f"adversarial{i}_accuracy"] = ev["accuracy"]
    return flat


def _result_lines(results: dict[str, Any]) -> list[str]:
    v = results["validation"]
    line = (f"validation ({v['examples']} examples): accuracy {v['accuracy']:.4f}, "
            f"macro F1 {v['macro_f1']:.4f}")
    for k, x in v.items():
        if k.startswith("robust_accuracy@"):
            line += f", robust accuracy (PGD-{results['pgd']['steps']}, radius {k.split('@')[1]}) {x:.4f}"
    lines = [line]
    for name, ev in results["adversarial"].items():
        lines.append(f"adversarial set {name} ({ev['examples']} examples): accuracy {ev['accuracy']:.4f}, "
                     f"macro F1 {ev['macro_f1']:.4f}")
    return lines


def _save_model(engine: Any, model: Any, prep: Prepared, out: Path, rank: int) -> None:
    """A Hugging Face folder (safetensors + tokenizer); ZeRO-3 shards are gathered first."""
    from deepspeed import zero

    params = list(engine.module.parameters())
    with zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        if rank == 0:
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), safe_serialization=True)
            prep.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    D.barrier()
