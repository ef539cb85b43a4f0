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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from alum_ds import distributed as D
from alum_ds import metrics as MT
from alum_ds import records
from alum_ds import runtime as R
from alum_ds.cadence import Every
from alum_ds.config import Batching, ConfigError, cache_dir
from alum_ds.data.shards import DataError
from alum_ds.ds_config import DsPlan, plan_ds
from alum_ds.finetune import data as FD
from alum_ds.finetune.config import FinetuneConfig
from alum_ds.finetune.evaluate import Validator
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
        folder = ensure_topic_task(cache_dir(task.cache_dir))
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


def _build_model(prep: Prepared, cfg: FinetuneConfig) -> Any:
    model = build_classifier(prep.source, prep.labels.names, dropout=cfg.model.dropout,
                             activation_checkpointing=cfg.model.activation_checkpointing)
    if cfg.task.type == "regression":
        model.config.problem_type = "regression"  # saved with the model: one real output
    return model


def _refuse_pretraining_folder(run_dir: Path) -> None:
    if (run_dir / "checkpoints").is_dir() or (run_dir / "config.resolved.json").is_file():
        raise ConfigError(f"run.dir {run_dir} is a pretraining run folder; fine-tune into another")


def _prepare_run_dir(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "results.json", "tensorboard", "model"):
        p = run_dir / name
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def finetune(cfg: FinetuneConfig, ds_path: str) -> dict[str, Any]:
    """Run one fine-tuning; return the results (also written to RUN/results.json on rank 0)."""
    run_dir = Path(cfg.run.dir)
    _refuse_pretraining_folder(run_dir)
    prep = prepare(cfg)
    # The launcher's world size (one rank without one), known before the process group: the
    # step count of task.epochs is needed to build the run.
    cfg = with_epochs(cfg, len(prep.train), int(os.environ.get("WORLD_SIZE", "1")))
    try:
        dev = R.detect()
        sched = cfg.schedule

        def ds(rt: R.Runtime) -> DsPlan:
            return plan_ds(ds_path, cfg, Batching(sched.micro_batch_size, sched.grad_accum, rt.world),
                           bf16_supported=dev.bf16_supported, on_gpu=rt.on_gpu)

        run = R.build_run(dev, ds, seed=cfg.run.seed, model=lambda rt: _build_model(prep, cfg),
                          objective=RegressionObjective if cfg.task.type == "regression"
                          else ClassifierObjective, alum=cfg.alum, optim=cfg.optim,
                          schedule=sched, total_steps=sched.steps,
                          cache=cache_dir(cfg.task.cache_dir),
                          activation_checkpointing=cfg.model.activation_checkpointing)
    finally:
        prep.source.cleanup()
    if run.rt.rank == 0:
        _prepare_run_dir(run_dir)
    D.barrier()
    log = MT.MetricsLogger(run_dir, enabled=run.rt.rank == 0, tensorboard=cfg.logging.tensorboard,
                           total_steps=sched.steps)
    _announce(cfg, run, prep, log)
    return Loop(cfg=cfg, run=run, prep=prep, log=log, run_dir=run_dir).run()


def _alum_on(cfg: FinetuneConfig) -> bool:
    return cfg.alum.enabled and cfg.alum.alpha > 0


def _announce(cfg: FinetuneConfig, run: R.Run, prep: Prepared, log: MT.MetricsLogger) -> None:
    pair = " (text pairs)" if prep.train.pairs else ""
    labels = "regression" if cfg.task.type == "regression" else "labels " + ", ".join(prep.labels.names)
    log.message(
        f"alum_ds finetune: {run.banner()}, model from "
        f"{prep.source.description} ({run.n_params / 1e6:.2f}M params){prep.source.tokenizer_note}, "
        f"ALUM {'on (alpha=' + format(cfg.alum.alpha, 'g') + ')' if _alum_on(cfg) else 'off'}, "
        f"task {prep.task}{pair}: {len(prep.train)} training / {len(prep.validation)} validation "
        f"examples, {labels}")
    if run.ds.compile_note:
        log.message(run.ds.compile_note)


class Loop:
    """The steps of a fine-tuning; logging and evaluation each on its cadence."""

    def __init__(self, *, cfg: FinetuneConfig, run: R.Run, prep: Prepared, log: MT.MetricsLogger,
                 run_dir: Path) -> None:
        self.cfg, self.prep, self.log, self.run_dir = cfg, prep, log, run_dir
        self.engine, self.objective, self.model = run.engine, run.objective, run.model
        self.device, self.rank, self.world = run.rt.device, run.rt.rank, run.rt.world
        sched = cfg.schedule
        self.batching = Batching(sched.micro_batch_size, sched.grad_accum, self.world)
        self.pad = int(prep.tokenizer.pad_token_id)
        self.alum_on = _alum_on(cfg)
        self.regression = cfg.task.type == "regression"
        self.window = MT.StepWindow(self.device, extra=() if self.regression else ("correct",))
        self.steps = MT.StepLogger(log, self.window, all_reduce=D.all_reduce, world=self.world,
                                   alpha=cfg.alum.alpha, task=self.objective.task,
                                   compiled=run.ds.compile, record_compile=False)
        self.validator = Validator(self.engine, cfg, prep.validation, prep.extra,
                                   num_labels=len(prep.labels.names), pad_id=self.pad,
                                   device=self.device, log=log, regression=self.regression)
        self.log_every = Every(cfg.logging.every, sched.steps, final=True)
        self.eval_every = Every(cfg.eval.every, sched.steps, final=False)

    def run(self) -> dict[str, Any]:
        step, last = 0, self.cfg.schedule.steps
        self.engine.train()
        while step < last:
            self.train_step(step)
            step += 1
            self.steps.step_done()
            if self.log_every.due(step):
                self.log_step(step)
            if self.eval_every.due(step):
                self.validator.run(step)
        return self.finish(step)

    def train_step(self, step: int) -> None:
        b = self.batching
        micro = []
        for position, idx in FD.train_batch_indices(
                len(self.prep.train), step=step, micro=b.micro_batch, accum=b.accum, rank=self.rank,
                world=self.world, seed=self.cfg.run.seed):
            batch = {k: torch.from_numpy(a).to(self.device)
                     for k, a in self.prep.train.batch(idx, self.pad).items()}
            micro.append(R.MicroBatch(position, alum_on=self.alum_on, **batch))
        R.run_micro_steps(self.engine, self.window, self.cfg.run.seed, micro)

    def log_step(self, step: int) -> None:
        def accuracy(r: dict[str, float], steps: int, seconds: float) -> dict[str, Any]:
            out = {"examples_per_s": r["rows"] / seconds, "step_time_s": seconds / steps}
            if not self.regression:
                out["train_accuracy"] = r["correct"] / max(r["rows"], 1.0)
            return out

        self.steps.flush(step, alum_on=self.alum_on, engine=self.engine,
                         skipped_total=self.objective.skipped_total, extra=accuracy)

    def finish(self, step: int) -> dict[str, Any]:
        """The final evaluation, the results and the model."""
        cfg, prep = self.cfg, self.prep
        results = self.validator.final(step)
        results.update(steps=step, alum=self.alum_on, alpha=cfg.alum.alpha if self.alum_on else 0.0,
                       checkpoint=cfg.task.checkpoint, task=prep.task, labels=prep.labels.names,
                       world_size=self.world, config=cfg.to_dict(), sources=prep.source.hub)
        if cfg.run.save_model:
            _save_model(self.engine, self.model, prep, self.run_dir / "model", self.rank)
        if self.rank == 0:
            (self.run_dir / "results.json").write_text(records.dumps(results, indent=2))
        self.log.message(f"run folder: {self.run_dir.resolve()}")
        self.log.close()
        return results


def _save_model(engine: Any, model: Any, prep: Prepared, out: Path, rank: int) -> None:
    """A Hugging Face folder (safetensors + tokenizer); ZeRO-3 shards are gathered first."""
    with D.gathered(engine.module):
        if rank == 0:
            tmp = out.with_name(out.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), safe_serialization=True)
            prep.tokenizer.save_pretrained(str(tmp))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
    D.barrier()
