"""Masked-LM models: presets, building, and the three pieces ALUM needs.

The model is a stock Hugging Face ``*ForMaskedLM`` so every checkpoint is a standard artefact:
built from a preset (RoBERTa, or BERT with ``arch="bert"``) or loaded from a local folder of any
family ``alum_ds.arch`` supports (BERT, RoBERTa, XLM-RoBERTa, DeBERTa-v2/v3, ELECTRA generator,
ModernBERT). ALUM needs the forward split in three: the embedding layer's output (where the
perturbation is added), the encoder run on a given embedding output (never through
``inputs_embeds``, which would add position embeddings and LayerNorm a second time), and the LM
head applied to selected (masked) positions only; ``embed``, ``encode`` and ``head_at`` dispatch
to the family's adapter by ``config.model_type``. Nothing here knows about ranks or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import BertConfig, BertForMaskedLM, PreTrainedConfig, RobertaConfig, RobertaForMaskedLM

from alum_ds.arch import adapter_for, load_mlm


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    heads: int
    intermediate: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=128, layers=2, heads=2, intermediate=512),
    "small": Preset(hidden=256, layers=4, heads=4, intermediate=1024),
    "base": Preset(hidden=768, layers=12, heads=12, intermediate=3072),  # RoBERTa-base shape
    "large": Preset(hidden=1024, layers=24, heads=16, intermediate=4096),  # RoBERTa-large shape
}


def _shape(preset: str, vocab_size: int, dropout: float) -> dict[str, Any]:
    """The config keys a preset sets alike in every from-scratch architecture."""
    p = _preset(preset)
    return {"vocab_size": vocab_size, "hidden_size": p.hidden, "num_hidden_layers": p.layers,
            "num_attention_heads": p.heads, "intermediate_size": p.intermediate,
            "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}


def roberta_config(
    preset: str, *, vocab_size: int, seq_len: int, dropout: float, pad_token_id: int = 1
) -> RobertaConfig:
    """A RobertaConfig for ``preset``; position table sized for ``seq_len`` (+2, RoBERTa's offset)."""
    return RobertaConfig(
        **_shape(preset, vocab_size, dropout),
        max_position_embeddings=seq_len + 2,
        type_vocab_size=1,
        pad_token_id=pad_token_id,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )


def bert_config(
    preset: str, *, vocab_size: int, seq_len: int, dropout: float, pad_token_id: int = 0,
    type_vocab_size: int = 2,
) -> BertConfig:
    """A BertConfig for ``preset`` (``base`` is BERT-base's shape); positions for ``seq_len``
    (BERT's positions have no offset). Two token types as in BERT (packed pretraining uses type
    0 only; sentence pairs in fine-tuning use both). ``pad_token_id`` 0 is the WordPiece
    tokenizer's [PAD] (``alum-ds prepare --tokenizer-kind wordpiece``)."""
    return BertConfig(
        **_shape(preset, vocab_size, dropout),
        max_position_embeddings=seq_len,
        type_vocab_size=type_vocab_size,
        pad_token_id=pad_token_id,
        layer_norm_eps=1e-12,
    )


ARCHS = ("roberta", "bert")
"""Architectures a model can be built from a preset for (``model_config``)."""


def model_config(arch: str, preset: str, *, vocab_size: int, seq_len: int, dropout: float,
                 **kwargs) -> PreTrainedConfig:
    """The config of a fresh ``arch`` model of ``preset`` (``roberta_config`` or ``bert_config``;
    ``kwargs`` such as ``pad_token_id`` go to it)."""
    if arch == "roberta":
        return roberta_config(preset, vocab_size=vocab_size, seq_len=seq_len, dropout=dropout, **kwargs)
    if arch == "bert":
        return bert_config(preset, vocab_size=vocab_size, seq_len=seq_len, dropout=dropout, **kwargs)
    raise ValueError(f"unknown model arch {arch!r} (choose from {', '.join(ARCHS)}; a pretrained "
                     "folder may be any family alum_ds.arch supports)")


def _preset(preset: str) -> Preset:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[preset]


PADDED_VOCAB_ROWS = 256
"""Rows a pretrained model's embedding table may have beyond its tokenizer (DeBERTa-v3 and
ModernBERT pad the table to a round size; those ids never occur in the data)."""


def build_model(
    *,
    preset: str,
    vocab_size: int,
    seq_len: int,
    dropout: float,
    pretrained: str = "",
    activation_checkpointing: bool = False,
    arch: str = "roberta",
    new_head: bool = False,
) -> torch.nn.Module:
    """Build a fresh ``arch`` model from a preset, or load a local pretrained folder of any
    supported family (``alum_ds.arch.load_mlm``: its MaskedLM model, dropout set under the
    family's names; a folder without an MLM head is refused unless ``new_head``, which creates
    the head as the family initialises it). The model is stock: CPU
    runs get ``alum_ds.cpu_fastpath`` from ``alum_ds.runtime.adapt_model``."""
    if pretrained:
        try:
            model = load_mlm(pretrained, dropout=dropout, new_head=new_head)
        except ValueError as e:
            raise ValueError(f"model.pretrained {e}") from None
        have = model.config.vocab_size
        if not 0 <= have - vocab_size <= PADDED_VOCAB_ROWS:
            raise ValueError(
                f"model.pretrained {pretrained} has vocabulary {have} but the "
                f"data's tokenizer has {vocab_size}: prepare the data with that model's tokenizer"
            )
        limit = adapter_for(model).max_positions(model.config)
        if limit is not None and limit < seq_len:
            raise ValueError(
                f"model.pretrained {pretrained} holds {limit} "
                f"positions, fewer than data.seq_len={seq_len}"
            )
    else:
        cfg = model_config(arch, preset, vocab_size=vocab_size, seq_len=seq_len, dropout=dropout)
        model = {"roberta": RobertaForMaskedLM, "bert": BertForMaskedLM}[arch](cfg)
    if activation_checkpointing:
        # Reentrant checkpointing does not support torch.autograd.grad (the ascent step).
        # transformers 5 renamed gradient_checkpointing_enable (deprecated, gone in v6).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    return model


def embed(model: torch.nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The embedding layer's output, the first encoder layer's input (where ALUM's perturbation
    goes): e.g. RoBERTa's token + position embeddings, LayerNorm, dropout."""
    return adapter_for(model).embed(model, input_ids, token_type_ids, attention_mask=attention_mask)


def encode(model: torch.nn.Module, hidden: torch.Tensor,
           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Run the encoder on an embedding output. Packed sequences have no padding: no attention
    mask (``attention_mask``: a 0/1 [B, T] padding mask where there is padding)."""
    return adapter_for(model).encode(model, hidden, attention_mask)


def head_at(model: torch.nn.Module, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """LM-head logits at flat ``positions`` of ``hidden`` [B, T, H] only: [len(positions), V]."""
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    return adapter_for(model).mlm_logits(model, rows)


def classify(model: torch.nn.Module, hidden_seq: torch.Tensor,
             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-classification logits [B, C] from the encoder output [B, T, H]."""
    return adapter_for(model).classify(model, hidden_seq, attention_mask)


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameter count without the embedding tables (token, position, token type; DeBERTa's
    relative-position table) for the FLOP model: lookups, not matrix products. A decoder tied to
    the word embeddings is the same parameter, so it is not counted either."""
    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
              for p in m.parameters(recurse=False)}
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)
