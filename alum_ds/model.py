"""RoBERTa masked-LM models: presets, building, and the three pieces ALUM needs.

The model is a stock Hugging Face ``RobertaForMaskedLM`` so every checkpoint is a standard
artefact. ALUM needs the forward split in three: the embedding layer's output (where the
perturbation is added), the encoder run on a given embedding output (never through
``inputs_embeds``, which would add position embeddings and LayerNorm a second time), and the LM
head applied to selected (masked) positions only. Nothing here knows about ranks or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaForMaskedLM

from alum_ds import cpu_fastpath


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


def roberta_config(
    preset: str, *, vocab_size: int, seq_len: int, dropout: float, pad_token_id: int = 1
) -> RobertaConfig:
    """A RobertaConfig for ``preset``; position table sized for ``seq_len`` (+2, RoBERTa's offset)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r} (choose from {', '.join(PRESETS)})")
    p = PRESETS[preset]
    return RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        intermediate_size=p.intermediate,
        max_position_embeddings=seq_len + 2,
        type_vocab_size=1,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        pad_token_id=pad_token_id,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
    )


def build_model(
    *,
    preset: str,
    vocab_size: int,
    seq_len: int,
    dropout: float,
    pretrained: str = "",
    activation_checkpointing: bool = False,
    cpu_fast_path: bool = True,
) -> RobertaForMaskedLM:
    """Build a fresh model from a preset, or load a local pretrained RoBERTa folder. With
    ``cpu_fast_path`` its dropout and attention take ``alum_ds.cpu_fastpath``'s CPU kernels
    (the same function, computed faster; off only for the stock baseline in bench/)."""
    if pretrained:
        if not (Path(pretrained) / "config.json").is_file():
            raise ValueError(f"model.pretrained {pretrained}: no config.json (not a model folder)")
        model = RobertaForMaskedLM.from_pretrained(
            pretrained, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout
        )
        if model.config.vocab_size != vocab_size:
            raise ValueError(
                f"model.pretrained {pretrained} has vocabulary {model.config.vocab_size} but the "
                f"data's tokenizer has {vocab_size}: prepare the data with that model's tokenizer"
            )
        if model.config.max_position_embeddings < seq_len + 2:
            raise ValueError(
                f"model.pretrained {pretrained} holds {model.config.max_position_embeddings - 2} "
                f"positions, fewer than data.seq_len={seq_len}"
            )
    else:
        model = RobertaForMaskedLM(
            roberta_config(preset, vocab_size=vocab_size, seq_len=seq_len, dropout=dropout)
        )
    if activation_checkpointing:
        # Reentrant checkpointing does not support torch.autograd.grad (the ascent step).
        # transformers 5 renamed gradient_checkpointing_enable (deprecated, gone in v6).
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    if cpu_fast_path:
        cpu_fastpath.install(model)
    return model


def embed(model: RobertaForMaskedLM, input_ids: torch.Tensor) -> torch.Tensor:
    """The embedding layer's output: token + position embeddings, LayerNorm, dropout."""
    return model.roberta.embeddings(input_ids=input_ids)


def encode(model: RobertaForMaskedLM, hidden: torch.Tensor) -> torch.Tensor:
    """Run the encoder on an embedding output. Sequences are packed to full length, so there is
    no padding and no attention mask."""
    return model.roberta.encoder(hidden, attention_mask=None).last_hidden_state


def head_at(model: RobertaForMaskedLM, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """LM-head logits at flat ``positions`` of ``hidden`` [B, T, H] only: [len(positions), V]."""
    return model.lm_head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameter count without the token and position embeddings (for the FLOP model)."""
    total = 0
    for name, p in model.named_parameters():
        if "word_embeddings" in name or "position_embeddings" in name:
            continue
        total += p.numel()
    return total
