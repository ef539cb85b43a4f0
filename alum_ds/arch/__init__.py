"""Encoder families ALUM runs on, selected by ``config.model_type``: BERT, RoBERTa, XLM-RoBERTa,
DeBERTa-v2/v3, ELECTRA (generator) and ModernBERT.

``adapter_for(model_or_config)`` gives the family's ``Adapter`` (``alum_ds.arch.base``): ``embed``
(h0, where δ goes), ``encode`` (the encoder from a given h), ``mlm_logits`` (the MLM head on
gathered rows), ``classify`` (the sequence-classification head), ``backbone``,
``embeddings_prefix`` and ``uses_token_types``. ``check_mlm_folder`` and ``load_mlm`` read a
local Hugging Face folder and refuse, in one line, one that has no MLM head unless a new head is
asked for (``new_head``: the family's MaskedLM class initialises it, ``model.new_head=true``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from torch import nn

from alum_ds.arch.base import Adapter
from alum_ds.arch.families import ADAPTERS, DebertaV2Adapter

__all__ = ["ADAPTERS", "SUPPORTED", "Adapter", "adapter_for", "check_mlm_folder", "load_mlm"]

_BY_TYPE: dict[str, Adapter] = {t: a for a in ADAPTERS for t in a.model_types}
SUPPORTED: tuple[str, ...] = tuple(_BY_TYPE)
"""The supported ``model_type`` values."""

log = logging.getLogger(__name__)


def _config_of(obj: Any) -> tuple[str | None, Any]:
    """(model_type, config-like) of a model, a config, a config.json dict or a model_type."""
    if isinstance(obj, nn.Module):
        obj = getattr(obj, "config", None)
    if isinstance(obj, str):
        return obj, {}
    if isinstance(obj, dict):
        return obj.get("model_type"), obj
    return getattr(obj, "model_type", None), obj


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


NEW_HEAD_FIX = "or set model.new_head=true to continue from its encoder with a new MLM head"
"""How every no-MLM-head refusal ends: the way on."""


def adapter_for(model_or_config: Any, *, mlm: bool = False, where: str = "") -> Adapter:
    """The adapter of a model, a config, a config.json dict or a model_type string.

    ``mlm``: the caller needs an MLM head; a model without one, or a config whose
    ``architectures`` name none of the family's MLM classes (ELECTRA's discriminator, a
    fine-tuned classifier), is refused. Every refusal is a one-line ValueError (prefixed with
    ``where``, e.g. the folder)."""
    pre = f"{where}: " if where else ""
    model_type, cfg = _config_of(model_or_config)
    adapter = _BY_TYPE.get(model_type or "")
    if adapter is None:
        raise ValueError(f"{pre}model_type {model_type!r} is not supported by alum_ds "
                         f"(supported: {', '.join(SUPPORTED)})")
    if _get(cfg, "is_decoder", False):
        raise ValueError(f"{pre}{model_type} config has is_decoder=true (a causal decoder); ALUM "
                         "needs the bidirectional encoder: set is_decoder to false")
    if not mlm:
        return adapter
    if isinstance(model_or_config, nn.Module):
        if not adapter.has_mlm_head(model_or_config):
            raise ValueError(f"{pre}{type(model_or_config).__name__} has no MLM head; ALUM "
                             f"pretraining needs {adapter.mlm_class}")
        return adapter
    archs = list(_get(cfg, "architectures", None) or [])
    if archs and not any(a in adapter.mlm_architectures for a in archs):
        if "ElectraForPreTraining" in archs:
            raise ValueError(f"{pre}ElectraForPreTraining is ELECTRA's discriminator, which has no "
                             "MLM head; ALUM pretraining needs the generator (ElectraForMaskedLM), "
                             f"{NEW_HEAD_FIX}")
        raise ValueError(f"{pre}{', '.join(archs)} has no MLM head; ALUM pretraining needs "
                         f"{adapter.mlm_class} (a checkpoint saved with its MLM head), {NEW_HEAD_FIX}")
    return adapter


def check_mlm_folder(folder: str | Path, *, new_head: bool = False) -> Adapter:
    """The adapter for a local model folder meant for MLM, from its config.json alone (no
    weights are read); a one-line ValueError if it is not a supported model with an MLM head
    (``new_head``: any supported encoder, its MLM head to be created)."""
    p = Path(folder)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{p}: no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file} does not load: {str(e).splitlines()[0]}") from None
    return adapter_for(cfg, mlm=not new_head, where=str(p))


def load_mlm(folder: str | Path, dropout: float | None = None, *, new_head_ok: bool = False,
             new_head: bool = False, **kwargs: Any) -> nn.Module:
    """The folder's MaskedLM model (``AutoModelForMaskedLM``, local files only), with the
    backbone's dropout set to ``dropout`` under the family's names (None: the folder's).

    A checkpoint without MLM head weights (DeBERTa-v3 and ELECTRA discriminators are published
    without one) would train a randomly initialised head: refused unless ``new_head_ok`` or
    ``new_head``. ``new_head``: the folder must have no MLM head weights at all (a folder that has
    them is refused, so the flag never silently changes nothing); ``from_pretrained`` then
    initialises the head with the family's own ``_init_weights`` and ties its decoder to the word
    embeddings where the family ties it (``tie_word_embeddings``). A
    DeBERTa checkpoint whose head is the other kind than its config's ``legacy`` flag says
    (``lm_predictions.*`` weights under the default legacy=true) is loaded with the flag flipped.
    ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``)."""
    from transformers import AutoModelForMaskedLM

    adapter = check_mlm_folder(folder, new_head=new_head)
    kw = {**(adapter.dropout_kwargs(dropout) if dropout is not None else {}), **kwargs}

    def load(**extra: Any) -> tuple[nn.Module, dict[str, list[str]]]:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        if new_head:  # its load report of missing head weights is the expected news; the run says it
            transformers.logging.set_verbosity_error()
        try:
            return AutoModelForMaskedLM.from_pretrained(str(folder), local_files_only=True,
                                                        output_loading_info=True, **kw, **extra)
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: the model does not load: {str(e).splitlines()[0]}") from None
        finally:
            transformers.logging.set_verbosity(verbosity)

    model, info = load()
    heads = adapter.mlm_head_modules(model.config)
    missing = [k for k in info.get("missing_keys", []) if not k.startswith(tuple(f"{h}." for h in heads))]
    head_missing = [k for k in info.get("missing_keys", []) if k not in missing]
    if head_missing and isinstance(adapter, DebertaV2Adapter):
        other = "lm_predictions." if model.config.legacy else "cls."
        if any(k.startswith(other) for k in info.get("unexpected_keys", [])):
            log.info("%s: the checkpoint's MLM head is %s*; loading with legacy=%s", folder, other,
                     not model.config.legacy)
            model, info = load(legacy=not model.config.legacy)
            heads = adapter.mlm_head_modules(model.config)
            missing = [k for k in info.get("missing_keys", [])
                       if not k.startswith(tuple(f"{h}." for h in heads))]
            head_missing = [k for k in info.get("missing_keys", []) if k not in missing]
    if missing:
        raise ValueError(f"{folder}: the checkpoint lacks {len(missing)} encoder weight(s) "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    if new_head:
        loaded = [k for k in model.state_dict() if k.startswith(tuple(f"{h}." for h in heads))
                  and k not in head_missing and not _tied(model, k)]
        if loaded:
            raise ValueError(f"{folder}: the checkpoint has its own MLM head ({loaded[0]} ...): "
                             "drop model.new_head=true to continue with that head")
        return model
    if head_missing and not new_head_ok:
        raise ValueError(f"{folder}: the checkpoint has no MLM head weights ({head_missing[0]} ...): its "
                         f"head would start random; use a checkpoint saved with its MLM head, {NEW_HEAD_FIX}")
    return model


def _tied(model: nn.Module, key: str) -> bool:
    """Whether state-dict entry ``key`` is the same tensor as the input word embeddings (a tied
    decoder, never a checkpoint's own head weight)."""
    emb = model.get_input_embeddings()
    state = model.state_dict(keep_vars=True)
    return emb is not None and state[key] is emb.weight
