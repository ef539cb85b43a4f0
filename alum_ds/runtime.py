"""The process a run lives in, the same for pretraining and fine-tuning: device, process group,
CPU threads, host tuning, seeding, the DeepSpeed engine, the micro-steps and the cache folder.

Host tuning is decided here and nowhere else, and only for CPU runs (a GPU run gets the stock
model and glibc's defaults):

- the allocator policy (``host``): before the model is built, so its weights count too. Under
  ZeRO-0/1/2 freed memory is kept for the next step (an ALUM step faulted in ~13k pages per step
  without it: 0.75 -> 0.71 s per step on 2 CPU ranks); under ZeRO-3 it is returned (ZeRO-3 frees
  gathered parameters after every use: 10.3 -> 7.8 GiB peak per rank on the large preset).
- the CPU fast path (``cpu_fastpath``): dropout from int32 draws and a leaner attention, the same
  function (1.07x per step, plain and ALUM alike, on the small preset).

Both were measured on pretraining; fine-tuning runs the same encoder passes (three forwards and
two backwards per ALUM step), so it gets them too.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from alum_ds import compiling
from alum_ds import distributed as D
from alum_ds import host as H
from alum_ds.config import AlumConfig, OptimConfig, ScheduleBase
from alum_ds.ds_config import DsPlan
from alum_ds.metrics import StepWindow
from alum_ds.optim import lr_lambda, make_optimizer


@dataclass(frozen=True)
class Device:
    """What the accelerator is, known before any process group exists."""

    name: str
    """DeepSpeed's accelerator name: ``cuda`` or ``cpu`` (others as DeepSpeed names them)."""
    bf16_supported: bool
    model_name: str
    """The device model (GPU name), for the MFU estimate; ``cpu`` on the CPU."""

    @property
    def on_gpu(self) -> bool:
        return self.name == "cuda"


def detect() -> Device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    on_gpu = acc.device_name() == "cuda"
    return Device(acc.device_name(), bool(acc.is_bf16_supported()),
                  acc.get_device_name() if on_gpu else "cpu")


def cpu_threads() -> int:
    """Intra-op threads per rank on the CPU: OMP_NUM_THREADS when set (on a machine shared with
    other jobs 1 is much faster: spinning OpenMP threads that lose their core stall every op, seen
    here as 10-20x slower steps), else the cores divided among the local ranks (without this
    every rank spawns a thread per core)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_SIZE", "1"))))


@dataclass(frozen=True)
class Runtime:
    """The started process: its rank in the group and its torch device."""

    dev: Device
    rank: int
    world: int
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.dev.on_gpu

    def any_rank(self) -> Callable[[bool], bool]:
        return D.any_rank_fn(self.device)


def start(dev: Device, *, expect_world: int | None = None) -> Runtime:
    """Join (or, without a launcher, create) the process group and pick this rank's device and
    CPU threads."""
    D.init()
    rank, world = D.rank(), D.world()
    if expect_world is not None and world != expect_world:
        raise RuntimeError(f"WORLD_SIZE said {expect_world} ranks, the process group has {world}")
    if dev.on_gpu:
        from deepspeed.accelerator import get_accelerator

        device = torch.device(get_accelerator().device_name(D.local_rank()))
    else:
        torch.set_num_threads(cpu_threads())
        device = torch.device("cpu")
    return Runtime(dev, rank, world, device)


def tune_host(rt: Runtime, ds: DsPlan) -> str:
    """The allocator policy (module docstring), CPU only; call before building the model.
    Returns the policy applied ("keep", "release" or "" for none)."""
    return "" if rt.on_gpu else H.tune_allocator(ds.config)


def adapt_model(rt: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """The CPU fast path (module docstring) on a CPU run's model; a GPU model stays stock."""
    if not rt.on_gpu:
        from alum_ds import cpu_fastpath

        cpu_fastpath.install(model)
    return model


def compile_model(model: torch.nn.Module, ds: DsPlan, cache: Path) -> None:
    """Compile ``model``'s pieces in place, kernels cached in ``cache`` for later runs; under
    "auto" a compilation that fails falls back to eager (dynamo's ``suppress_errors``), under
    ``true`` it is an error."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = ds.compile_setting == "auto"
    compiling.use_cache(cache / "inductor")
    compiling.compile_model(model)


def seed_micro_step(seed: int, position: int) -> None:
    """Seed dropout and the perturbation noise of one micro-step from the global position of its
    first sample (sequence or example), so a resumed run draws the same random numbers as the
    uninterrupted one, on any number of ranks, as long as the micro-batch size is unchanged."""
    torch.manual_seed((seed * 1_000_003 + position * 7919) % (2**63))


def build_engine(objective: torch.nn.Module, *, optim: OptimConfig, schedule: ScheduleBase,
                 ds: dict[str, Any], total_steps: int, on_gpu: bool) -> Any:
    """The DeepSpeed engine around ``objective``, with the run config's optimizer and schedule
    (the DeepSpeed JSON has neither: ``ds_config`` refuses them there)."""
    import deepspeed

    opt = make_optimizer(list(objective.named_parameters()), optim, ds, on_gpu)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(schedule, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=opt, lr_scheduler=sched,
                                           config=ds)
    return engine


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the engine receives it, for either objective: its tensors and flags are
    the keyword arguments of the objective's ``forward`` (those left None are not passed)."""

    position: int
    """The global position of its first sample (sequence or example): what seeds it."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    alum_on: bool
    attention_mask: torch.Tensor | None = None
    token_type_ids: torch.Tensor | None = None
    token_weight: float | None = None
    """Pretraining's gradient normalisation over the optimizer step's masked tokens."""

    def inputs(self) -> dict[str, Any]:
        return {f.name: v for f in dataclasses.fields(self) if f.name != "position"
                and (v := getattr(self, f.name)) is not None}


def run_micro_steps(engine: Any, window: StepWindow, seed: int, micro: Iterable[MicroBatch]) -> None:
    """One optimizer step: seed each micro-batch, run the objective through the engine, backward
    once, step (DeepSpeed steps the optimizer at the end of the accumulation) and add its
    statistics to the window."""
    for mb in micro:
        seed_micro_step(seed, mb.position)
        loss, stats = engine(**mb.inputs())
        engine.backward(loss)
        engine.step()
        window.add(stats)


@dataclass(frozen=True)
class Run:
    """What a started run uses: its process, DeepSpeed plan, model, objective and engine."""

    rt: Runtime
    ds: DsPlan
    model: torch.nn.Module
    objective: Any
    engine: Any
    n_params: int
    """Parameters of the model, counted before ZeRO-3 partitions them."""

    def banner(self) -> str:
        """The run's systems in words, the head of its first line."""
        return (f"{self.rt.world} rank(s) on {self.rt.dev.name}, ZeRO-{self.ds.zero_stage}, "
                f"{self.ds.precision}{', compiled' if self.ds.compile else ''} (DeepSpeed config "
                f"{self.ds.path})")


def build_run(dev: Device, ds: DsPlan | Callable[[Runtime], DsPlan], *, seed: int,
              model: Callable[[Runtime], torch.nn.Module], objective: Callable[..., Any],
              alum: AlumConfig, optim: OptimConfig, schedule: ScheduleBase, total_steps: int,
              cache: Path, activation_checkpointing: bool, expect_world: int | None = None) -> Run:
    """The setup of a run, the same for pretraining and fine-tuning: start the process, resolve
    the DeepSpeed plan (``ds``, or ``ds(runtime)`` where it needs the world), tune the host, seed,
    build (``model(runtime)``), adapt and compile the model, wrap it in ``objective`` and start
    the engine."""
    rt = start(dev, expect_world=expect_world)
    plan = ds(rt) if callable(ds) else ds
    tune_host(rt, plan)
    torch.manual_seed(seed)  # identical initial weights (and classifier head) on every rank
    net = adapt_model(rt, model(rt))
    if plan.compile:
        compile_model(net, plan, cache)
    n_params = sum(p.numel() for p in net.parameters())
    obj = objective(net, alum, any_rank=rt.any_rank(),
                    freeze_ascent=plan.compile and not activation_checkpointing)
    engine = build_engine(obj, optim=optim, schedule=schedule, ds=plan.config,
                          total_steps=total_steps, on_gpu=rt.on_gpu)
    return Run(rt, plan, net, obj, engine, n_params)
