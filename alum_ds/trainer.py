"""The training loop: build, initialise DeepSpeed, step, log, evaluate, checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

from alum_ds import checkpoint as C
from alum_ds import distributed as D
from alum_ds import metrics as MT
from alum_ds.config import ConfigError, RunConfig
from alum_ds.data.prepare import ensure_embedded
from alum_ds.data.shards import read_manifest
from alum_ds.data.stream import TrainStream, validation_batches
from alum_ds.ds_config import precision_of, resolve_ds_config, zero_stage_of
from alum_ds.model import build_model, non_embedding_params
from alum_ds.objective import AlumObjective

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a signal after saving; rerun to resume


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


def default_cache_dir() -> Path:
    return Path(os.environ.get("ALUM_DS_CACHE", Path.home() / ".cache" / "alum_ds"))


def resolve_data(cfg: RunConfig) -> Path:
    """The prepared data folder; the embedded default is prepared by one rank per node."""
    if cfg.data.dir:
        return Path(cfg.data.dir)
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    if D.local_rank() == 0:
        out = ensure_embedded(cache, vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    D.barrier()
    if D.local_rank() != 0:
        out = ensure_embedded(cache, vocab_size=cfg.data.vocab_size, seed=cfg.data.seed)
    return out


def make_optimizer(params: list[tuple[str, torch.nn.Parameter]], cfg: RunConfig, ds: dict,
                   on_gpu: bool) -> torch.optim.Optimizer:
    """AdamW without decay on biases and LayerNorm weights (RoBERTa's recipe). On a GPU,
    DeepSpeed's fused Adam (or its CPU Adam when the optimizer is offloaded)."""
    decay = [p for n, p in params if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "LayerNorm" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu"
    if on_gpu and offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if on_gpu:
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


def lr_lambda(cfg: RunConfig):
    warm, total = cfg.schedule.warmup_steps, cfg.schedule.steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule.decay == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warm))

    return f


class _Signals:
    """First SIGTERM/SIGINT: finish the step, save, exit EXIT_PREEMPTED. Second: exit now."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested = True


def _seed_step(seed: int, position: int, rank_: int) -> None:
    """Dropout and perturbation noise are seeded from the data position, so a resumed run draws
    the same random numbers as the uninterrupted one without saving generator states."""
    torch.manual_seed((seed * 1_000_003 + position * 7919 + rank_) % (2**63))


def train(cfg: RunConfig, ds_path: str, *, resume: str = "") -> Path:
    """Run (or continue) training; return the run folder."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    D.init()
    rank, world = D.rank(), D.world()
    acc = get_accelerator()
    on_gpu = acc.device_name() == "cuda"
    if not on_gpu:
        # One rank per core group: without this every rank spawns a thread per core.
        local = int(os.environ.get("LOCAL_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    device = torch.device(acc.device_name(D.local_rank())) if on_gpu else torch.device("cpu")
    ds = resolve_ds_config(ds_path, cfg, world_size=world,
                           bf16_supported=bool(acc.is_bf16_supported()), on_gpu=on_gpu)
    run_dir = Path(cfg.run.dir)
    _check_run_dir(run_dir, cfg)
    log = MT.MetricsLogger(run_dir, enabled=rank == 0, tensorboard=cfg.logging.tensorboard,
                           total_steps=cfg.schedule.steps)
    data_dir = resolve_data(cfg)
    manifest = read_manifest(data_dir)
    vocab = int(manifest["tokenizer"]["vocab_size"])

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    mlm = build_model(preset=cfg.model.preset, vocab_size=vocab, seq_len=cfg.data.seq_len,
                      dropout=cfg.model.dropout, pretrained=cfg.model.pretrained,
                      activation_checkpointing=cfg.model.activation_checkpointing)
    objective = AlumObjective(mlm, cfg.alum, any_rank=D.any_rank_fn(device))
    opt = make_optimizer(list(objective.named_parameters()), cfg, ds, on_gpu)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=opt, lr_scheduler=sched,
                                           config=ds)
    stream = TrainStream(data_dir, seq_len=cfg.data.seq_len, seed=cfg.data.seed,
                         masking=cfg.masking)
    if rank == 0:
        _write_resolved(run_dir, cfg, ds, data_dir)

    step = _maybe_resume(engine, run_dir, cfg, stream, resume, log)
    first_step = step
    precision = precision_of(ds)
    log.message(
        f"alum_ds: {world} rank(s) on {acc.device_name()}, ZeRO-{zero_stage_of(ds)}, {precision}, "
        f"model {cfg.model.preset} ({sum(p.numel() for p in mlm.parameters()) / 1e6:.2f}M params), "
        f"ALUM {'on' if cfg.alum.enabled else 'off'}, data {data_dir} "
        f"({len(stream.seqs)} sequences/epoch), run {run_dir}"
    )
    signals = _Signals()
    mb, accum = cfg.schedule.micro_batch_size, cfg.schedule.grad_accum
    tokens_per_step = mb * accum * world * cfg.data.seq_len
    fpt = MT.flops_per_token(non_embedding_params(mlm), mlm.config.num_hidden_layers,
                             mlm.config.hidden_size, cfg.data.seq_len)
    peak = MT.peak_flops(acc.get_device_name() if on_gpu else "cpu") * world
    window = torch.zeros(7, dtype=torch.float64)
    t_last, steps_since = time.time(), 0
    saved_at = step if step else -1
    engine.train()
    while step < cfg.schedule.steps:
        alum_on = cfg.alum.enabled and step >= cfg.alum.start_step
        # The whole step's batches first: the gradient is normalised by the masked tokens of
        # the entire optimizer step (one tiny all-reduce), so 2 x b accumulated equals 2b at once.
        batches = []
        for _ in range(accum):
            batches.append((stream.state.consumed,
                            stream.next_for_rank(rank=rank, world=world, micro_batch=mb)))
        local = sum(int((y != -100).sum()) for _, (_, y) in batches)
        masked = D.all_reduce(torch.tensor([float(local)], device=device), "sum").item()
        weight = world * accum / masked
        for position, (x, y) in batches:
            _seed_step(cfg.run.seed, position, rank)
            loss, st = engine(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device),
                              alum_on, weight)
            engine.backward(loss)
            engine.step()
            window += torch.tensor([st["mlm_sum"], st.get("adv_sum", 0.0), st["masked_tokens"],
                                    st.get("delta_norm", 0.0), st.get("ascent_grad_norm", 0.0),
                                    st.get("adv_skipped", 0), 1.0], dtype=torch.float64)
        step += 1
        steps_since += 1
        if step % cfg.logging.every == 0 or step == cfg.schedule.steps:
            s = D.all_reduce(window.clone().to(device), "sum").cpu()
            skipped = float(s[5]) / world  # the skip is collective: every rank counted it
            now = time.time()
            tps = tokens_per_step * steps_since / (now - t_last)
            passes = MT.forward_equivalents(alum_on, cfg.alum.ascent_steps)
            values = {
                "loss": float((s[0] + cfg.alum.alpha * s[1]) / s[2]), "mlm_loss": float(s[0] / s[2]),
                "lr": float(engine.get_lr()[0]), "tokens_per_s": tps,
                "sequences_per_s": tps / cfg.data.seq_len,
                "step_time_s": (now - t_last) / steps_since,
                "mfu": tps * fpt * passes / 3.0 / peak if peak == peak else None,
                "alum_on": alum_on, "consumed_sequences": stream.state.consumed,
                "epoch": stream.epoch,
            }
            if alum_on:
                values.update(adv_loss=float(s[1] / s[2]), delta_norm=float(s[3] / s[6]),
                              ascent_grad_norm=float(s[4] / s[6]),
                              adv_skipped_total=objective.skipped_total)
            if skipped:
                log.message(f"warning: adversarial term skipped on {int(skipped)} micro-step(s) "
                            f"before step {step} (non-finite ascent gradient or loss)")
            if on_gpu:
                values["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            gn = engine.get_global_grad_norm()
            if gn is not None:
                values["grad_norm"] = float(gn)
            log.log(step, values)
            log.progress(step, values)
            window.zero_()
            t_last, steps_since = now, 0
            if not all(math.isfinite(v) for v in (values["loss"], values["mlm_loss"])):
                raise FloatingPointError(f"training loss became non-finite at step {step}")
        every = cfg.checkpoint.every
        sliced = cfg.run.stop_after and step - first_step >= cfg.run.stop_after
        if sliced and step < cfg.schedule.steps:
            _save(engine, run_dir, step, stream, cfg)
            log.message(f"run.stop_after: stopped after saving step {step}; rerun to continue")
            log.message(f"run folder: {run_dir.resolve()}")
            log.close()
            return run_dir
        if (every and step % every == 0) or signals.requested:
            _save(engine, run_dir, step, stream, cfg)
            saved_at = step
            if signals.requested:
                log.message(f"stopped by signal after saving step {step}; rerun to resume")
                raise Preempted()
    if saved_at != step:
        _save(engine, run_dir, step, stream, cfg)
    ev = evaluate(engine, cfg, data_dir, device, rank, world)
    log.log(step, {"eval_loss": ev, "eval_perplexity": math.exp(min(ev, 50))})
    log.message(f"eval: masked-LM loss {ev:.4f}, perplexity {math.exp(min(ev, 50)):.2f}")
    _write_summary(run_dir, rank, step, ev, engine)
    log.close()
    log.message(f"run folder: {run_dir.resolve()}")
    return run_dir


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
            loss, st = engine(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device),
                              False)
            if i < len(batches):
                total += torch.tensor([float(loss) * st["masked_tokens"], st["masked_tokens"]],
                                      dtype=torch.float64)
    engine.train()
    total = D.all_reduce(total.to(device), "sum").cpu()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def _save(engine: Any, run_dir: Path, step: int, stream: TrainStream, cfg: RunConfig) -> None:
    C.save(engine, run_dir, step,
           {"stream": stream.state_dict(), "step": step, "config_hash": cfg.fingerprint(),
            "config": cfg.to_dict()}, cfg.checkpoint.keep)


def _maybe_resume(engine: Any, run_dir: Path, cfg: RunConfig, stream: TrainStream, resume: str,
                  log: MT.MetricsLogger) -> int:
    if resume:
        p = Path(resume)
        root, tag = p.parent, p.name
        if not p.is_dir():
            raise ConfigError(f"--resume {resume}: no such checkpoint folder")
    else:
        root = C.checkpoint_dir(run_dir)
        tag = C.read_latest(root) if root.is_dir() else None
        if tag is None:
            return 0
    client = C.load(engine, root, tag)
    if client.get("config_hash") not in (None, cfg.fingerprint()):
        raise ConfigError(
            f"checkpoint {root / tag} was written with another config (hash "
            f"{client.get('config_hash')}, this run {cfg.fingerprint()}): use a new --run.dir"
        )
    stream.load_state_dict(client["stream"])
    log.message(f"resumed from {root / tag} at step {client['step']}")
    return int(client["step"])


def _check_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    resolved = run_dir / "config.resolved.json"
    if resolved.is_file():
        try:
            old = json.loads(resolved.read_text()).get("config_hash")
        except json.JSONDecodeError:
            old = None
        if old is not None and old != cfg.fingerprint():
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


__all__ = ["train", "EXIT_PREEMPTED"]
