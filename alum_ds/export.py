"""Checkpoint -> Hugging Face folder (config, safetensors weights, tokenizer).

ZeRO shards are consolidated to fp32 with DeepSpeed's own reader; the objective wrapper's
``mlm.`` prefix is stripped so the folder loads with ``AutoModelForMaskedLM.from_pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from alum_ds.checkpoint import read_latest
from alum_ds.config import config_from_dict


def _locate(checkpoint: str) -> tuple[Path, str, Path]:
    """(checkpoint root, tag, run folder) from a tag folder or a run folder."""
    p = Path(checkpoint)
    if (p / "checkpoints").is_dir():
        root = p / "checkpoints"
        tag = read_latest(root)
        if tag is None:
            raise FileNotFoundError(f"{p} has no complete checkpoint (no valid 'latest')")
        return root, tag, p
    if p.is_dir() and (p.parent / "latest").exists() or p.name.startswith("step"):
        if not p.is_dir():
            raise FileNotFoundError(f"checkpoint folder {p} not found")
        return p.parent, p.name, p.parent.parent
    raise FileNotFoundError(f"{p} is neither a run folder nor a checkpoint folder")


def export(checkpoint: str, out_dir: str) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    root, tag, run_dir = _locate(checkpoint)
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    cfg = config_from_dict(resolved["config"])
    data_dir = Path(resolved["data_dir"])
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    state = {k.removeprefix("mlm."): v for k, v in state.items()}
    from alum_ds.data.shards import read_manifest
    from alum_ds.model import roberta_config

    vocab = int(read_manifest(data_dir)["tokenizer"]["vocab_size"])
    if cfg.model.pretrained:
        mcfg = RobertaConfig.from_pretrained(cfg.model.pretrained)
    else:
        mcfg = roberta_config(cfg.model.preset, vocab_size=vocab, seq_len=cfg.data.seq_len,
                              dropout=cfg.model.dropout)
    model = RobertaForMaskedLM(mcfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The decoder weight is tied to the word embeddings and may be stored once.
    missing = [k for k in missing if k not in ("lm_head.decoder.weight", "lm_head.decoder.bias")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {root / tag} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.tie_weights()
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(data_dir / "tokenizer")).save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
