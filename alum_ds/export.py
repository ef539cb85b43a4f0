"""Checkpoint -> Hugging Face folder (config, safetensors weights, tokenizer).

ZeRO shards are consolidated to fp32 with DeepSpeed's own reader; the objective wrapper's
``mlm.`` prefix is stripped so the folder loads with ``AutoModelForMaskedLM.from_pretrained``.
The model is built with its parameters on the meta device and the consolidated tensors are
assigned into it (``load_state_dict(assign=True)``), so the export holds one copy of the weights,
not two.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from alum_ds.checkpoint import STATE_FILE, read_latest, read_state
from alum_ds.config import ConfigError, config_from_dict


def _locate(checkpoint: str) -> tuple[Path, str, Path]:
    """(checkpoint root, tag, run folder) from a tag folder or a run folder."""
    p = Path(checkpoint)
    if (p / "checkpoints").is_dir():
        root = p / "checkpoints"
        tag = read_latest(root)
        if tag is None:
            raise FileNotFoundError(f"{p} has no complete checkpoint (no valid 'latest')")
        return root, tag, p
    if p.is_dir() and ((p / STATE_FILE).is_file() or p.name.startswith("step")):
        return p.parent, p.name, p.parent.parent
    raise FileNotFoundError(f"{p} is neither a run folder nor a checkpoint folder")


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init cost);
    buffers stay real (RoBERTa's position ids are non-persistent buffers no state dict holds)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:  # a shared (tied) meta parameter stays shared
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def export(checkpoint: str, out_dir: str) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    from alum_ds.data.shards import read_manifest
    from alum_ds.model import roberta_config

    root, tag, run_dir = _locate(checkpoint)
    state = read_state(root / tag)
    if state is None:
        raise FileNotFoundError(f"checkpoint {root / tag} is incomplete (no {STATE_FILE})")
    cfg = config_from_dict(state["config"])
    data_dir = Path(state["data_dir"])
    vocab = int(read_manifest(data_dir)["tokenizer"]["vocab_size"])
    if cfg.model.pretrained:
        mcfg = RobertaConfig.from_pretrained(cfg.model.pretrained)
    else:
        mcfg = roberta_config(cfg.model.preset, vocab_size=vocab, seq_len=cfg.data.seq_len,
                              dropout=cfg.model.dropout)
    with parameters_on_meta():
        model = RobertaForMaskedLM(mcfg)
    weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    weights = {k.removeprefix("mlm."): v for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    del weights
    model.tie_weights()  # the decoder shares the word embeddings (and its bias lm_head.bias)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ConfigError(f"checkpoint {root / tag} does not match the model: missing "
                          f"{(still_meta or missing)[:3]}, unexpected {unexpected[:3]}")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(data_dir / "tokenizer")).save_pretrained(str(tmp))
    (tmp / "alum_ds_export.json").write_text(json.dumps(
        {"checkpoint": str((root / tag).resolve()), "step": state["step"],
         "config_hash": state["config_hash"]}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
