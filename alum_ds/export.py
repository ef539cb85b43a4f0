"""Checkpoint -> Hugging Face folder (config, safetensors weights, tokenizer).

ZeRO shards are consolidated to fp32 with DeepSpeed's own reader; the objective wrapper's prefix
(``model.``) is stripped so the folder loads with ``AutoModelForMaskedLM.from_pretrained`` as the
architecture's own MaskedLM class. The model is built on the meta device (``with
torch.device("meta")``: a context for this thread's tensor creation, no process-wide patch) only
to check the consolidated tensors against its parameter names and shapes; they are written as
``model.safetensors`` beside the config (tied weights once), so the export holds one copy of the
weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from alum_ds.checkpoint import STATE_FILE, ResumePoint, read_latest, read_state, root_of, verify
from alum_ds.config import ConfigError, config_from_dict
from alum_ds.data import remote
from alum_ds.data.shards import MANIFEST


def locate(checkpoint: str) -> tuple[Path, str, Path]:
    """(checkpoint root, tag, run folder) from a run folder, its checkpoints/ folder (where
    DeepSpeed saves: ``latest`` and ``zero_to_fp32.py``) or a checkpoint (tag) folder."""
    p = Path(checkpoint)
    root = root_of(p)
    if root is not None:
        tag = read_latest(root)
        if tag is None:
            raise FileNotFoundError(f"{p} has no complete checkpoint (no valid 'latest')")
        return root, tag, root.parent
    if p.is_dir() and ((p / STATE_FILE).is_file() or p.name.startswith("step")):
        return p.parent, p.name, p.parent.parent
    raise FileNotFoundError(f"{p} is neither a run folder nor a checkpoint folder")


def model_config_of(state: dict[str, Any], vocab: int, run_dir: Path | None = None) -> Any:
    """The Hugging Face config of the model a checkpoint holds (its run config rebuilt; a Hub
    ``model.pretrained`` at the commit ``run_dir`` recorded)."""
    from transformers import AutoConfig

    from alum_ds import hub
    from alum_ds.model import model_config

    cfg = config_from_dict(state["config"])
    if cfg.model.pretrained:
        spec = cfg.model.pretrained
        pinned = hub.pinned_commit(run_dir, "model.pretrained", spec) if run_dir is not None else ""
        folder = hub.resolve(spec, "model.pretrained", pinned=pinned)
        return AutoConfig.from_pretrained(str(folder.path), local_files_only=True)
    return model_config(cfg.model.arch, cfg.model.preset, vocab_size=vocab, seq_len=cfg.data.seq_len,
                        dropout=cfg.model.dropout)


def _data_folder(state: dict) -> Path:
    """The run's data folder. A remote folder's mirror evicted since the run is fetched again
    (its manifest and tokenizer: all that export reads)."""
    d = Path(state["data_dir"])
    if not (d / MANIFEST).is_file():
        data = config_from_dict(state["config"]).data
        cache = d.parent.parent  # a mirror is CACHE/remote/NAME-HASH
        for url in remote.urls_of(data):
            if remote.mirror_dir(url, cache) == d:
                remote.fetch_metadata(url, cache, data.fetch_retry_s)
    return d


def export(checkpoint: str, out_dir: str) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from alum_ds.data.shards import read_manifest

    root, tag, run_dir = locate(checkpoint)
    state = read_state(root / tag)
    if state is None:
        raise FileNotFoundError(f"checkpoint {root / tag} is incomplete (no {STATE_FILE})")
    damage = verify(ResumePoint(root, tag, state))  # before DeepSpeed unpickles a byte of it
    if damage:
        raise ConfigError(f"checkpoint {root / tag} is damaged: {damage}; export an older checkpoint "
                          f"(a folder under {root}) or restore the file")
    data_dir = _data_folder(state)
    mcfg = model_config_of(state, int(read_manifest(data_dir)["tokenizer"]["vocab_size"]), run_dir)
    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(mcfg)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    weights = {k.split(".", 1)[1]: v for k, v in weights.items()}  # the objective's prefix
    weights = _checked(model, weights, f"checkpoint {root / tag}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Written here rather than by save_pretrained, which writes nothing on a rank other than 0
    # once a process group exists (fine-tuning exports a checkpoint on every rank).
    mcfg.architectures = [type(model).__name__]
    mcfg.save_pretrained(str(tmp))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    del weights
    AutoTokenizer.from_pretrained(str(data_dir / "tokenizer")).save_pretrained(str(tmp))
    (tmp / "alum_ds_export.json").write_text(json.dumps(
        {"checkpoint": str((root / tag).resolve()), "step": state["step"],
         "config_hash": state["config_hash"]}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _checked(model: torch.nn.Module, weights: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """``weights`` for ``model``'s state dict, each shared (tied) tensor under its first name only
    (``from_pretrained`` ties the others); a ConfigError names what does not match."""
    names = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    first = {n: names[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for k in want:
        key = first.get(k, k)
        if key in out:
            continue
        have = weights.get(key, weights.get(k))
        if have is not None:
            out[key] = have
    missing = [k for k in want if first.get(k, k) not in out]
    unexpected = [k for k in weights if k not in want]
    wrong = [k for k, v in out.items() if tuple(v.shape) != want[k]]
    if missing or unexpected or wrong:
        raise ConfigError(f"{what} does not match the model: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}, other shapes {wrong[:3]}")
    return out
