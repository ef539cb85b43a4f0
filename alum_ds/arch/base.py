"""The adapter interface: what ALUM needs from an encoder family, and the common BERT-style code.

ALUM (../../shared/ALUM.md) splits the masked-LM forward in three and perturbs between the first
two:

- ``embed``: the input of the first encoder layer, h0. δ is added to this tensor (trap 1), so it
  is taken after everything the stock model computes before its first layer (embedding
  LayerNorm, dropout, a projection where the family has one) and is fed to the encoder as it is,
  never through ``inputs_embeds`` (which would add positions and LayerNorm a second time).
- ``encode``: the stock encoder run from a given h, with the attention mask the stock model
  would build for the same padding mask.
- ``mlm_logits``: the MLM head applied to gathered rows only (trap 2: the head and both KLs run at
  the masked positions, never over the whole [B, T, V]).

``classify`` is the sequence-classification head from the encoder output, for fine-tuning (the
regulariser on the classifier's distribution perturbs the same h0).

Each function equals the stock model's computation exactly (the tests compare them in float64);
none of them takes gradients or knows about ranks, so trap 3 (no parameter gradients in the
ascent) stays with the caller, which differentiates with respect to δ alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask


class Adapter:
    """One architecture family. Every method takes the task model (``*ForMaskedLM`` or
    ``*ForSequenceClassification``), or for ``embed``/``encode`` the base model itself."""

    name = ""
    """The family, as ``adapter_for``'s messages name it."""
    model_types: tuple[str, ...] = ()
    """``config.model_type`` values this adapter serves."""
    base = ""
    """Attribute of the task model holding the base model (``model.roberta``, ``model.bert``...)."""
    mlm_architectures: tuple[str, ...] = ()
    """``config.architectures`` entries whose checkpoints hold this family's MLM head."""
    mlm_class = ""
    """The MaskedLM class, for messages."""
    head_modules: tuple[str, ...] = ()
    """Attributes of the MaskedLM model forming its MLM head (also the parameter-name prefixes
    that tell a checkpoint without head weights)."""
    dropout_names: tuple[str, ...] = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    """Config fields that set the backbone's dropout (not the classifier's)."""

    # -- structure ---------------------------------------------------------------------------

    def backbone(self, model: nn.Module) -> nn.Module:
        """The base model (the task model's ``base`` attribute, or ``model`` if it is one)."""
        inner = getattr(model, self.base, None)
        return inner if isinstance(inner, nn.Module) else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The encoder's layers, in order (what ``alum_ds.compiling`` compiles one by one)."""
        return self.backbone(model).encoder.layer

    @property
    def embeddings_prefix(self) -> str:
        """Name prefix of the embedding module's parameters in the task model (the FLOP model
        counts the parameters outside it)."""
        return f"{self.base}.embeddings."

    def uses_token_types(self, config: Any) -> bool:
        """Whether ``embed`` takes token type ids (segment embeddings with more than one type)."""
        return int(getattr(config, "type_vocab_size", 0) or 0) > 1

    def max_positions(self, config: Any) -> int | None:
        """Longest sequence the position embeddings hold (None: relative positions, no table)."""
        return int(config.max_position_embeddings)

    def dropout_kwargs(self, p: float) -> dict[str, float]:
        """``from_pretrained`` keyword arguments setting the backbone's dropout to ``p``."""
        return {name: p for name in self.dropout_names}

    def mlm_head_modules(self, config: Any) -> tuple[str, ...]:
        """``head_modules`` for this config (DeBERTa's depends on its ``legacy`` flag)."""
        return self.head_modules

    def has_mlm_head(self, model: nn.Module) -> bool:
        return all(isinstance(getattr(model, m, None), nn.Module)
                   for m in self.mlm_head_modules(model.config))

    def _require_mlm(self, model: nn.Module) -> None:
        if not self.has_mlm_head(model):
            raise ValueError(f"{type(model).__name__} has no MLM head: ALUM pretraining needs "
                             f"{self.mlm_class} (load the folder with alum_ds.arch.load_mlm)")

    # -- the three pieces --------------------------------------------------------------------

    def embed(self, model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h0 [B, T, H]: the first encoder layer's input. ``token_type_ids`` None: all zeros (one
        segment, packed pretraining). ``attention_mask`` is used where the stock embeddings use
        it (DeBERTa); elsewhere it is ignored, as the stock model ignores it there."""
        emb = self.backbone(model).embeddings
        return emb(input_ids=input_ids, token_type_ids=token_type_ids)

    def encode(self, model: nn.Module, hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's last hidden state [B, T, H] from h [B, T, H]. ``attention_mask``: a 0/1
        [B, T] padding mask, or None (packed sequences: nothing padded)."""
        base = self.backbone(model)
        mask = create_bidirectional_mask(config=base.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)
        return base.encoder(hidden, attention_mask=mask).last_hidden_state

    def mlm_logits(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        """MLM logits [N, V] of encoder-output rows [N, H] (the gathered masked positions)."""
        raise NotImplementedError

    def classify(self, model: nn.Module, hidden_seq: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence-classification logits [B, C] from the encoder output [B, T, H]."""
        raise NotImplementedError

    def _require_classifier(self, model: nn.Module, *names: str) -> None:
        if not all(hasattr(model, n) for n in names):
            raise ValueError(f"{type(model).__name__} has no sequence-classification head: "
                             f"classify needs the family's *ForSequenceClassification model")
