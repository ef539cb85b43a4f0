"""The training loop: plan, build, initialise DeepSpeed, step, log, evaluate, checkpoint.

``train`` reads top to bottom: everything that can be refused is decided from the config, the
DeepSpeed JSON and the checkpoint's JSON state before a process group or model exists (so a bad
input is a one-line error that changes nothing); then the engine is built, the checkpoint (if
any) loaded, and ``Loop`` runs the steps with the cadence of logging, evaluation and saving.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alum_ds import checkpoint as C
from alum_ds import compiling
from alum_ds import distributed as D
from alum_ds import metrics as MT
from alum_ds import runtime as R
from alum_ds.config import AlumConfig, ConfigError, RunConfig, for_world
from alum_ds.data.prepare import ensure_embedded
from alum_ds.data.shards import check_vocab, read_manifest, sha256_file
from alum_ds.data.stream import TrainStream, check_splits, validation_batches
from alum_ds.ds_config import precision_of, resolve_ds_config, resolve_ds_path, zero_stage_of
from alum_ds.model import PADDED_VOCAB_ROWS, build_model, non_embedding_params
from alum_ds.objective import AlumObjective
from alum_ds.optim import planned_steps

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerun to resume


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


def resolve_data(cfg: RunConfig) -> Path:
    """The prepared data folder; the embedded default is prepared by one rank per node."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    cache = R.cache_dir(cfg.data.cache_dir)
    if D.local_rank() == 0:
        out = ensure_embedded(cache, vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    D.barrier()
    if D.local_rank() != 0:
        out = ensure_embedded(cache, vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    return out


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

    cfg: RunConfig  # schedule.grad_accum resolved for this world size
    ds: dict[str, Any]
    world: int
    run_dir: Path
    point: C.ResumePoint | None
    universal: bool
    global_batch: int
    last_step: int
    branch: bool = False
    """``point`` is another run's checkpoint this run starts from (``run.branch_from``)."""
    compile: bool = False
    compile_note: str = ""


def plan_run(cfg: RunConfig, ds_path: str, *, resume: str, world: int, on_gpu: bool,
             bf16_supported: bool) -> Plan:
    """Every refusal that needs no engine: a run folder of another run, a global batch the ranks
    cannot divide, a checkpoint of another config or model shape, a missing optional package."""
    run_dir = Path(cfg.run.dir)
    _check_run_dir(run_dir, cfg)
    if cfg.data.dir:  # the embedded default is prepared later, by the ranks
        check_splits(cfg.data.dir, cfg.data.seq_len)
    ecfg = for_world(cfg, world)
    ds = resolve_ds_config(ds_path, ecfg, world_size=world, bf16_supported=bf16_supported, on_gpu=on_gpu)
    gb = ecfg.schedule.micro_batch_size * ecfg.schedule.grad_accum * world
    total = planned_steps(cfg, gb)
    point = C.find_resume(run_dir, resume)
    branch = point is None and bool(cfg.run.branch_from)
    if branch:
        point = C.find_resume(run_dir, cfg.run.branch_from, option="run.branch_from")
    universal = point is not None and C.check_resume(point, cfg, world=world, zero_stage=zero_stage_of(ds),
                                                     branch=branch, total_steps=total)
    if universal:
        section = ds.setdefault("checkpoint", {})
        if not isinstance(section, dict):
            raise ConfigError(f"DeepSpeed config {ds_path}: checkpoint must be an object")
        section["load_universal"] = True
    if cfg.logging.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb=true needs the wandb package (pip install wandb), which "
                          "is not installed")
    if cfg.model.pretrained:
        from alum_ds.arch import check_mlm_folder

        try:  # a supported family with an MLM head, from config.json alone
            check_mlm_folder(cfg.model.pretrained)
        except ValueError as e:
            raise ConfigError(f"model.pretrained {e}") from None
    compiled, note = R.compile_plan(ds, on_gpu)
    return Plan(ecfg, ds, world, run_dir, point, universal, gb, total, branch,
                compiled, note)


def _alum_words(alum: AlumConfig, total: int) -> str:
    start = alum.start_for(total)
    if not alum.enabled or start >= total:
        return "ALUM off" if not alum.enabled else f"ALUM never on (starts at step {start} of {total})"
    return "ALUM on" if start == 0 else f"plain MLM to step {start}, then ALUM (of {total} steps)"


def train(cfg: RunConfig, ds_path: str, *, resume: str = "", check: bool = False) -> Path:
    """Run (or continue) training; return the run folder. ``check``: only plan the run (every
    refusal that needs no process group, model or engine), say what it would do, write nothing."""
    dev = R.detect()
    plan = plan_run(cfg, ds_path, resume=resume, world=int(os.environ.get("WORLD_SIZE", "1")),
                    on_gpu=dev.on_gpu, bf16_supported=dev.bf16_supported)
    if check:
        start = f"resumes at step {plan.point.step}" if plan.point else "a new run"
        print(f"alum-ds: check passed: run folder {plan.run_dir} ({start}), ZeRO-"
              f"{zero_stage_of(plan.ds)}, {precision_of(plan.ds)}, global batch {plan.global_batch}, "
              f"{plan.last_step} steps, {_alum_words(cfg.alum, plan.last_step)}; nothing was written")
        return plan.run_dir
    rt = R.start(dev, expect_world=plan.world)
    data_dir = resolve_data(cfg)
    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])

    R.tune_host(rt, plan.ds)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    try:
        mlm = build_model(arch=cfg.model.arch, preset=cfg.model.preset, vocab_size=vocab,
                          seq_len=cfg.data.seq_len, dropout=cfg.model.dropout,
                          pretrained=cfg.model.pretrained,
                          activation_checkpointing=cfg.model.activation_checkpointing)
    except ValueError as e:  # a pretrained model that does not fit the data
        raise ConfigError(str(e)) from None
    R.adapt_model(rt, mlm)
    if plan.compile:
        R.compile_model(mlm, plan.ds, R.cache_dir(cfg.data.cache_dir))
    check_vocab(data_dir, mlm.config.vocab_size,
                padded_rows=PADDED_VOCAB_ROWS if cfg.model.pretrained else 0)
    shape = model_shape(mlm)
    n_params = sum(p.numel() for p in mlm.parameters())  # before ZeRO-3 partitions them
    fpt = MT.flops_per_token(non_embedding_params(mlm), mlm.config.num_hidden_layers,
                             mlm.config.hidden_size, cfg.data.seq_len)
    if plan.point and plan.point.state.get("model_shape") not in (None, shape):
        raise ConfigError(f"checkpoint {plan.point.path} holds a model of shape "
                          f"{plan.point.state['model_shape']}, this run builds {shape}")
    objective = AlumObjective(mlm, cfg.alum, any_rank=rt.any_rank(),
                              freeze_ascent=plan.compile and not cfg.model.activation_checkpointing)
    load_root = _universal_root(plan, rt) if plan.universal else None
    engine = R.build_engine(objective, optim=cfg.optim, schedule=plan.cfg.schedule, ds=plan.ds,
                            total_steps=plan.last_step, on_gpu=rt.on_gpu)
    stream = TrainStream(data_dir, seq_len=cfg.data.seq_len, seed=cfg.data.seed, masking=cfg.masking)
    step = 0
    if plan.point:
        C.load(engine, load_root or plan.point.root, plan.point.tag)
        stream.load_state_dict(plan.point.state["stream"])
        step = plan.point.step
        if load_root is not None:
            D.barrier()  # every rank has read the converted copy
            if rt.rank == 0:
                C.remove_universal(plan.run_dir)

    log = MT.MetricsLogger(plan.run_dir, enabled=rt.rank == 0, tensorboard=cfg.logging.tensorboard,
                           total_steps=plan.last_step, resume_step=step, wandb=_wandb_args(cfg, plan))
    if rt.rank == 0:
        _write_resolved(plan.run_dir, cfg, plan.ds, data_dir)
    sc = plan.cfg.schedule
    log.message(
        f"alum_ds: {rt.world} rank(s) on {dev.name}, ZeRO-{zero_stage_of(plan.ds)}, "
        f"{precision_of(plan.ds)}{', compiled' if plan.compile else ''} (DeepSpeed config "
        f"{resolve_ds_path(ds_path)}), model "
        f"{cfg.model.pretrained or cfg.model.arch + ' ' + cfg.model.preset} "
        f"({n_params / 1e6:.2f}M params), "
        f"{_alum_words(cfg.alum, plan.last_step)}, global batch {plan.global_batch} "
        f"({sc.micro_batch_size} x {sc.grad_accum} accumulation x {rt.world}), data {data_dir} "
        f"({len(stream.seqs)} sequences/epoch), run {plan.run_dir}"
    )
    _report_resume(plan, log)
    if plan.compile_note:
        log.message(plan.compile_note)
    _check_tokenizer(cfg, manifest, log)
    loop = Loop(plan=plan, user_cfg=cfg, engine=engine, objective=objective, stream=stream, log=log,
                rt=rt, data_dir=data_dir, shape=shape, flops_per_token=fpt,
                peak=MT.peak_flops(dev.model_name) * rt.world)
    return loop.run(step)


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
    p = plan.point
    if p is None:
        return
    how = f" (universal: saved by {p.world_size} rank(s), now {plan.world})" if plan.universal else ""
    log.message(f"{'branched' if plan.branch else 'resumed'} from {p.path} at step {p.step}{how}")
    if plan.universal and 3 in (p.zero_stage, zero_stage_of(plan.ds)):
        log.message("warning: DeepSpeed's universal load under ZeRO-3 restores the optimizer only "
                    "approximately (measured: the loss drifts ~1e-3 relative within 2 steps); "
                    "ZeRO-1/2 resume exactly")
    if p.state.get("global_batch", plan.global_batch) != plan.global_batch:
        log.message(f"warning: the global batch changes from {p.state['global_batch']} to "
                    f"{plan.global_batch} sequences; set schedule.global_batch_size to keep it")


def _check_tokenizer(cfg: RunConfig, manifest: dict[str, Any], log: MT.MetricsLogger) -> None:
    if not cfg.model.pretrained:
        return
    tj = Path(cfg.model.pretrained) / "tokenizer.json"
    if tj.is_file() and sha256_file(tj)[:16] != manifest["tokenizer"].get("fingerprint"):
        log.message(f"warning: the data's tokenizer differs from {tj}; prepare the data with "
                    f"`alum-ds prepare --tokenizer {cfg.model.pretrained}`")


def model_shape(mlm: torch.nn.Module) -> dict[str, int]:
    c = mlm.config
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads, "positions": c.max_position_embeddings}


class Loop:
    """The steps of one invocation and their cadence: log, evaluate, save, stop."""

    def __init__(self, *, plan: Plan, user_cfg: RunConfig, engine: Any, objective: AlumObjective,
                 stream: TrainStream, log: MT.MetricsLogger, rt: R.Runtime, data_dir: Path,
                 shape: dict[str, int], flops_per_token: float, peak: float) -> None:
        self.plan, self.user_cfg, self.cfg = plan, user_cfg, plan.cfg
        self.engine, self.objective, self.stream, self.log = engine, objective, stream, log
        self.device, self.data_dir, self.on_gpu, self.shape = rt.device, data_dir, rt.on_gpu, shape
        self.fpt, self.peak = flops_per_token, peak
        self.rank, self.world = rt.rank, rt.world
        self.window = MT.StepWindow(rt.device)
        self._unigram: float | None = None
        self.compile_clock = compiling.Clock() if plan.compile else None

    def run(self, step: int) -> Path:
        cfg, last = self.cfg, self.plan.last_step
        alum_start = cfg.alum.start_for(last)
        first = step
        signals = Signals()
        t_last, since = time.time(), 0
        preempted = False
        self.engine.train()
        try:
            while step < last:
                alum_on = cfg.alum.enabled and step >= alum_start
                if not self.train_step(alum_on, signals.requested):
                    self.save(step)
                    self.log.message(f"stopped by signal after saving step {step}; rerun to resume "
                                     f"(exit code {EXIT_PREEMPTED})")
                    raise Preempted()
                step, since = step + 1, since + 1
                if step % cfg.logging.every == 0 or step == last:
                    self.log_step(step, alum_on, since, time.time() - t_last - self.compile_time(step))
                    t_last, since = time.time(), 0
                if cfg.eval.every and step % cfg.eval.every == 0 and step < last:
                    self.evaluate_and_log(step)
                if cfg.run.stop_after and step - first >= cfg.run.stop_after and step < last:
                    self.save(step)
                    self.log.message(f"run.stop_after: stopped after saving step {step}; rerun to continue")
                    self.log.message(f"run folder: {self.plan.run_dir.resolve()}")
                    return self.plan.run_dir
                if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                    self.save(step)
            self.save(step)  # a no-op where `latest` already names this step
            if cfg.schedule.max_tokens and last < cfg.schedule.steps:
                self.log.message(f"token budget of {cfg.schedule.max_tokens:,} reached at step {last}")
            ev = self.evaluate_and_log(step)
            _write_summary(self.plan.run_dir, self.rank, step, ev, self.engine)
            if self.cfg.eval.fill_mask and self.rank == 0:
                self.show_what_it_learned()
            self.log.message(f"run folder: {self.plan.run_dir.resolve()}")
            return self.plan.run_dir
        except Preempted:
            preempted = True
            raise
        finally:
            signals.ignore() if preempted else signals.restore()
            self.log.close()

    def train_step(self, alum_on: bool, signalled: bool) -> bool:
        """One optimizer step of ``grad_accum`` micro-steps. Returns False, untrained and with the
        stream unmoved, when any rank has been signalled: the decision is collective, carried by
        the step's one small all-reduce."""
        mb, accum = self.cfg.schedule.micro_batch_size, self.cfg.schedule.grad_accum
        start = self.stream.state.consumed
        batches = []
        for _ in range(accum):
            position = self.stream.state.consumed + self.rank * mb
            batches.append((position, self.stream.next_for_rank(rank=self.rank, world=self.world,
                                                                 micro_batch=mb)))
        local = sum(int((y != -100).sum()) for _, (_, y) in batches)
        # The gradient is normalised by the masked tokens of the entire optimizer step, so
        # 2 x b accumulated equals 2b at once.
        masked, stop = D.all_reduce(torch.tensor([float(local), float(signalled)], device=self.device),
                                    "sum").tolist()
        if stop:
            self.stream.state.consumed = start
            return False
        weight = self.world * accum / max(masked, 1.0)
        R.run_micro_steps(self.engine, self.window, self.cfg.run.seed, (
            (position, (torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device),
                        alum_on, weight), {})
            for position, (x, y) in batches))
        return True

    def compile_time(self, step: int) -> float:
        """Seconds compiled since the last window, reported on their own line (and as
        ``compile_seconds``, ``graphs_compiled``), left out of the window's step times."""
        spent = self.compile_clock.take() if self.compile_clock is not None else 0.0
        if spent:
            graphs = compiling.graphs_compiled()
            self.log.log(step, {"compile_seconds": spent, "graphs_compiled": graphs})
            self.log.message(f"compiled {graphs} graph(s) so far, {spent:.1f} s before step {step} "
                             "(not counted in step times)")
        return spent

    def log_step(self, step: int, alum_on: bool, steps: int, seconds: float) -> None:
        cfg = self.cfg
        r = self.window.reduce(D.all_reduce, self.world, cfg.alum.alpha)
        mem = D.all_reduce(torch.tensor(MT.peak_memory_gb(self.on_gpu), device=self.device), "max").tolist()
        tps = self.plan.global_batch * cfg.data.seq_len * steps / max(seconds, 1e-9)
        ascents = 0 if cfg.alum.perturbation == "random" else cfg.alum.ascent_steps  # no pass in the control
        passes = MT.forward_equivalents(alum_on, ascents)
        values = MT.window_values(r, task="mlm", alum_on=alum_on, engine=self.engine,
                                  skipped_total=self.objective.skipped_total)
        values.update({
            "tokens_per_s": tps, "sequences_per_s": tps / cfg.data.seq_len,
            "step_time_s": seconds / steps,
            "mfu": tps * self.fpt * passes / 3.0 / self.peak if self.peak == self.peak else None,
            "alum_on": alum_on, "consumed_sequences": self.stream.state.consumed,
            "consumed_tokens": self.stream.state.consumed * cfg.data.seq_len, "epoch": self.stream.epoch,
            "peak_rss_gb": mem[0],
        })
        if self.on_gpu:
            values["max_memory_gb"] = mem[1]
        self.log.window(step, values, r["adv_skipped"])

    def evaluate_and_log(self, step: int) -> float:
        ev = evaluate(self.engine, self.cfg, self.data_dir, self.device, self.rank, self.world,
                      max_sequences=self.cfg.eval.max_sequences)
        ppl = math.exp(min(ev, 50))
        line = self.unigram_line()
        self.log.log(step, {"eval_loss": ev, "eval_perplexity": ppl, "unigram_loss": line})
        gap = line - ev
        self.log.message(f"eval at step {step}: masked-LM loss {ev:.4f}, perplexity {ppl:.2f}; a model "
                         f"of token frequencies alone: {line:.4f} (the run is {abs(gap):.2f} nats "
                         f"{'below' if gap >= 0 else 'above'} it)")
        return ev

    def unigram_line(self) -> float:
        """The eval loss a model of token frequencies alone reaches on the same targets (rank 0
        computes it once: counting the training tokens is a bincount over the shards)."""
        if self._unigram is None and self.rank == 0:
            from alum_ds.data.unigram import unigram_line

            self._unigram = unigram_line(self.data_dir, seq_len=self.cfg.data.seq_len,
                                         seed=self.cfg.data.seed, masking=self.cfg.masking,
                                         max_sequences=self.cfg.eval.max_sequences).eval_nats
        return self._unigram if self._unigram is not None else math.nan

    def show_what_it_learned(self) -> None:
        """Rank 0: export the run's last checkpoint (as ``alum-ds export`` does) into a scratch
        folder and print the fill-mask answers for ``eval.fill_mask`` held-out sentences."""
        import numpy

        from alum_ds import showcase
        from alum_ds.data.tokenizer import load_tokenizer
        from alum_ds.data.unigram import token_counts, unigram_log_probs
        from alum_ds.export import export

        examples = showcase.masked_examples(self.data_dir, load_tokenizer(self.data_dir / "tokenizer"),
                                            self.cfg.eval.fill_mask, seq_len=self.cfg.data.seq_len)
        if not examples:
            return
        scratch = self.plan.run_dir / "fill_mask.tmp"
        try:
            # DeepSpeed's consolidation prints, and draws a bar for two shards.
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                folder = export(str(self.plan.run_dir), str(scratch))
            # The model of token frequencies that the unigram line is the loss of.
            frequencies = numpy.exp(unigram_log_probs(token_counts(self.data_dir)))
            results = showcase.fill_mask(folder, examples, token_probs=frequencies)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        (self.plan.run_dir / "fill_mask.json").write_text(json.dumps(results, indent=1))
        self.log.message("held-out sentences, one word masked (fill-mask on the exported model):\n"
                         + "\n".join(showcase.lines(results)))

    def save(self, step: int) -> None:
        cfg, stream = self.user_cfg, self.stream
        state = {"step": step, "world_size": self.world, "zero_stage": zero_stage_of(self.plan.ds),
                 "global_batch": self.plan.global_batch,
                 "micro_batch_size": self.cfg.schedule.micro_batch_size,
                 "grad_accum": self.cfg.schedule.grad_accum, "stream": stream.state_dict(),
                 "consumed_tokens": stream.state.consumed * cfg.data.seq_len,
                 "config_hash": cfg.fingerprint(), "config": cfg.to_dict(), "model_shape": self.shape,
                 "data_dir": str(self.data_dir.resolve())}
        C.save(self.engine, self.plan.run_dir, step, state, cfg.checkpoint.keep)


def evaluate(engine: Any, cfg: RunConfig, data_dir: Path, device: torch.device, rank: int,
             world: int, max_sequences: int = 512) -> float:
    """Masked-LM loss on the held-out split, token-weighted, reduced over ranks."""
    batches = validation_batches(data_dir, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                                 masking=cfg.masking, batch=cfg.schedule.micro_batch_size,
                                 rank=rank, world=world, max_sequences=max_sequences)
    # Every rank must run the same number of forwards (ZeRO-3 gathers collectively).
    n = torch.tensor([float(len(batches))], device=device)
    n_max = int(D.all_reduce(n, "max").item())
    total = torch.zeros(2, dtype=torch.float64)
    engine.eval()
    with torch.no_grad():
        for i in range(n_max):
            x, y = batches[i] if i < len(batches) else batches[0]
            loss, st = engine(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), False)
            if i < len(batches):
                total += torch.tensor([float(loss) * st["rows"], st["rows"]],
                                      dtype=torch.float64)
    engine.train()
    total = D.all_reduce(total.to(device), "sum").cpu()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


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


def _write_resolved(run_dir: Path, cfg: RunConfig, ds: dict, data_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    doc = {"config_hash": cfg.fingerprint(), "config": cfg.to_dict(), "deepspeed": ds,
           "data_dir": str(data_dir)}
    tmp = run_dir / "config.resolved.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, run_dir / "config.resolved.json")


def _write_summary(run_dir: Path, rank: int, step: int, eval_loss: float, engine: Any) -> None:
    """Per-rank summary; the parameter checksum shows the ranks hold the same model."""
    from deepspeed import zero

    params = list(engine.module.parameters())
    with zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        checksum = float(sum(p.detach().double().sum() for p in params))
    out = {"step": step, "eval_loss": eval_loss, "param_checksum": checksum}
    (run_dir / f"summary.rank{rank}.json").write_text(json.dumps(out))


__all__ = ["train", "plan_run", "evaluate", "EXIT_PREEMPTED", "Signals"]
