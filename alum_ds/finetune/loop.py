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
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from alum_ds import compiling
from alum_ds import distributed as D
from alum_ds import metrics as MT
from alum_ds import runtime as R
from alum_ds.config import ConfigError
from alum_ds.data.shards import DataError
from alum_ds.ds_config import precision_of, resolve_ds_config, resolve_ds_path, zero_stage_of
from alum_ds.finetune import data as FD
from alum_ds.finetune import metrics as FM
from alum_ds.finetune.config import FinetuneConfig
from alum_ds.finetune.evaluate import evaluate
from alum_ds.finetune.objective import ClassifierObjective, RegressionObjective
from alum_ds.finetune.source import ModelSource, build_classifier, load_checked_tokenizer, resolve_source
from alum_ds.finetune.tasks import ensure_topic_task


@dataclass
class Prepared:
    source: ModelSource
    tokenizer: Any
    labels: FD.LabelSet | FD.RealLabels
    train: FD.Encoded
    validation: FD.Encoded
    extra: dict[str, FD.Encoded]
    task: str


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Resolve the model, the tokenizer and the data; raise DataError/ConfigError on any problem."""
    task = cfg.task
    cols = FD.Columns(task.text_column, task.text_pair_column, task.label_column)
    extra_specs = list(task.adv_eval)
    labels = list(task.labels)
    if task.train:
        train = FD.read_examples(task.train, cols, "train")
        if task.validation:
            val = FD.read_examples(task.validation, cols, "validation")
        else:  # hold out every 10th example
            train, val = _split(train)
        name = task.train
    else:
        if cols != FD.Columns():
            raise ConfigError("task.text_column/text_pair_column/label_column need task.train (the "
                              "embedded task has text and label)")
        folder = ensure_topic_task(R.cache_dir(task.cache_dir))
        meta = json.loads((folder / "task.json").read_text())
        train = FD.read_examples(str(folder / "train.jsonl"), cols, "train")
        val = FD.read_examples(str(folder / "validation.jsonl"), cols, "validation")
        extra_specs = [str(folder / "adversarial.jsonl"), *extra_specs]
        labels = labels or meta["labels"]
        name = f"embedded topic task ({folder})"
    extra = {s: FD.read_examples(s, cols, "adversarial") for s in extra_specs}
    if task.type == "regression":
        label_set: FD.LabelSet | FD.RealLabels = FD.RealLabels()
    else:
        label_set = FD.LabelSet(labels) if labels else FD.LabelSet.from_examples(train)

    src = resolve_source(task.checkpoint, task.tokenizer)
    try:
        tok = load_checked_tokenizer(src)
        max_length = min(task.max_length, src.max_positions or task.max_length)
        enc = {n: FD.encode(ex, label_set, tok, max_length)
               for n, ex in (("train", train), ("validation", val), *extra.items())}
    except BaseException:
        src.cleanup()
        raise
    return Prepared(src, tok, label_set, enc.pop("train"), enc.pop("validation"), enc, name)


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


def with_epochs(cfg: FinetuneConfig, examples: int, world: int) -> FinetuneConfig:
    """``cfg`` with schedule.steps set from task.epochs (when set): enough optimizer steps for
    that many passes over ``examples`` at the global batch of ``world`` ranks."""
    if not cfg.task.epochs:
        return cfg
    per_step = cfg.schedule.micro_batch_size * cfg.schedule.grad_accum * world
    steps = max(1, math.ceil(cfg.task.epochs * examples / per_step))
    return replace(cfg, schedule=replace(cfg.schedule, steps=steps))


def _prepare_run_dir(run_dir: Path) -> None:
    if (run_dir / "checkpoints").is_dir() or (run_dir / "config.resolved.json").is_file():
        raise ConfigError(f"--run.dir {run_dir} is a pretraining run folder; fine-tune into another")
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "results.json", "tensorboard", "model"):
        p = run_dir / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def finetune(cfg: FinetuneConfig, ds_path: str) -> dict[str, Any]:
    """Run one fine-tuning; return the results (also written to RUN/results.json on rank 0)."""
    run_dir = Path(cfg.run.dir)
    if (run_dir / "checkpoints").is_dir() or (run_dir / "config.resolved.json").is_file():
        raise ConfigError(f"run.dir {run_dir} is a pretraining run folder; fine-tune into another")
    prep = prepare(cfg)
    try:
        dev = R.detect()
        rt = R.start(dev)
        cfg = with_epochs(cfg, len(prep.train), rt.world)
        ds = resolve_ds_config(ds_path, cfg, world_size=rt.world, bf16_supported=dev.bf16_supported,
                               on_gpu=rt.on_gpu)
        R.tune_host(rt, ds)
        compiled, compile_note = R.compile_plan(ds, rt.on_gpu)
        torch.manual_seed(cfg.run.seed)  # the same classifier head on every rank
        model = build_classifier(prep.source, prep.labels.names, dropout=cfg.model.dropout,
                                 activation_checkpointing=cfg.model.activation_checkpointing)
        regression = cfg.task.type == "regression"
        if regression:
            model.config.problem_type = "regression"
        R.adapt_model(rt, model)
        if compiled:
            R.compile_model(model, ds, R.cache_dir(cfg.task.cache_dir))
    finally:
        prep.source.cleanup()
    n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    kind = RegressionObjective if regression else ClassifierObjective
    objective = kind(model, cfg.alum, any_rank=rt.any_rank(),
                     freeze_ascent=compiled and not cfg.model.activation_checkpointing)
    engine = R.build_engine(objective, optim=cfg.optim, schedule=cfg.schedule, ds=ds,
                            total_steps=cfg.schedule.steps, on_gpu=rt.on_gpu)
    if rt.rank == 0:
        _prepare_run_dir(run_dir)
    D.barrier()
    log = MT.MetricsLogger(run_dir, enabled=rt.rank == 0, tensorboard=cfg.logging.tensorboard,
                           total_steps=cfg.schedule.steps)
    alum_on = cfg.alum.enabled and cfg.alum.alpha > 0
    pair = " (text pairs)" if prep.train.pairs else ""
    log.message(
        f"alum_ds finetune: {rt.world} rank(s) on {dev.name}, ZeRO-{zero_stage_of(ds)}, "
        f"{precision_of(ds)}{', compiled' if compiled else ''} (DeepSpeed config "
        f"{resolve_ds_path(ds_path)}), model from "
        f"{prep.source.description} ({n_params / 1e6:.2f}M params), "
        f"ALUM {'on (alpha=' + format(cfg.alum.alpha, 'g') + ')' if alum_on else 'off'}, "
        f"task {prep.task}{pair}: {len(prep.train)} training / {len(prep.validation)} validation "
        f"examples, {'regression' if regression else 'labels ' + ', '.join(prep.labels.names)}")

    if compile_note:
        log.message(compile_note)
    clock = compiling.Clock() if compiled else None
    pad = int(prep.tokenizer.pad_token_id)
    eval_kw = dict(num_labels=len(prep.labels.names), pad_id=pad, batch=cfg.eval.batch, device=rt.device,
                   metrics=tuple(cfg.task.metrics or FM.defaults(cfg.task.type)), regression=regression)
    mb, accum = cfg.schedule.micro_batch_size, cfg.schedule.grad_accum
    window = MT.StepWindow(rt.device, extra=() if regression else ("correct",))
    t_last, steps_since = time.time(), 0
    engine.train()
    for step in range(cfg.schedule.steps):
        micro = []
        for position, idx in FD.train_batch_indices(
                len(prep.train), step=step, micro=mb, accum=accum, rank=rt.rank, world=rt.world,
                seed=cfg.run.seed):
            batch = {k: torch.from_numpy(a).to(rt.device) for k, a in prep.train.batch(idx, pad).items()}
            micro.append((position, (), {**batch, "alum_on": alum_on}))
        R.run_micro_steps(engine, window, cfg.run.seed, micro)
        done = step + 1
        steps_since += 1
        if done % cfg.logging.every == 0 or done == cfg.schedule.steps:
            now = time.time()
            spent = clock.take() if clock is not None else 0.0
            if spent:
                log.message(f"compiled {compiling.graphs_compiled()} graph(s) so far, {spent:.1f} s "
                            f"before step {done} (not counted in step times)")
            t_last += spent
            r = window.reduce(D.all_reduce, rt.world, cfg.alum.alpha)
            values = MT.window_values(r, task=objective.task, alum_on=alum_on, engine=engine,
                                      skipped_total=objective.skipped_total)
            if not regression:
                values["train_accuracy"] = r["correct"] / max(r["rows"], 1.0)
            values.update(examples_per_s=r["rows"] / (now - t_last),
                          step_time_s=(now - t_last) / steps_since)
            log.window(done, values, r["adv_skipped"])
            t_last, steps_since = now, 0
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.schedule.steps:
            ev = evaluate(engine, prep.validation, **eval_kw)
            log.log(done, {f"eval_{k}": v for k, v in ev.items()})
            log.message(f"eval at step {done}: {_scores(ev)}")

    results = _final_eval(engine, prep, cfg, eval_kw)
    log.log(cfg.schedule.steps, {f"eval_{k}": v for k, v in _flat(results).items()})
    for line in _result_lines(results):
        log.message(line)
    results.update(steps=cfg.schedule.steps, alum=alum_on, alpha=cfg.alum.alpha if alum_on else 0.0,
                   checkpoint=cfg.task.checkpoint, task=prep.task, labels=prep.labels.names,
                   world_size=rt.world, config=cfg.to_dict())
    if cfg.run.save_model:
        _save_model(engine, model, prep, run_dir / "model", rt.rank)
    if rt.rank == 0:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    log.message(f"run folder: {run_dir.resolve()}")
    log.close()
    return results


def _final_eval(engine: Any, prep: Prepared, cfg: FinetuneConfig, kw: dict) -> dict[str, Any]:
    steps = cfg.eval.pgd_steps
    radii = tuple(r for r in cfg.eval.robust_radius if r > 0) if steps and not kw["regression"] \
        else ()
    out: dict[str, Any] = {"validation": evaluate(engine, prep.validation, robust_radii=radii,
                                                  pgd_steps=steps, **kw)}
    out["pgd"] = {"steps": steps, "radii": list(radii), "norm": "linf per element"}
    out["adversarial"] = {name: evaluate(engine, enc, **kw) for name, enc in prep.extra.items()}
    return out


def _flat(results: dict[str, Any]) -> dict[str, float]:
    flat = {k: v for k, v in results["validation"].items() if k != "examples"}
    for i, ev in enumerate(results["adversarial"].values()):
        flat.update({f"adversarial{i}_{k}": v for k, v in ev.items() if k != "examples"})
    return flat


def _scores(ev: dict[str, Any]) -> str:
    return ", ".join(f"{FM.NAMES.get(k, k)} {v:.4f}" for k, v in ev.items()
                     if k != "examples" and not k.startswith("robust_accuracy@"))


def _result_lines(results: dict[str, Any]) -> list[str]:
    v = results["validation"]
    line = f"validation ({v['examples']} examples): {_scores(v)}"
    for k, x in v.items():
        if k.startswith("robust_accuracy@"):
            line += f", robust accuracy (PGD-{results['pgd']['steps']}, radius {k.split('@')[1]}) {x:.4f}"
    lines = [line]
    for name, ev in results["adversarial"].items():
        lines.append(f"evaluation set {name} ({ev['examples']} examples): {_scores(ev)}")
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
