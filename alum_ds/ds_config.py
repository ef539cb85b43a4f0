"""Join the DeepSpeed JSON (systems settings) with the run config (ML settings).

The JSON owns ZeRO stage, precision, offload and buckets; the run config owns batch sizes,
accumulation, clipping, optimizer and schedule. A value that both set differently is an error,
never a silent override. ``"enabled": "auto"`` under ``bf16`` means bf16 where the device computes
in it natively (CUDA with bf16 support) and fp32 otherwise: on the CPU bf16 matmuls are emulated
on most machines and slower than fp32. It also means fp32 when ALUM is on with a perturbation
radius that bf16 activations cannot carry (docs/ALUM.md, trap 4): bf16's spacing near 1 is 2^-7, so a
per-element step below ``BF16_MIN_RADIUS`` rounds away and the adversarial pass would measure
only dropout noise. An explicit ``"enabled": true`` keeps bf16 and the ALUM step's precision
guard then stops with a message naming a radius that survives.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import KeysView
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from alum_ds.config import Batching, ConfigError, DuplicateKeyError, RunConfig, loads_json

if TYPE_CHECKING:  # fine-tuning's config builds on this package's; a name for the hints only
    from alum_ds.finetune.config import FinetuneConfig

AnyConfig = Union[RunConfig, "FinetuneConfig"]

BF16_MIN_RADIUS = 8e-3
"""Smallest ALUM step (eta, and epsilon for ``project``) that 'auto' runs in bf16."""


def alum_fits_bf16(cfg: AnyConfig) -> bool:
    a = cfg.alum
    radius = a.eta if a.update == "normalize" else min(a.eta, a.epsilon)
    return not a.enabled or radius >= BF16_MIN_RADIUS


SHIPPED = Path(__file__).resolve().parent / "ds_configs"
"""The DeepSpeed configs that ship with the package (the checkout's ds_configs/ links here)."""
DEFAULT = "zero2.json"


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED.glob("*.json"))


def resolve_ds_path(name: str) -> Path:
    """The DeepSpeed JSON ``name`` names: a file path, else a bare name (``zero2.json`` or
    ``zero2``) of a shipped config, so ``--ds_config zero2.json`` works from any folder."""
    p = Path(name)
    if p.is_file():
        return p
    if os.sep not in name and (os.altsep is None or os.altsep not in name):
        for candidate in (SHIPPED / name, SHIPPED / f"{name}.json"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"DeepSpeed config {name} not found (a file, or one of the shipped configs: "
                      f"{', '.join(shipped_names())})")


def read_ds_json(path: str, file: Path | None = None) -> dict[str, Any]:
    """Read the DeepSpeed JSON ``path`` names (``file``, when already resolved by
    ``resolve_ds_path``); missing or malformed files raise a one-line ConfigError."""
    p = file or resolve_ds_path(path)
    try:
        data = loads_json(p.read_text())
    except DuplicateKeyError as e:
        raise ConfigError(f"DeepSpeed config {path} gives the key {e.args[0]!r} twice in one "
                          "object: keep one (the last would win silently)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"DeepSpeed config {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(f"DeepSpeed config {path} is not UTF-8 text") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
    return data


def _owned(ds: dict, key: str, want: Any, run_key: str, path: str) -> None:
    if key in ds and ds[key] != want:
        raise ConfigError(
            f"DeepSpeed config {path} sets {key}={ds[key]} but the run config has "
            f"{run_key}={want}: set it in one place (the run config owns it)"
        )
    ds[key] = want


@dataclass(frozen=True)
class DsPlan:
    """The DeepSpeed JSON of a run, resolved once: everything the run reads of it."""

    path: Path
    """The file ``--ds_config`` named."""
    config: dict[str, Any]
    """The final dict handed to ``deepspeed.initialize`` (and written to config.resolved.json)."""
    zero_stage: int
    precision: str
    """'bf16', 'fp16' or 'fp32'."""
    offload: bool
    compile_setting: object
    """The JSON's ``torch_compile.enabled``: "auto", true or false."""
    compile: bool
    """Whether this run compiles its model (``compiling.decide``)."""
    compile_note: str = ""

    def loading_universal(self) -> DsPlan:
        """This plan with DeepSpeed told to load a universal checkpoint."""
        ds = copy.deepcopy(self.config)
        section = ds.setdefault("checkpoint", {})
        if not isinstance(section, dict):
            raise ConfigError(f"DeepSpeed config {self.path}: checkpoint must be an object")
        section["load_universal"] = True
        return dataclasses.replace(self, config=ds)


def plan_ds(path: str, cfg: AnyConfig, batching: Batching, *, bf16_supported: bool,
            on_gpu: bool) -> DsPlan:
    """Find, read and resolve the DeepSpeed JSON ``path`` once, and decide compilation."""
    # compiling imports torch: here, so that reading a config stays free of it.
    from alum_ds import compiling

    file = resolve_ds_path(path)
    ds = resolve_ds_config(path, cfg, batching, bf16_supported=bf16_supported, on_gpu=on_gpu,
                           file=file)
    setting, stage, off = compile_setting(ds), zero_stage_of(ds), offloaded(ds)
    compiled, note = compiling.decide(setting, on_gpu=on_gpu, zero_stage=stage, offload=off)
    return DsPlan(file, ds, stage, precision_of(ds), off, setting, compiled, note)


def resolve_ds_config(path: str, cfg: AnyConfig, batching: Batching, *, bf16_supported: bool,
                      on_gpu: bool, file: Path | None = None) -> dict[str, Any]:
    """Return the final DeepSpeed dict for this run, or raise ConfigError naming the conflict."""
    ds = copy.deepcopy(read_ds_json(path, file))
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"DeepSpeed config {path} has an {key!r} section; the run config owns the "
                f"optimizer and schedule (--optim.* and --schedule.*): remove it"
            )
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization must be an object")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):  # True == 1: not a stage
        raise ConfigError(f"DeepSpeed config {path}: zero_optimization.stage must be 0-3, got {stage!r}")

    b = batching
    _owned(ds, "train_micro_batch_size_per_gpu", b.micro_batch, "schedule.micro_batch_size", path)
    _owned(ds, "gradient_accumulation_steps", b.accum, "schedule.grad_accum", path)
    _owned(ds, "gradient_clipping", cfg.optim.grad_clip, "optim.grad_clip", path)
    if "train_batch_size" in ds and ds["train_batch_size"] != b.global_batch:
        raise ConfigError(
            f"DeepSpeed config {path} sets train_batch_size={ds['train_batch_size']} but "
            f"micro_batch_size {b.micro_batch} x grad_accum {b.accum} x "
            f"{b.world} ranks = {b.global_batch}: remove train_batch_size from the JSON"
        )
    ds["train_batch_size"] = b.global_batch

    for name in ("bf16", "fp16"):
        if name not in ds:
            continue
        sec = ds[name]
        if not isinstance(sec, dict) or "enabled" not in sec:
            raise ConfigError(f"DeepSpeed config {path}: {name} must be an object with 'enabled'")
        if sec["enabled"] == "auto":
            auto_bf16 = bf16_supported and on_gpu and alum_fits_bf16(cfg)
            sec["enabled"] = bool(auto_bf16) if name == "bf16" else False
        if not isinstance(sec["enabled"], bool):
            raise ConfigError(
                f"DeepSpeed config {path}: {name}.enabled must be true, false or \"auto\""
            )
    if ds.get("fp16", {}).get("enabled") and not on_gpu:
        raise ConfigError(
            f"DeepSpeed config {path} enables fp16, which needs a GPU; on the CPU use a config "
            f"with \"bf16\": {{\"enabled\": \"auto\"}} (fp32 here) or bf16"
        )
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"DeepSpeed config {path} enables both fp16 and bf16: pick one")
    if ds.get("bf16", {}).get("enabled") and not bf16_supported:
        raise ConfigError(f"DeepSpeed config {path} enables bf16, which this device lacks")
    # Step logging is ours (metrics); DeepSpeed's own per-step prints would interleave with it.
    ds.setdefault("steps_per_print", 1 << 30)
    compile_setting(ds)
    check_with_deepspeed(ds, path)
    return ds


OWN_KEYS = ("torch_compile",)
"""Top-level keys of the JSON that alum_ds reads and DeepSpeed does not."""


class _ReadKeys(dict):
    """A dict that records which keys are asked for, by lookup or membership test (also through
    ``keys()``): the keys DeepSpeed's config reader knows are the ones it asks for."""

    def __init__(self, *args: Any, seen: set[str] | None = None) -> None:
        super().__init__(*args)
        self.seen: set[str] = set() if seen is None else seen

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)  # type: ignore[arg-type]
        return super().__contains__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().get(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self.seen.add(key)
        return super().pop(key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.seen.add(key)
        return super().setdefault(key, default)

    def keys(self) -> KeysView[Any]:
        return KeysView(self)  # its membership test goes through __contains__

    def __copy__(self) -> _ReadKeys:
        return _ReadKeys(self, seen=self.seen)


def check_with_deepspeed(ds: dict[str, Any], path: str) -> None:
    """Refuse, as a one-line ConfigError, what DeepSpeed's own config classes refuse (an unknown
    key inside ``zero_optimization``, a negative bucket size, a bad offload device...) and
    top-level keys DeepSpeed does not read, before any process group: ``deepspeed.initialize``
    would raise them as a traceback, and an unknown top-level key it ignores (a misspelt
    ``"zero_optimisation"`` trains without ZeRO). The schema is DeepSpeed's: its pydantic models
    validate, and the keys it knows are those its config reader asks for."""
    import pydantic
    from deepspeed.runtime.config import DeepSpeedConfig

    # train_batch_size is checked against the world size above; DeepSpeed's reader, without a
    # process group, would check it against one rank.
    candidate = _ReadKeys({k: copy.deepcopy(v) for k, v in ds.items()
                           if k not in OWN_KEYS and k != "train_batch_size"})
    try:
        DeepSpeedConfig(candidate)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        where = _section_of(ds, err["loc"]) or e.title
        raise ConfigError(f"DeepSpeed config {path}: {where}.{loc} is refused by DeepSpeed: "
                          f"{err['msg']} (got {err.get('input')!r:.60})") from None
    except (ValueError, TypeError, KeyError, AssertionError, AttributeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"DeepSpeed config {path} is refused by DeepSpeed: {msg:.300}") from None
    unknown = sorted(k for k in candidate if k not in candidate.seen)
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], sorted(candidate.seen | set(OWN_KEYS)), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"DeepSpeed config {path}: unknown key {unknown[0]!r}{hint}: DeepSpeed "
                          "does not read it; remove it or fix its spelling")


def _section_of(ds: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """The top-level key under which the path ``loc`` of a validation error lies, if one does."""
    for key, value in ds.items():
        node: Any = value
        for part in loc:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            return key
    return ""


def precision_of(ds: dict[str, Any]) -> str:
    """'bf16', 'fp16' or 'fp32' for a resolved DeepSpeed dict."""
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def compile_setting(ds: dict[str, Any]) -> object:
    """The JSON's ``"torch_compile": {"enabled": "auto" | true | false}`` (absent: "auto"). A
    systems setting, so it lives in the DeepSpeed JSON beside precision and ZeRO: it changes how
    the model is computed, not what (compiled and eager agree to fp32 rounding, tested), and
    whether it pays depends on the hardware (``alum_ds.compiling``)."""
    sec = ds.get("torch_compile", {"enabled": "auto"})
    if not isinstance(sec, dict) or sec.get("enabled", "auto") not in (True, False, "auto"):
        raise ConfigError('DeepSpeed config: torch_compile must be {"enabled": true, false or "auto"}')
    return sec.get("enabled", "auto")


def offloaded(ds: dict[str, Any]) -> bool:
    zero = ds.get("zero_optimization", {})
    return any(zero.get(k, {}).get("device") in ("cpu", "nvme")
               for k in ("offload_optimizer", "offload_param"))


def zero_stage_of(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
