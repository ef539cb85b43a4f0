"""One adapter per encoder family (transformers 5.24's modeling code, read per family).

In every family δ goes on the tensor the stock base model passes to its first encoder layer, and
the MLM head sees only the gathered masked rows; the comment at each adapter says what that
tensor and that head are there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from alum_ds.arch.base import Adapter


class BertAdapter(Adapter):
    """BERT. h0 = dropout(LayerNorm(word + position + token type)), BertEmbeddings' output, which
    BertModel hands to its encoder unchanged: δ goes there, after the LayerNorm, so the encoder
    sees exactly h0 + δ. Token types: zeros when None (packed pretraining is one segment), the
    pair's segments in fine-tuning. MLM head: ``cls`` (dense, activation, LayerNorm, decoder tied
    to the word embeddings) on the masked rows only. Classifier: ``bert.pooler`` (dense + tanh
    of [CLS]) -> dropout -> linear (a MaskedLM model has no pooler: classify needs the
    ForSequenceClassification model)."""

    name = "bert"
    model_types = ("bert",)
    base = "bert"
    mlm_architectures = ("BertForMaskedLM", "BertForPreTraining")
    mlm_class = "BertForMaskedLM"
    head_modules = ("cls",)

    def mlm_logits(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        self._require_mlm(model)
        return model.cls(rows)

    def classify(self, model: nn.Module, hidden_seq: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._require_classifier(model, "classifier", "dropout")
        pooler = self.backbone(model).pooler
        if pooler is None:
            raise ValueError(f"{type(model).__name__}'s BertModel has no pooler: classify needs "
                             "BertForSequenceClassification")
        return model.classifier(model.dropout(pooler(hidden_seq)))


class RobertaAdapter(Adapter):
    """RoBERTa. h0 = dropout(LayerNorm(word + position + type 0)); positions count from
    pad_token_id + 1 and padded tokens keep the padding position, which RobertaEmbeddings derives
    from the ids, so ``embed`` takes the ids, never ``inputs_embeds`` (trap 1: feeding h0 back as
    inputs_embeds adds positions and LayerNorm a second time). δ goes on h0. MLM head:
    ``lm_head`` (dense, gelu, LayerNorm, tied decoder) on the masked rows. Classifier:
    RobertaClassificationHead on the <s> row (dropout, dense, tanh, dropout, out_proj)."""

    name = "roberta"
    model_types = ("roberta",)
    base = "roberta"
    mlm_architectures = ("RobertaForMaskedLM",)
    mlm_class = "RobertaForMaskedLM"
    head_modules = ("lm_head",)

    def max_positions(self, config: Any) -> int | None:
        # Position ids start after the padding index (fairseq's offset: 2 with pad id 1).
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1

    def mlm_logits(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        self._require_mlm(model)
        return model.lm_head(rows)

    def classify(self, model: nn.Module, hidden_seq: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._require_classifier(model, "classifier")
        return model.classifier(hidden_seq)


class XLMRobertaAdapter(RobertaAdapter):
    """XLM-RoBERTa: RoBERTa's code under other class names (``model.roberta``, ``lm_head``,
    the same classification head), so the same δ placement, head and classifier."""

    name = "xlm-roberta"
    model_types = ("xlm-roberta",)
    mlm_architectures = ("XLMRobertaForMaskedLM",)
    mlm_class = "XLMRobertaForMaskedLM"


class ElectraAdapter(Adapter):
    """ELECTRA. The embeddings (LayerNorm, dropout) are ``embedding_size`` wide; where that is not
    ``hidden_size`` ElectraModel projects them (``embeddings_project``) before the encoder, so h0
    is taken after the projection: δ lives in the encoder's hidden space, on the tensor the first
    layer reads, as in every other family. MLM: only the generator has a head
    (``generator_predictions``: dense to embedding_size, gelu, LayerNorm; then
    ``generator_lm_head``, tied to the word embeddings), applied to the masked rows; the
    discriminator (ElectraForPreTraining) predicts replaced tokens, not tokens, and is refused
    for MLM. Classifier: ElectraClassificationHead on [CLS] (dropout, dense, gelu, dropout,
    out_proj)."""

    name = "electra"
    model_types = ("electra",)
    base = "electra"
    mlm_architectures = ("ElectraForMaskedLM",)
    mlm_class = "ElectraForMaskedLM"
    head_modules = ("generator_predictions", "generator_lm_head")

    def embed(self, model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        base = self.backbone(model)
        h = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        project = getattr(base, "embeddings_project", None)
        return project(h) if project is not None else h

    def mlm_logits(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        self._require_mlm(model)
        return model.generator_lm_head(model.generator_predictions(rows))

    def classify(self, model: nn.Module, hidden_seq: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._require_classifier(model, "classifier")
        return model.classifier(hidden_seq)


class DebertaV2Adapter(Adapter):
    """DeBERTa-v2 and v3 (both ``deberta-v2``). h0 = dropout(mask * LayerNorm(proj(word [+
    absolute position if position_biased_input] [+ token type if type_vocab_size]))): the stock
    model passes the padding mask into the embeddings, which zero padded rows before dropout
    (all ones when there is no padding, so ``embed`` skips it then). δ goes on h0. Relative
    positions (c2p/p2c disentangled attention, position buckets, ``norm_rel_ebd``) live in the
    encoder and are rebuilt from h there, so ``encode`` runs DebertaV2Encoder itself with the
    [B, T] mask (ones when None, as DebertaV2Model; the encoder builds its [B, 1, T, T] mask and
    the optional first-layer ConvLayer reads the [B, T] one). MLM head, per the config's
    ``legacy`` flag: ``cls`` (BERT-style transform + decoder tied to the word embeddings; the
    default) or ``lm_predictions`` (the original DeBERTa head: dense, act, LayerNorm, then a
    product with the word-embedding matrix plus bias), on the masked rows. Classifier:
    ContextPooler (dropout, dense, act on [CLS]) -> dropout -> linear."""

    name = "deberta-v2"
    model_types = ("deberta-v2",)
    base = "deberta"
    mlm_architectures = ("DebertaV2ForMaskedLM",)
    mlm_class = "DebertaV2ForMaskedLM"

    def mlm_head_modules(self, config: Any) -> tuple[str, ...]:
        return ("cls",) if getattr(config, "legacy", True) else ("lm_predictions",)

    def max_positions(self, config: Any) -> int | None:
        return int(config.max_position_embeddings) if getattr(config, "position_biased_input", True) else None

    def embed(self, model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.backbone(model).embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                                               mask=attention_mask)

    def encode(self, model: nn.Module, hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        base = self.backbone(model)
        if getattr(base, "z_steps", 0) > 1:
            raise ValueError("DeBERTa with z_steps > 1 (the enhanced mask decoder's extra passes) "
                             "is not supported")
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], device=hidden.device)
        return base.encoder(hidden, attention_mask, output_hidden_states=False).last_hidden_state

    def mlm_logits(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        self._require_mlm(model)
        if model.config.legacy:
            return model.cls(rows)
        return model.lm_predictions(rows, self.backbone(model).embeddings.word_embeddings)

    def classify(self, model: nn.Module, hidden_seq: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._require_classifier(model, "pooler", "dropout", "classifier")
        return model.classifier(model.dropout(model.pooler(hidden_seq)))


class ModernBertAdapter(Adapter):
    """ModernBERT. h0 = dropout(LayerNorm(token embedding)): no absolute positions (rotary, applied
    to q and k inside each attention) and no token types; δ goes on h0. There is no encoder
    module: ``encode`` runs ModernBertModel's loop, with the masks it builds (a bidirectional mask
    for the global layers, a sliding-window one for the local layers, which matters even without
    padding), rotary cos/sin per layer type from positions 0..T-1, every layer, then the final
    LayerNorm. The first layer has no attention norm, so h0 + δ reaches its attention directly.
    MLM head: ``head`` (dense, act, LayerNorm) then ``decoder`` (tied to the token embeddings),
    on the masked rows (the stock model's ``sparse_prediction`` does the same gather). Classifier:
    pooling per ``classifier_pooling`` ([CLS] row, or the padding-masked mean) -> head -> drop ->
    classifier."""

    name = "modernbert"
    model_types = ("modernbert",)
    base = "model"
    mlm_architectures = ("ModernBertForMaskedLM",)
    mlm_class = "ModernBertForMaskedLM"
    head_modules = ("head", "decoder")
    dropout_names = ("embedding_dropout", "attention_dropout", "mlp_dropout")

    def uses_token_types(self, config: Any) -> bool:
        return False

    def embed(self, model: nn.Module, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
              *, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if token_type_ids is not None:
            raise ValueError("ModernBERT has no token type embeddings: pass token_type_ids=None")
        return self.backbone(model).embeddings(input_ids=input_ids)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).layers

    def encode(self, model: nn.Module, hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        base = self.backbone(model)
        cfg = base.config
        kinds = set(cfg.layer_types)
        kw = {"config": cfg, "inputs_embeds": hidden, "attention_mask": attention_mask}
        masks = {}
        if "full_attention" in kinds:
            masks["full_attention"] = create_bidirectional_mask(**kw)
        if "sliding_attention" in kinds:
            masks["sliding_attention"] = create_bidirectional_sliding_window_mask(**kw)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = {kind: base.rotary_emb(hidden, position_ids, kind) for kind in kinds}
        h = hidden
        for layer in base.layers:
            h = layer(h, attention_mask=masks[layer.attention_type],
                      position_embeddings=rotary[layer.attention_type])
        return base.final_norm(h)

    def mlm_logits(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        self._require_mlm(model)
        return model.decoder(model.head(rows))

    def classify(self, model: nn.Module, hidden_seq: torch.Tensor,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._require_classifier(model, "head", "drop", "classifier")
        pooling = model.config.classifier_pooling
        if pooling == "cls":
            pooled = hidden_seq[:, 0]
        elif pooling == "mean":
            if attention_mask is None:
                attention_mask = torch.ones(hidden_seq.shape[:2], device=hidden_seq.device, dtype=torch.bool)
            pooled = ((hidden_seq * attention_mask.unsqueeze(-1)).sum(dim=1)
                      / attention_mask.sum(dim=1, keepdim=True))
        else:
            raise ValueError(f"ModernBERT classifier_pooling={pooling!r}: expected 'cls' or 'mean'")
        return model.classifier(model.drop(model.head(pooled)))


ADAPTERS: tuple[Adapter, ...] = (BertAdapter(), RobertaAdapter(), XLMRobertaAdapter(), ElectraAdapter(),
                                 DebertaV2Adapter(), ModernBertAdapter())
