"""The training loop: plan, build, initialise DeepSpeed, step, log, evaluate, checkpoint.

``train`` reads top to bottom: everything that can be refused is decided from the config, the
DeepSpeed JSON and the checkpoint's JSON state before a process group or model exists (so a bad
input is a one-line error that changes nothing); then ``runtime.build_run`` starts the process and
builds the engine (as for fine-tuning), the checkpoint (if any) is loaded, and ``Loop`` runs the
steps, logging, evaluation, stopping and saving each on its cadence (``alum_ds.cadence``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alum_ds import checkpoint as C
from alum_ds import distributed as D
from alum_ds import guard as G
from alum_ds import hub, records
from alum_ds import metrics as MT
from alum_ds import runtime as R
from alum_ds.arch import check_mlm_folder
from alum_ds.cadence import Every, StopAfter
from alum_ds.config import AlumConfig, Batching, ConfigError, RunConfig, batching_for, cache_dir
from alum_ds.data import integrity, mixture, remote
from alum_ds.data.prepare import ensure_embedded
from alum_ds.data.shards import DataError, check_vocab, read_manifest, sha256_file
from alum_ds.data.stream import TrainStream, check_splits
from alum_ds.ds_config import DsPlan, plan_ds
from alum_ds.evaluation import MixtureValidator, Validator, show_fill_mask
from alum_ds.model import PADDED_VOCAB_ROWS, build_model, non_embedding_params
from alum_ds.objective import AlumObjective
from alum_ds.optim import planned_steps

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerun to resume


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


def resolve_data(cfg: RunConfig) -> Path:
    """The prepared data folder; the embedded default is prepared by one rank per node."""
    if cfg.data.sources:  # a mixture: the first source's tokenizer is every source's
        return mixture.sources_of(cfg.data)[0].dir
    cache = cache_dir(cfg.data.cache_dir)
    if cfg.data.dir:
        return remote.local_dir(cfg.data.dir, cache)
    if D.local_rank() == 0:
        out = ensure_embedded(cache, vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    D.barrier()
    if D.local_rank() != 0:
        out = ensure_embedded(cache, vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    return out


def verify_data(dirs: list[Path], cfg: RunConfig, rt: R.Runtime) -> dict[str, float] | None:
    """Every shard hashed once per node before the first step (by its local rank 0; the other
    ranks wait). A refusal is raised where it was found; the other ranks exit with its code."""
    error, result = "", None
    if D.local_rank() == 0:
        try:
            result = integrity.verify_for_training(dirs, cache_dir(cfg.data.cache_dir),
                                                   progress=rt.rank == 0)
        except DataError as e:
            error = str(e)
    failed = D.all_reduce(torch.tensor([1.0 if error else 0.0], device=rt.device), "max").item()
    if error:
        raise DataError(error)
    if failed:
        raise SystemExit(2)  # the rank that found it has printed the one-line error
    return result


class Signals:
    """First SIGTERM/SIGINT: finish the step, save, exit EXIT_PREEMPTED. A second one exits at
    once (128 + signal number) - unless it comes within ``duplicate_s`` of the first: Ctrl-C or
    a scheduler's SIGTERM reaches the ranks directly *and* again through DeepSpeed's launcher
    (which forwards SIGTERM to its children and SIGKILLs them 30 s later), and that is one
    request, not two."""

    def __init__(self, duplicate_s: float = 2.0) -> None:
        self.duplicate_s = duplicate_s
        self.first: float | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    @property
    def requested(self) -> bool:
        return self.first is not None

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        elif now - self.first > self.duplicate_s:
            os._exit(128 + signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def ignore(self) -> None:
        """For a process leaving with EXIT_PREEMPTED after its save: a stop request arriving now
        is the same request reaching this rank late (on several nodes each launcher forwards it
        in its own time), and with the default handler back it killed a rank that had saved and
        was exiting 75 (exit -15: seen in the two-node Slurm test)."""
        for sig in self.previous:
            signal.signal(sig, signal.SIG_IGN)


@dataclass
class Plan:
    """What a run will do, decided before any process group, model or engine exists."""

    batching: Batching
    ds: DsPlan
    run_dir: Path
    point: C.ResumePoint | None
    universal: bool
    last_step: int
    branch: bool = False
    """``point`` is another run's checkpoint this run starts from (``run.branch_from``)."""
    pretrained: Any = None
    """``model.pretrained`` resolved (``alum_ds.hub.Folder``: a local folder or a Hub snapshot)."""
    resume: str = ""
    """The ``--resume`` argument the plan was made with."""

    @property
    def world(self) -> int:
        return self.batching.world


def plan_run(cfg: RunConfig, ds_path: str, *, resume: str, world: int, on_gpu: bool,
             bf16_supported: bool) -> Plan:
    """Every refusal that needs no engine: a run folder of another run, a global batch the ranks
    cannot divide, a checkpoint of another config or model shape, a missing optional package."""
    run_dir = Path(cfg.run.dir)
    _check_run_dir(run_dir, cfg)
    remote.fetch_metadata_of(cfg.data)  # the manifests and tokenizers of remote folders
    if cfg.data.dir:  # the embedded default is prepared later, by the ranks
        check_splits(remote.local_dir(cfg.data.dir, cache_dir(cfg.data.cache_dir)), cfg.data.seq_len)
    batching = batching_for(cfg, world)
    ds = plan_ds(ds_path, cfg, batching, bf16_supported=bf16_supported, on_gpu=on_gpu)
    G.check_ds(ds.config, cfg.guard)
    total = planned_steps(cfg, batching.global_batch)
    point = C.find_resume(run_dir, resume)
    branch = point is None and bool(cfg.run.branch_from)
    if branch:
        point = C.find_resume(run_dir, cfg.run.branch_from, option="run.branch_from")
    universal = point is not None and C.check_resume(point, cfg, world=world, zero_stage=ds.zero_stage,
                                                     branch=branch, total_steps=total)
    if universal:
        ds = ds.loading_universal()
    _check_optional(cfg)
    mixture.check_sources(cfg.data)
    return Plan(batching, ds, run_dir, point, universal, total, branch,
                pretrained=_resolve_pretrained(cfg, run_dir), resume=resume)


def _check_optional(cfg: RunConfig) -> None:
    """The packages and model folder the config names, before anything starts."""
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true needs the wandb package (pip install wandb), which "
                          "is not installed")


def _resolve_pretrained(cfg: RunConfig, run_dir: Path) -> Any:
    """``model.pretrained`` as a local folder (a Hub id downloaded once per node; a resumed run
    keeps the commit it recorded), checked from its config.json alone: a supported family with
    an MLM head, or any supported encoder under ``model.new_head``."""
    if not cfg.model.pretrained:
        return None
    spec = cfg.model.pretrained
    pinned = hub.pinned_commit(run_dir, "model.pretrained", spec)
    folder = hub.resolve(spec, "model.pretrained", pinned=pinned)
    try:
        check_mlm_folder(folder.path, new_head=cfg.model.new_head)
    except ValueError as e:
        raise ConfigError(f"model.pretrained {e}") from None
    return folder


def _alum_words(alum: AlumConfig, total: int) -> str:
    start = alum.start_for(total)
    if not alum.enabled or start >= total:
        return "ALUM off" if not alum.enabled else f"ALUM never on (starts at step {start} of {total})"
    return "ALUM on" if start == 0 else f"plain MLM to step {start}, then ALUM (of {total} steps)"


def train(cfg: RunConfig, ds_path: str, *, resume: str = "") -> Path:
    """Run (or continue) training; return the run folder."""
    dev = R.detect()
    plan = plan_run(cfg, ds_path, resume=resume, world=int(os.environ.get("WORLD_SIZE", "1")),
                    on_gpu=dev.on_gpu, bf16_supported=dev.bf16_supported)
    data = Pretraining(cfg, plan)
    if remote.urls_of(cfg.data):  # shards download while the engine starts
        data.prefetch = remote.Prefetch(cfg.data, progress=int(os.environ.get("RANK", "0")) == 0)
        data.prefetch.start()

    def ds_plan(rt: R.Runtime) -> DsPlan:
        # The process group exists now: check the checkpoint's files collectively (each rank its
        # own share) before anything is built from them; a fallback re-plans from an older one.
        nonlocal plan
        plan = data.plan = _intact_plan(plan, cfg, ds_path, rt, dev)
        return plan.ds

    run = R.build_run(dev, ds_plan, expect_world=plan.world, seed=cfg.run.seed, model=data.model,
                      objective=AlumObjective, alum=cfg.alum, optim=cfg.optim,
                      schedule=cfg.schedule, total_steps=plan.last_step,
                      cache=cache_dir(cfg.data.cache_dir),
                      activation_checkpointing=cfg.model.activation_checkpointing)
    if cfg.guard.enabled:
        G.install(run.engine)
    run.objective.reduce_sum = lambda t: D.all_reduce(t, "sum")  # keeps the delta table replicated
    stream = mixture.open_train_stream(cfg.data, data.dir, seed=cfg.data.seed, masking=cfg.masking)
    step = _load_checkpoint(plan, run, stream)
    log = MT.MetricsLogger(plan.run_dir, enabled=run.rt.rank == 0, tensorboard=cfg.logging.tensorboard,
                           total_steps=plan.last_step, resume_step=step, wandb=_wandb_args(cfg, plan))
    if run.rt.rank == 0:
        _write_resolved(plan.run_dir, cfg, plan.ds.config, data.dir,
                        {"model.pretrained": plan.pretrained} if plan.pretrained else {})
    _announce(cfg, plan, run, data, stream, log)
    loop = Loop(plan=plan, cfg=cfg, run=run, stream=stream, log=log, data_dir=data.dir,
                shape=data.shape, flops_per_token=data.flops_per_token,
                peak=MT.peak_flops(dev.model_name) * run.rt.world)
    return loop.run(step)


class Pretraining:
    """Pretraining's model on the started process: the prepared data it is built for (the
    embedded default prepared here), checked against the data and the checkpoint."""

    def __init__(self, cfg: RunConfig, plan: Plan) -> None:
        self.cfg, self.plan = cfg, plan
        self.dir = Path()
        self.manifest: dict[str, Any] = {}
        self.shape: dict[str, int] = {}
        self.flops_per_token = 0.0
        self.verified: dict[str, float] | None = None
        self.prefetch: remote.Prefetch | None = None
        self.fetched: dict[str, float] | None = None

    def model(self, rt: R.Runtime) -> torch.nn.Module:
        cfg, point = self.cfg, self.plan.point
        self.dir = resolve_data(cfg)
        if self.prefetch is not None:
            self.fetched = self.prefetch.wait()
        self.verified = verify_data([s.dir for s in mixture.sources_of(cfg.data)] or [self.dir], cfg, rt)
        self.manifest = read_manifest(self.dir)
        try:
            mlm = build_model(arch=cfg.model.arch, preset=cfg.model.preset,
                              vocab_size=int(self.manifest["tokenizer"]["vocab_size"]),
                              seq_len=cfg.data.seq_len, dropout=cfg.model.dropout,
                              pretrained=str(self.plan.pretrained.path) if self.plan.pretrained else "",
                              new_head=cfg.model.new_head,
                              activation_checkpointing=cfg.model.activation_checkpointing)
        except ValueError as e:  # a pretrained model that does not fit the data
            raise ConfigError(str(e)) from None
        check_vocab(self.dir, mlm.config.vocab_size,
                    padded_rows=PADDED_VOCAB_ROWS if cfg.model.pretrained else 0)
        self.shape = model_shape(mlm)
        self.flops_per_token = MT.flops_per_token(non_embedding_params(mlm), mlm.config.num_hidden_layers,
                                                  mlm.config.hidden_size, cfg.data.seq_len)
        if point and point.state.get("model_shape") not in (None, self.shape):
            raise ConfigError(f"checkpoint {point.path} holds a model of shape "
                              f"{point.state['model_shape']}, this run builds {self.shape}")
        return mlm


def _load_checkpoint(plan: Plan, run: R.Run, stream: TrainStream) -> int:
    """Load the checkpoint the plan resumes (or branches) from, if any; return its step."""
    if not plan.point:
        return 0
    load_root = _universal_root(plan, run.rt) if plan.universal else None
    C.load(run.engine, load_root or plan.point.root, plan.point.tag)
    run.objective.load_extra_state(C.read_extra(plan.point.root / plan.point.tag))
    stream.load_state_dict(plan.point.state["stream"])
    if load_root is not None:
        D.barrier()  # every rank has read the converted copy
        if run.rt.rank == 0:
            C.remove_universal(plan.run_dir)
    return plan.point.step


def _announce(cfg: RunConfig, plan: Plan, run: R.Run, data: Pretraining, stream: TrainStream,
              log: MT.MetricsLogger) -> None:
    b = plan.batching
    log.message(
        f"alum_ds: {run.banner()}, model "
        f"{plan.pretrained.describe() if plan.pretrained else cfg.model.arch + ' ' + cfg.model.preset} "
        f"({run.n_params / 1e6:.2f}M params{', new MLM head' if cfg.model.new_head else ''}), "
        f"{_alum_words(cfg.alum, plan.last_step)}, global batch {b.global_batch} "
        f"({b.micro_batch} x {b.accum} accumulation x {run.rt.world}), data "
        f"{_data_words(cfg, data.dir)} "
        f"({len(stream.seqs)} sequences/epoch), run {plan.run_dir}"
    )
    if data.fetched is not None:
        log.message(remote.describe(data.fetched))
    if data.verified is not None:
        log.message(integrity.describe(data.verified))
    if isinstance(stream, mixture.MixtureStream):
        log.message(stream.describe())
    _report_resume(plan, log)
    if cfg.model.new_head:
        log.message(f"warning: model.new_head=true: {type(run.model).__name__}'s MLM head is new, "
                    "initialised as that class initialises it (decoder tied to the word embeddings "
                    "where the family ties them); nothing of it comes from model.pretrained")
    if plan.ds.compile_note:
        log.message(plan.ds.compile_note)
    _check_tokenizer(cfg, plan, data.manifest, log)


def _data_words(cfg: RunConfig, folder: Path) -> str:
    return f"{cfg.data.dir} (mirrored in {folder})" if remote.is_url(cfg.data.dir) else str(folder)


def _intact_plan(plan: Plan, cfg: RunConfig, ds_path: str, rt: R.Runtime, dev: R.Device) -> Plan:
    """The plan with a checkpoint whose files match their recorded checksums: each rank checks its
    own share, collectively. A damaged checkpoint of the run's own folder is set aside for the
    newest intact one (said in one line); a damaged ``--resume`` or ``run.branch_from``
    checkpoint, or none intact, is refused (one line, nothing changed)."""
    damaged: list[tuple[str, str]] = []
    point = plan.point
    own = not plan.resume and not plan.branch
    while point is not None:
        problems = [p for p in C.gather_json(C.verify(point, rt.rank, rt.world), rt.device) if p]
        if not problems:
            break
        damaged.append((point.tag, problems[0]))
        older = [t for t in C.complete_tags(point.root) if t < point.tag] if own else []
        if not older:
            newer = f" (and so are the {len(damaged) - 1} newer ones)" if len(damaged) > 1 else ""
            fix = ("no older complete checkpoint is there: restore the file or use a new --run.dir"
                   if own else "resume from another checkpoint")
            raise ConfigError(f"checkpoint {point.path} is damaged: {problems[0]}{newer}; {fix}")
        point = C.ResumePoint(point.root, older[0], C.read_state(point.root / older[0]) or {})
    if not damaged:
        return plan
    assert point is not None
    if rt.rank == 0:
        C.set_aside(point.root, [t for t, _ in damaged], point.tag)
    D.barrier()
    new = plan_run(cfg, ds_path, resume="", world=plan.world, on_gpu=dev.on_gpu,
                   bf16_supported=dev.bf16_supported)
    assert new.point is not None and new.point.tag == point.tag
    new.point.note = "; ".join([*([plan.point.note] if plan.point and plan.point.note else []), *(
        f"checkpoint {t} is damaged ({why}), set aside as {t}{C.DAMAGED_SUFFIX}" for t, why in damaged)]
    ) + f": resuming from {point.tag}"
    return new


def _universal_root(plan: Plan, rt: R.Runtime) -> Path:
    """Rank 0 converts the checkpoint to a universal one; the others wait for it."""
    assert plan.point is not None
    error = ""
    if rt.rank == 0:
        try:
            C.convert_to_universal(plan.point, plan.run_dir)
        except (RuntimeError, OSError) as e:
            error = str(e)
    failed = D.all_reduce(torch.tensor([1.0 if error else 0.0], device=rt.device), "max").item() > 0
    if failed:
        raise RuntimeError(error or "rank 0 could not convert the checkpoint to a universal one")
    return C.checkpoint_dir(plan.run_dir) / C.UNIVERSAL_DIR


def _wandb_args(cfg: RunConfig, plan: Plan) -> dict[str, Any] | None:
    if not cfg.logging.wandb:
        return None
    # One W&B run per run folder and config: a resumed run appends to it.
    return {"project": cfg.logging.wandb_project, "name": plan.run_dir.name,
            "id": f"{plan.run_dir.name}-{cfg.fingerprint()}", "dir": str(plan.run_dir),
            "config": cfg.to_dict()}


def _report_resume(plan: Plan, log: MT.MetricsLogger) -> None:
    p, gb = plan.point, plan.batching.global_batch
    if p is None:
        return
    how = f" (universal: saved by {p.world_size} rank(s), now {plan.world})" if plan.universal else ""
    if p.note:
        log.message(f"warning: {p.note}")
    log.message(f"{'branched' if plan.branch else 'resumed'} from {p.path} at step {p.step}{how}")
    if plan.universal and 3 in (p.zero_stage, plan.ds.zero_stage):
        log.message("warning: DeepSpeed's universal load under ZeRO-3 restores the optimizer only "
                    "approximately (measured: the loss drifts ~1e-3 relative within 2 steps); "
                    "ZeRO-1/2 resume exactly")
    if p.state.get("global_batch", gb) != gb:
        log.message(f"warning: the global batch changes from {p.state['global_batch']} to "
                    f"{gb} sequences; set schedule.global_batch_size to keep it")


def _check_tokenizer(cfg: RunConfig, plan: Plan, manifest: dict[str, Any], log: MT.MetricsLogger) -> None:
    if plan.pretrained is None:
        return
    tj = plan.pretrained.path / "tokenizer.json"
    if tj.is_file() and sha256_file(tj)[:16] != manifest["tokenizer"].get("fingerprint"):
        log.message(f"warning: the data's tokenizer differs from {tj}; prepare the data with "
                    f"`alum-ds prepare --tokenizer {cfg.model.pretrained}`")


def model_shape(mlm: torch.nn.Module) -> dict[str, int]:
    c = mlm.config
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads, "positions": c.max_position_embeddings}


class Loop:
    """The steps of one invocation; logging, evaluation, stopping and saving each on its cadence."""

    def __init__(self, *, plan: Plan, cfg: RunConfig, run: R.Run, stream: TrainStream,
                 log: MT.MetricsLogger, data_dir: Path, shape: dict[str, int],
                 flops_per_token: float, peak: float) -> None:
        self.plan, self.cfg, self.batching = plan, cfg, plan.batching
        self.engine, self.objective, self.stream, self.log = run.engine, run.objective, stream, log
        self.device, self.data_dir, self.on_gpu, self.shape = run.rt.device, data_dir, run.rt.on_gpu, shape
        self.fpt, self.peak = flops_per_token, peak
        self.rank, self.world = run.rt.rank, run.rt.world
        self.window = MT.StepWindow(run.rt.device)
        self.guard = G.Guard(cfg.guard, run.rt.device, count_grad_skips=plan.ds.precision != "fp16")
        if plan.point is not None and not plan.branch:
            self.guard.load_state_dict(plan.point.state.get("guard", {}))
        self.sink = G.Tee(self.window, self.guard)
        # With the guard on, a non-finite window is its business (a skipped step), not an error.
        self.steps = MT.StepLogger(log, self.window, all_reduce=D.all_reduce, world=self.world,
                                   alpha=cfg.alum.alpha, task="mlm", compiled=plan.ds.compile,
                                   stop_on_nonfinite=not cfg.guard.enabled)
        if isinstance(stream, mixture.MixtureStream):
            self.validator: Validator = MixtureValidator(self.engine, cfg, stream, device=self.device,
                                                         rank=self.rank, world=self.world, log=log)
        else:
            self.validator = Validator(self.engine, cfg, data_dir, device=self.device, rank=self.rank,
                                       world=self.world, log=log)
        self._logged_consumed = stream.state.consumed
        last = plan.last_step
        self.log_every = Every(cfg.logging.every, last, final=True)
        self.eval_every = Every(cfg.eval.every, last, final=False)
        self.save_every = Every(cfg.checkpoint.every, last)

    def run(self, step: int) -> Path:
        last, alum_start = self.plan.last_step, self.cfg.alum.start_for(self.plan.last_step)
        stop = StopAfter(self.cfg.run.stop_after, step, last)
        signals, preempted = Signals(), False
        self.engine.train()
        try:
            while True:
                if step >= last:
                    if not self.save(step):  # the last step triggered the divergence policy
                        step = self.recover(step)
                        continue
                    return self.finish(step)
                alum_on = self.cfg.alum.on_at(step, alum_start)
                status = self.train_step(alum_on, signals.requested, step)
                if status == "diverged":
                    step = self.recover(step)
                    continue
                if status == "signalled":
                    self.preempt(step)
                step += 1
                self.steps.step_done()
                if self.log_every.due(step):
                    self.log_step(step, alum_on)
                if self.eval_every.due(step):
                    self.validator.run(step)
                if stop.due(step):
                    if not self.save(step):
                        step = self.recover(step)
                        continue
                    return self.stop(step)
                if self.save_every.due(step) and not self.save(step):
                    step = self.recover(step)
        except Preempted:
            preempted = True
            raise
        finally:
            signals.ignore() if preempted else signals.restore()
            self.log.close()

    def train_step(self, alum_on: bool, signalled: bool, step: int) -> str:
        """Optimizer step ``step + 1``, of ``accum`` micro-steps: "ok"; or, untrained and with the
        stream unmoved, "signalled" when any rank has been signalled, "diverged" when the guard's
        verdict on step ``step`` calls for its policy. Both decisions are collective, carried by
        the step's one small all-reduce (with the guard's values of step ``step``)."""
        mb, accum = self.batching.micro_batch, self.batching.accum
        start = self.stream.state.consumed
        batches = []
        for _ in range(accum):
            position = self.stream.state.consumed + self.rank * mb
            batches.append((position, self.stream.next_for_rank(rank=self.rank, world=self.world,
                                                                 micro_batch=mb)))
        local = sum(int((y != -100).sum()) for _, (_, y) in batches)
        # The gradient is normalised by the masked tokens of the entire optimizer step, so
        # 2 x b accumulated equals 2b at once.
        reduced = D.all_reduce(torch.cat([
            torch.tensor([float(local), float(signalled)], device=self.device), self.guard.payload()]),
            "sum").tolist()
        masked, stop = reduced[:2]
        verdict = self.guard.judge(reduced[2:])
        self.report(verdict)
        if stop or (verdict is not None and verdict.trigger):
            self.stream.state.consumed = start
            return "signalled" if stop else "diverged"
        weight = self.world * accum / max(masked, 1.0)
        skipped_before = self.engine.skipped_steps
        R.run_micro_steps(self.engine, self.sink, self.cfg.run.seed, (
            R.MicroBatch(position, torch.from_numpy(x).to(self.device),
                         torch.from_numpy(y).to(self.device), alum_on, token_weight=weight)
            for position, (x, y) in batches))
        self.guard.stepped(step + 1, self.engine, skipped_before)
        return "ok"

    def report(self, v: G.Verdict | None) -> None:
        if v is None or (math.isfinite(v.loss) and not v.skipped):
            return
        what = "loss" if not math.isfinite(v.loss) else "gradient norm"
        done = "no optimizer update" if v.skipped else "the update was applied (finite gradients)"
        self.log.message(f"warning: step {v.step}: non-finite {what}: {done} "
                         f"({self.guard.nonfinite_run} in a row, {self.guard.skipped_total} skipped in all)")

    def recover(self, step: int) -> int:
        """The policy after a trigger at ``step``: stop (``Diverged``), or reload the newest intact
        checkpoint of this run and continue from it with the stream where it is now, so the
        window of data since that checkpoint is skipped. Returns the step to continue from."""
        g = self.cfg.guard
        why = self.guard.last_trigger
        root = C.checkpoint_dir(self.plan.run_dir)
        latest = C.read_latest(root)
        keep = (f"checkpoints/latest names {latest}, the newest healthy checkpoint" if latest
                else "no checkpoint was saved")
        if g.action == "stop" or self.guard.rollbacks >= g.max_rollbacks:
            limit = ("" if g.action == "stop"
                     else f" after {self.guard.rollbacks} rollback(s) (guard.max_rollbacks)")
            raise G.Diverged(f"training diverged at step {step}: {why}; stopped{limit}; {keep}: "
                             f"rerun with a lower --optim.lr or a longer warm-up")
        point = None
        for tag in C.complete_tags(root):
            candidate = C.ResumePoint(root, tag, C.read_state(root / tag) or {})
            if candidate.state.get("world_size") != self.world:
                break  # saved by another number of ranks: it needs a universal load
            problems = [p for p in C.gather_json(C.verify(candidate, self.rank, self.world),
                                                 self.device) if p]
            if not problems:
                point = candidate
                break
            self.log.message(f"warning: checkpoint {candidate.path} is damaged ({problems[0]}); "
                             "trying an older one")
        if point is None:
            raise G.Diverged(f"training diverged at step {step}: {why}; no intact checkpoint of this run "
                             "(on these ranks) to roll back to: rerun with a lower --optim.lr or a "
                             "longer warm-up")
        C.load(self.engine, point.root, point.tag)
        self.objective.load_extra_state(C.read_extra(point.root / point.tag))
        since, now = int(point.state["stream"]["consumed"]), self.stream.state.consumed
        self.guard.reset()
        self.guard.rollbacks += 1
        self.window.sum.zero_()
        self.steps.t_last, self.steps.steps = time.time(), 0
        self.log.rewind(point.step)
        self.log.log(point.step, {"guard_rollback_from": step, "guard_skipped_sequences": now - since})
        self.log.message(f"guard: {why}: rolled back to {point.path} (step {point.step}) and skipped "
                         f"the {now - since:,} sequences seen since it (rollback {self.guard.rollbacks} "
                         f"of guard.max_rollbacks={g.max_rollbacks})")
        return point.step

    def log_step(self, step: int, alum_on: bool) -> None:
        self.steps.flush(step, alum_on=alum_on, engine=self.engine,
                         skipped_total=self.objective.skipped_total,
                         extra=lambda r, steps, seconds: self.throughput(alum_on, steps, seconds))

    def guard_values(self) -> dict[str, Any]:
        return {"skipped_steps_total": self.guard.skipped_total} if self.guard.cfg.enabled else {}

    def throughput(self, alum_on: bool, steps: int, seconds: float) -> dict[str, Any]:
        """Tokens/s, MFU, the stream's position and peak memory of a logging window."""
        cfg = self.cfg
        mem = D.all_reduce(torch.tensor(MT.peak_memory_gb(self.on_gpu), device=self.device), "max").tolist()
        tps = self.batching.global_batch * cfg.data.seq_len * steps / max(seconds, 1e-9)
        ascents = 0 if cfg.alum.perturbation != "adversarial" else cfg.alum.ascent_steps  # no ascent pass
        passes = MT.forward_equivalents(alum_on, ascents)
        values = {
            "tokens_per_s": tps, "sequences_per_s": tps / cfg.data.seq_len,
            "step_time_s": seconds / steps,
            "mfu": tps * self.fpt * passes / 3.0 / self.peak if self.peak == self.peak else None,
            "alum_on": alum_on, "consumed_sequences": self.stream.state.consumed,
            "consumed_tokens": self.stream.state.consumed * cfg.data.seq_len, "epoch": self.stream.epoch,
            "peak_rss_gb": mem[0],
        }
        if self.on_gpu:
            values["max_memory_gb"] = mem[1]
        if isinstance(self.stream, mixture.MixtureStream):
            values.update(self.stream.log_values())
            for line in self.stream.new_epochs(self._logged_consumed):
                self.log.message(f"{line} (by sequence {self.stream.state.consumed:,} of the mixture)")
        self._logged_consumed = self.stream.state.consumed
        values.update(self.guard_values())
        return values

    def preempt(self, step: int) -> None:
        root = C.checkpoint_dir(self.plan.run_dir)
        saved = self.save(step) and C.read_latest(root) == C.tag_for(step)
        self.log.message(f"stopped by signal after {'saving' if saved else 'not saving'} step {step}; "
                         f"rerun to resume (exit code {EXIT_PREEMPTED})")
        raise Preempted()

    def stop(self, step: int) -> Path:
        self.save(step)
        self.log.message(f"run.stop_after: stopped after saving step {step}; rerun to continue")
        self.log.message(f"run folder: {self.plan.run_dir.resolve()}")
        return self.plan.run_dir

    def finish(self, step: int) -> Path:
        """The end of the run: the last save, the final evaluation, the summary and showcase."""
        cfg, last = self.cfg, self.plan.last_step
        if cfg.schedule.max_tokens and last < cfg.schedule.steps:
            self.log.message(f"token budget of {cfg.schedule.max_tokens:,} reached at step {last}")
        ev = self.validator.run(step, final=True)
        _write_summary(self.plan.run_dir, self.rank, step, ev, self.engine)
        if cfg.eval.fill_mask and self.rank == 0:
            show_fill_mask(self.plan.run_dir, self.data_dir, cfg, self.log)
        self.log.message(f"run folder: {self.plan.run_dir.resolve()}")
        return self.plan.run_dir

    def save(self, step: int) -> bool:
        """Save step ``step`` (a no-op where `latest` already names it) if the model is finite and
        the recent loss healthy. Settles the guard's pending step first (one all-reduce, with the
        finiteness of every rank's parameters); False, nothing saved, when that step triggers the
        divergence policy."""
        cfg, stream, b = self.cfg, self.stream, self.batching
        if self.guard.cfg.enabled:
            reduced = D.all_reduce(torch.cat([self.guard.payload(),
                                              G.params_finite(self.engine.module).to(self.device)]),
                                   "sum").tolist()
            verdict = self.guard.judge(reduced[:2])
            self.report(verdict)
            if verdict is not None and verdict.trigger:
                return False
            why = self.guard.healthy() or ("" if reduced[2] >= self.world
                                           else "the model has non-finite parameters")
            if why:
                latest = C.read_latest(C.checkpoint_dir(self.plan.run_dir))
                self.log.message(f"guard: step {step} not saved: {why}; checkpoints/latest stays "
                                 f"{latest or 'unset'}")
                return True
        state = {"step": step, "world_size": self.world, "zero_stage": self.plan.ds.zero_stage,
                 "global_batch": b.global_batch, "micro_batch_size": b.micro_batch,
                 "grad_accum": b.accum, "stream": stream.state_dict(),
                 "consumed_tokens": stream.state.consumed * cfg.data.seq_len,
                 "config_hash": cfg.fingerprint(), "config": cfg.to_dict(), "model_shape": self.shape,
                 "data_dir": str(self.data_dir.resolve()), "guard": self.guard.state_dict()}
        C.save(self.engine, self.plan.run_dir, step, state, cfg.checkpoint.keep,
               extra=self.objective.extra_state())
        return True


def _check_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """A run folder this run may write: a folder (or one it can create), of no other run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir {run_dir} is a file, not a folder: choose another --run.dir")
    parent = next(p for p in (run_dir.absolute(), *run_dir.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "not a folder" if not parent.is_dir() else "not writable"
        raise ConfigError(f"run.dir {run_dir}: {parent} is {what}, so the run folder cannot be "
                          "written there: choose another --run.dir")
    resolved = run_dir / "config.resolved.json"
    if not (resolved.exists() or resolved.is_symlink()):
        return
    try:
        old = json.loads(resolved.read_text()).get("config_hash")
        damage = "" if isinstance(old, str) and old else "no config_hash"
    except (OSError, ValueError, AttributeError) as e:  # unreadable, not UTF-8 or JSON, not an object
        damage = type(e).__name__
    if damage:
        raise ConfigError(
            f"run folder {run_dir}: {resolved.name} is damaged ({damage}), so the run the folder "
            f"holds is unknown: choose another --run.dir, or delete {resolved} if the folder holds "
            "this run's config; nothing was changed"
        )
    if old != cfg.fingerprint():
        raise ConfigError(
            f"run folder {run_dir} holds another run (config hash {old}, this run "
            f"{cfg.fingerprint()}): choose another --run.dir; nothing was changed"
        )


def _write_resolved(run_dir: Path, cfg: RunConfig, ds: dict, data_dir: Path,
                    sources: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # "sources": the Hub commits the run read (outside the hash: a rerun of the same command
    # resumes, and keeps those commits).
    doc = {"config_hash": cfg.fingerprint(), "config": cfg.to_dict(), "deepspeed": ds,
           "data_dir": str(data_dir), "sources": hub.sources_record(sources)}
    tmp = run_dir / "config.resolved.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, run_dir / "config.resolved.json")


def _write_summary(run_dir: Path, rank: int, step: int, eval_loss: float, engine: Any) -> None:
    """Per-rank summary; the parameter checksum shows the ranks hold the same model."""
    with D.gathered(engine.module):
        checksum = float(sum(p.detach().double().sum() for p in engine.module.parameters()))
    out = {"step": step, "eval_loss": eval_loss, "param_checksum": checksum}
    (run_dir / f"summary.rank{rank}.json").write_text(records.dumps(out))


__all__ = ["train", "plan_run", "EXIT_PREEMPTED", "Signals"]
