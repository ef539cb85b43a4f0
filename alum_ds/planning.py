"""``alum-ds plan``: what a pretraining run would do, printed without a process group or engine.

Everything comes from ``trainer.plan_run`` (the same refusals as ``alum-ds train``) plus a model
built on the meta device for its parameter count; the memory figures are an estimate from the
ZeRO paper's accounting (Rajbhandari et al. 2020) and a per-layer activation count, not a
measurement.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from alum_ds.config import RunConfig, cache_dir
from alum_ds.data import mixture, remote
from alum_ds.data.prepare import embedded_dir
from alum_ds.data.shards import MANIFEST, read_manifest
from alum_ds.launching import cpu_ranks
from alum_ds.model import build_model
from alum_ds.runtime import Device, detect
from alum_ds.trainer import Plan, plan_run

GIB = float(1 << 30)


def launcher_world(on_gpu: bool) -> int:
    """The ranks ``deepspeed launch/pretrain.py`` starts on this machine: every local GPU, or the
    CPU ranks ``launching`` re-launches with (``WORLD_SIZE`` when a launcher already set it)."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    return torch.cuda.device_count() if on_gpu else cpu_ranks()


def data_folder(cfg: RunConfig) -> tuple[Path | None, str]:
    """The prepared folder a run reads (None: the embedded corpus, not yet prepared) and a note;
    after ``plan_run``, which fetched remote folders' manifests and tokenizers."""
    if cfg.data.sources:  # a mixture: its first source's tokenizer is every source's
        first = mixture.sources_of(cfg.data)[0].dir
        return first, f"a mixture of {len(cfg.data.sources)} sources, vocabulary from {first}"
    if cfg.data.dir:
        d = remote.local_dir(cfg.data.dir, cache_dir(cfg.data.cache_dir))
        read_manifest(d)  # the run's own refusal of a missing or unprepared folder
        return d, str(cfg.data.dir)
    out = embedded_dir(cache_dir(cfg.data.cache_dir), vocab_size=cfg.data.vocab_size,
                       seed=cfg.data.seed)
    if (out / MANIFEST).is_file():
        return out, f"the embedded corpus, prepared in {out}"
    return None, f"the embedded corpus, to be prepared on first use in {out}"


def meta_model(cfg: RunConfig, vocab_size: int, pretrained: Path | None = None) -> torch.nn.Module:
    """The run's model on the meta device: its shape without its memory."""
    with torch.device("meta"):
        if pretrained is not None:
            return AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(pretrained))
        return build_model(arch=cfg.model.arch, preset=cfg.model.preset, vocab_size=vocab_size,
                           seq_len=cfg.data.seq_len, dropout=0.0)


@dataclass(frozen=True)
class Memory:
    """Estimated bytes per rank: model states by ZeRO stage, activations at the micro-batch."""

    params: float
    grads: float
    optimizer: float
    activations: float
    offloaded: float
    """Optimizer state (and under ZeRO-3 parameters) held in host memory instead."""

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations


def estimate_memory(n_params: int, shape: Any, plan: Plan, cfg: RunConfig) -> Memory:
    """Model states: parameters and gradients at the run's precision (2 or 4 bytes each), Adam's
    two moments plus an fp32 master copy (12 bytes; fp32 runs keep 8 beside the fp32 partition
    DeepSpeed copies from ZeRO-1 on, also 4), divided over the ranks from ZeRO-1 (optimizer),
    ZeRO-2 (+ gradients) and ZeRO-3 (+ parameters). Activations: per layer 34 values per token
    and hidden unit plus 5 per token pair and head (Korthikanti et al. 2022), the masked
    positions' logits, kept for two forwards when ALUM is on (the clean and the adversarial)."""
    zero, world = plan.ds.zero_stage, plan.world
    width = 4 if plan.ds.precision == "fp32" else 2
    master = 12 if width == 2 else (4 + 8 if zero >= 1 else 8)
    params = n_params * width / (world if zero >= 3 else 1)
    grads = n_params * width / (world if zero >= 2 else 1)
    optimizer = n_params * master / (world if zero >= 1 else 1)
    offloaded = 0.0
    if plan.ds.offload:
        offloaded, optimizer = optimizer, 0.0
        if zero >= 3:
            offloaded, params = offloaded + params, 0.0
    b, s, h = cfg.schedule.micro_batch_size, cfg.data.seq_len, shape.hidden_size
    per_layer = s * b * h * 34 + 5 * shape.num_attention_heads * s * s * b
    logits = b * s * cfg.masking.prob * shape.vocab_size * 2
    act = (per_layer * shape.num_hidden_layers + logits) * width / 2
    passes = 2 if cfg.alum.enabled else 1
    return Memory(params, grads, optimizer, act * passes, offloaded)


def _alum_schedule(cfg: RunConfig, total: int) -> str:
    a = cfg.alum
    if not a.enabled:
        return "off (plain masked-LM)"
    start = a.start_for(total)
    return (f"from step {start} of {total} ({max(0, total - start)} steps with ALUM), K={a.ascent_steps} "
            f"ascent step(s), epsilon={a.epsilon:g}, eta={a.eta:g}, alpha={a.alpha:g}, "
            f"sigma={a.sigma:g}, norm {a.norm}, perturbation {a.perturbation}")


def _resume_line(plan: Plan) -> str:
    p = plan.point
    if p is None:
        return "new run"
    how = f", universal (saved by {p.world_size} rank(s), now {plan.world})" if plan.universal else ""
    return f"{'branches' if plan.branch else 'resumes'} from {p.path} at step {p.step}{how}"


def _memory_lines(mem: Memory) -> list[str]:
    def g(x: float) -> str:
        return f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / (1 << 20):.1f} MiB"

    out = [f"memory per rank (estimate): {g(mem.total)} = parameters {g(mem.params)} + gradients "
           f"{g(mem.grads)} + optimizer state {g(mem.optimizer)} + activations {g(mem.activations)}"]
    if mem.offloaded:
        out.append(f"  offloaded to host memory: {g(mem.offloaded)} per rank")
    out.append("  (model states and activations only: a CPU rank's own Python, torch and DeepSpeed "
               "add about 1 GiB, 1-2.7 GiB in all against measured peaks; docs/training.md)")
    return out


GPU = Device("cuda", True, "a CUDA GPU")


def describe(cfg: RunConfig, ds_path: str, *, resume: str = "", world: int = 0,
             device: str = "here") -> list[str]:
    """The lines ``alum-ds plan`` prints (``device`` "gpu": as on CUDA GPUs with bf16); raises
    the run's own ``ConfigError``/``DataError``."""
    dev = GPU if device == "gpu" else detect()
    world = world or (1 if device == "gpu" else launcher_world(dev.on_gpu))
    plan = plan_run(cfg, ds_path, resume=resume, world=world, on_gpu=dev.on_gpu,
                    bf16_supported=dev.bf16_supported)
    data_dir, data_note = data_folder(cfg)
    vocab = read_manifest(data_dir)["tokenizer"]["vocab_size"] if data_dir else cfg.data.vocab_size
    model = meta_model(cfg, int(vocab), plan.pretrained.path if plan.pretrained else None)
    n_params = sum(p.numel() for p in model.parameters())
    b, ds, total = plan.batching, plan.ds, plan.last_step
    lines = [f"config: {section}: {values}" for section, values in cfg.to_dict().items()]
    lines += [
        f"DeepSpeed: {ds.path}; ZeRO-{ds.zero_stage}, {ds.precision}, "
        f"offload {'on' if ds.offload else 'off'}, compile {'on' if ds.compile else 'off'}"
        + (f" ({ds.compile_note})" if ds.compile_note else ""),
        f"DeepSpeed dict: {ds.config}",
        f"world: {world} rank(s) on {dev.model_name} ({dev.name})",
        f"batch: {b.micro_batch} micro x {b.accum} accumulation x {world} ranks = {b.global_batch} "
        f"sequences ({b.global_batch * cfg.data.seq_len:,} tokens) per step, {total} steps",
        f"model: {cfg.model.pretrained or cfg.model.arch + ' ' + cfg.model.preset}, "
        f"{n_params / 1e6:.2f}M parameters, vocabulary {vocab}",
        f"data: {data_note}",
        f"ALUM: {_alum_schedule(cfg, total)}",
        *_memory_lines(estimate_memory(n_params, model.config, plan, cfg)),
        f"checkpoint: {_resume_line(plan)}",
        f"run folder: {plan.run_dir}",
    ]
    return lines


__all__ = ["Memory", "describe", "estimate_memory", "launcher_world"]
