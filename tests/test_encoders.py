"""The architecture adapters (alum_ds.arch) against the stock Hugging Face models, per family.

Tiny configs built here (no downloads), float64, dropout 0. For every family: the adapter's
embed -> encode -> mlm_logits equals the stock MaskedLM logits at the masked positions (with and
without padding); ALUM's loss and parameter gradients equal an independent reference that runs
the stock model with a forward hook adding δ to the first encoder layer's input; the masked-only
loss equals the stock loss; classify equals the stock ForSequenceClassification logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    ElectraConfig,
    ElectraForPreTraining,
    GPT2Config,
    ModernBertConfig,
    RobertaConfig,
    XLMRobertaConfig,
)

from alum_ds import arch
from alum_ds import model as M
from alum_ds.adversarial import adversarial_loss
from alum_ds.config import AlumConfig

V, H, T, B = 40, 16, 12, 2
PAD = 0  # every tiny config pads with id 0 except the RoBERTa ones (1)
LAYERS = {"vocab_size": V, "hidden_size": H, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 32, "initializer_range": 0.2}
NO_DROP = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def _config(family: str, vocab: int = V, positions: int = T):
    """A tiny config of ``family`` (``vocab`` tokens, ``positions`` tokens per sequence)."""
    layers = {**LAYERS, "vocab_size": vocab}
    T = positions  # noqa: N806 - the same name as the module's default
    if family == "bert":
        return BertConfig(**layers, **NO_DROP, max_position_embeddings=T, type_vocab_size=2, pad_token_id=PAD)
    if family in ("roberta", "xlm-roberta"):
        cls = RobertaConfig if family == "roberta" else XLMRobertaConfig
        return cls(**layers, **NO_DROP, max_position_embeddings=T + 2, pad_token_id=1, bos_token_id=0,
                   eos_token_id=2, type_vocab_size=1)
    if family == "electra":  # a generator whose embeddings are narrower than its hidden size
        return ElectraConfig(**layers, **NO_DROP, embedding_size=8, max_position_embeddings=T,
                             type_vocab_size=2, pad_token_id=PAD)
    if family == "deberta-v2":  # absolute + relative positions, token types, conv, embed_proj, legacy head
        return DebertaV2Config(**layers, **NO_DROP, max_position_embeddings=T, type_vocab_size=2,
                               position_biased_input=True, relative_attention=True,
                               pos_att_type="p2c|c2p", conv_kernel_size=3, embedding_size=8,
                               pooler_dropout=0.0, pooler_hidden_size=H, pad_token_id=PAD)
    if family == "deberta-v3":  # v3's shape: relative only, buckets, shared keys, LN'd rel. embeddings
        return DebertaV2Config(**layers, **NO_DROP, max_position_embeddings=T, type_vocab_size=0,
                               position_biased_input=False, relative_attention=True,
                               pos_att_type="c2p|p2c", norm_rel_ebd="layer_norm", share_att_key=True,
                               position_buckets=8, max_relative_positions=-1, legacy=False,
                               pooler_dropout=0.0, pooler_hidden_size=H, pad_token_id=PAD)
    if family.startswith("modernbert"):  # layers: global, local, local; window 4 < T
        return ModernBertConfig(**{**layers, "num_hidden_layers": 3}, max_position_embeddings=max(64, T),
                                local_attention=4, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                                cls_token_id=1, sep_token_id=2, embedding_dropout=0.0,
                                attention_dropout=0.0, mlp_dropout=0.0, classifier_dropout=0.0)
    raise AssertionError(family)


FAMILIES = ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "deberta-v3", "modernbert",
            "modernbert-eager"]
# The module whose output the stock base model hands to its first encoder layer: the reference
# adds δ there with a forward hook (independently of the adapters).
HOOK = {"bert": "bert.embeddings", "roberta": "roberta.embeddings", "xlm-roberta": "roberta.embeddings",
        "electra": "electra.embeddings_project", "deberta-v2": "deberta.embeddings",
        "deberta-v3": "deberta.embeddings", "modernbert": "model.embeddings",
        "modernbert-eager": "model.embeddings"}


def _build(family: str, kind: str = "mlm", **cfg_kw) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = _config(family)
    for k, v in cfg_kw.items():
        setattr(cfg, k, v)
    auto = AutoModelForMaskedLM if kind == "mlm" else AutoModelForSequenceClassification
    if kind != "mlm":
        cfg.num_labels = 3
    model = auto.from_config(cfg)
    if family == "modernbert-eager":
        model.set_attn_implementation("eager")
    return model.double().eval()


def _inputs(model: torch.nn.Module, padded: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(ids, attention mask or None, flat masked positions among the real tokens)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (B, T), generator=g)
    ids[:, 0] = 3
    mask = None
    if padded:
        # transformers 5.24's ModernBERT eager attention adds a float64 finfo.min mask and takes
        # the softmax in float32, where it is -inf: a padded query whose whole sliding window is
        # padding (3 padded tokens or more here) gets NaN, which 0 * NaN spreads to its whole
        # sequence. Only in float64 (the stock model's own output); SDPA is unaffected.
        eager_modernbert = (model.config._attn_implementation == "eager"
                            and model.config.model_type == "modernbert")
        n = 2 if eager_modernbert else 4
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, -n:] = 0
        ids[1, -n:] = model.config.pad_token_id
    positions = torch.tensor([1, 4, 7, 11, T + 2, T + 5, T + 7])
    return ids, mask, positions


def _stock_logits(model, ids, mask, positions) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=mask).logits
    return logits.reshape(-1, logits.shape[-1]).index_select(0, positions)


def _adapter_logits(model, ids, mask, positions, h: torch.Tensor | None = None) -> torch.Tensor:
    a = arch.adapter_for(model)
    h0 = a.embed(model, ids, attention_mask=mask) if h is None else h
    hidden = a.encode(model, h0, mask)
    return a.mlm_logits(model, hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions))


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlm_logits_equal_stock(family: str, padded: bool) -> None:
    model = _build(family)
    ids, mask, pos = _inputs(model, padded)
    with torch.no_grad():
        ours = _adapter_logits(model, ids, mask, pos)
        stock = _stock_logits(model, ids, mask, pos)
    assert ours.shape == (len(pos), V)
    torch.testing.assert_close(ours, stock, rtol=1e-12, atol=1e-12)
    # The model.py entry points dispatch to the same adapter.
    with torch.no_grad():
        h = M.encode(model, M.embed(model, ids, attention_mask=mask), mask)
        torch.testing.assert_close(M.head_at(model, h, pos), stock, rtol=1e-12, atol=1e-12)


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    logp, logq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def _reference_alum(model, family, ids, mask, pos, targets, cfg: AlumConfig, gen) -> torch.Tensor:
    """ALUM (K=1, project rule, L-inf) on the stock model: δ added by a forward hook on the module
    whose output is the first encoder layer's input; KL ascent w.r.t. δ alone (the gradient of
    the ascent KL is taken for δ only: no parameter gradient); the loss."""
    state: dict[str, torch.Tensor | None] = {"delta": None}

    def hook(_mod, _inp, out):
        # ALUM.md: the perturbed passes run from h0.detach() + δ (the adversarial term trains the
        # encoder and head, not the embeddings below h0).
        d = state["delta"]
        return out if d is None else out.detach() + d.to(out.dtype)

    handle = model.get_submodule(HOOK[family]).register_forward_hook(hook)
    try:
        clean = _stock_logits(model, ids, mask, pos)
        delta = (torch.randn((B, T, H), dtype=torch.float32, generator=gen) * cfg.sigma).requires_grad_()
        state["delta"] = delta
        (g,) = torch.autograd.grad(_kl(clean.detach(), _stock_logits(model, ids, mask, pos)), delta)
        top = g.abs().amax(-1, keepdim=True)
        step = torch.where(top > 0, g / top.clamp_min(1e-300), torch.zeros_like(g))
        state["delta"] = (delta.detach() + cfg.eta * step).clamp(-cfg.epsilon, cfg.epsilon)
        adv = _stock_logits(model, ids, mask, pos)
    finally:
        handle.remove()
    sym = _kl(clean.detach(), adv) + _kl(adv.detach(), clean)
    return F.cross_entropy(clean, targets) + cfg.alpha * sym


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("family", FAMILIES)
def test_alum_loss_and_grads_equal_hooked_stock_model(family: str, padded: bool) -> None:
    model = _build(family)
    ids, mask, pos = _inputs(model, padded)
    targets = torch.randint(5, V, (len(pos),), generator=torch.Generator().manual_seed(2))
    cfg = AlumConfig(sigma=1e-3, eta=1e-2, epsilon=1e-2, alpha=10.0)
    params = [p for p in model.parameters() if p.requires_grad]

    a = arch.adapter_for(model)
    h0 = a.embed(model, ids, attention_mask=mask)
    assert h0.shape == (B, T, H)

    def f(h: torch.Tensor) -> torch.Tensor:
        return _adapter_logits(model, ids, mask, pos, h=h)

    clean = f(h0)
    adv = adversarial_loss(f, h0, clean, cfg, generator=torch.Generator().manual_seed(7))
    assert not adv.skipped and adv.loss > 0
    ours = F.cross_entropy(clean, targets) + cfg.alpha * adv.loss
    ours_g = torch.autograd.grad(ours, params, allow_unused=True)

    ref = _reference_alum(model, family, ids, mask, pos, targets, cfg, torch.Generator().manual_seed(7))
    ref_g = torch.autograd.grad(ref, params, allow_unused=True)

    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    # Some gradients are zero in exact arithmetic and rounding noise in float64 (attention key
    # biases: the softmax is invariant to them): an absolute floor far below rtol of the largest.
    # ModernBERT's eager attention takes its softmax in float32 even for float64 inputs, so its
    # noise is float32's (~1e-7 of the largest gradient).
    noise = 1e-7 if family == "modernbert-eager" else 1e-9
    floor = noise * max(y.abs().max().item() for y in ref_g if y is not None)
    assert floor > 0
    for name, x, y in zip(names, ours_g, ref_g):
        assert (x is None) == (y is None), name
        if y is not None:
            torch.testing.assert_close(x, y, rtol=1e-6, atol=floor, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_only_loss_equals_stock_loss(family: str) -> None:
    model = _build(family)
    ids, mask, pos = _inputs(model, padded=True)
    targets = torch.randint(5, V, (len(pos),), generator=torch.Generator().manual_seed(3))
    labels = torch.full((B * T,), -100)
    labels[pos] = targets
    with torch.no_grad():
        ours = F.cross_entropy(_adapter_logits(model, ids, mask, pos), targets)
        out = model(input_ids=ids, attention_mask=mask, labels=labels.view(B, T))
        full = F.cross_entropy(out.logits.reshape(-1, V), labels, ignore_index=-100)
    # The full head's cross-entropy over every position, -100 ignored.
    assert ours.item() == pytest.approx(full.item(), rel=1e-12)
    # The stock loss: ModernBERT's (transformers' ForMaskedLM loss) upcasts logits to float32.
    rel = 1e-12 if out.loss.dtype == torch.float64 else 1e-6
    assert ours.item() == pytest.approx(out.loss.item(), rel=rel)


CLASSIFY = [*FAMILIES, "modernbert-mean"]


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
@pytest.mark.parametrize("family", CLASSIFY)
def test_classify_equals_stock_classifier(family: str, padded: bool) -> None:
    extra = {"classifier_pooling": "mean"} if family == "modernbert-mean" else {}
    model = _build(family.replace("-mean", ""), "cls", **extra)
    ids, mask, _ = _inputs(model, padded)
    a = arch.adapter_for(model)
    kw = {}
    if a.uses_token_types(model.config):
        tt = torch.zeros(B, T, dtype=torch.long)
        tt[:, T // 2:] = 1
        kw["token_type_ids"] = tt
    with torch.no_grad():
        h0 = a.embed(model, ids, kw.get("token_type_ids"), attention_mask=mask)
        ours = a.classify(model, a.encode(model, h0, mask), mask)
        stock = model(input_ids=ids, attention_mask=mask, **kw).logits
    assert ours.shape == (B, 3)
    torch.testing.assert_close(ours, stock, rtol=1e-12, atol=1e-12)


def test_token_types_by_family() -> None:
    uses = {f: arch.adapter_for(_config(f)).uses_token_types(_config(f)) for f in FAMILIES}
    assert uses == {"bert": True, "roberta": False, "xlm-roberta": False, "electra": True,
                    "deberta-v2": True, "deberta-v3": False, "modernbert": False,
                    "modernbert-eager": False}
    model = _build("modernbert")
    with pytest.raises(ValueError, match="no token type"):
        arch.adapter_for(model).embed(model, torch.zeros(1, 4, dtype=torch.long),
                                      torch.zeros(1, 4, dtype=torch.long))


def test_backbone_and_embeddings_prefix() -> None:
    for family in FAMILIES:
        model = _build(family)
        a = arch.adapter_for(model)
        base = a.backbone(model)
        assert base is model.base_model, family
        names = [n for n, _ in model.named_parameters() if n.startswith(a.embeddings_prefix)]
        assert names and all(".embeddings." in f".{n}" for n in names), family
        # The base model itself is accepted too.
        assert a.backbone(base) is base


# ---- refusals ---------------------------------------------------------------------------------

def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unsupported_model_type_is_one_line_naming_the_supported() -> None:
    for obj in (GPT2Config(), "gpt2", {"model_type": "gpt2"}):
        with pytest.raises(ValueError) as e:
            arch.adapter_for(obj)
        msg = _one_line(e)
        assert "'gpt2'" in msg
        for name in ("bert", "roberta", "xlm-roberta", "deberta-v2", "electra", "modernbert"):
            assert name in msg


def _save(model: torch.nn.Module, folder: Path, drop_architectures: bool = False) -> Path:
    model.save_pretrained(folder)
    if drop_architectures:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("architectures", None)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_electra_discriminator_is_refused_for_mlm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    disc = ElectraForPreTraining(_config("electra"))
    folder = _save(disc, tmp_path / "disc")
    for call in (arch.check_mlm_folder, arch.load_mlm):
        with pytest.raises(ValueError) as e:
            call(folder)
        msg = _one_line(e)
        assert "discriminator" in msg and "ElectraForMaskedLM" in msg
    with pytest.raises(ValueError, match="has no MLM head") as e:
        arch.adapter_for(disc, mlm=True)
    _one_line(e)
    # Without ``architectures`` in config.json the weights tell: no generator head.
    bare = _save(disc, tmp_path / "bare", drop_architectures=True)
    with pytest.raises(ValueError, match="no MLM head weights") as e:
        arch.load_mlm(bare)
    _one_line(e)
    assert isinstance(arch.load_mlm(bare, new_head_ok=True), torch.nn.Module)


@pytest.mark.parametrize("family", ["bert", "electra", "deberta-v3"])
def test_new_head_on_a_headless_encoder(family: str, tmp_path: Path) -> None:
    """model.new_head: a BertModel (sentence-transformers-style) folder, ELECTRA's discriminator
    and a DeBERTa-v3 encoder without head load as the family's MaskedLM model, the encoder's
    weights the folder's, the head as the MaskedLM class's ``_init_weights`` makes it (LayerNorm
    ones and zeros, biases zero, dense weights N(0, initializer_range)), the decoder tied to the
    word embeddings. Without the flag the refusal names it; with it, a folder that has its own
    head is refused (the flag never silently does nothing)."""
    from transformers import AutoModel, BertModel, DebertaV2Model

    torch.manual_seed(0)
    cfg = _config(family)
    kind = {"bert": BertModel, "electra": ElectraForPreTraining, "deberta-v3": DebertaV2Model}[family]
    headless = kind(cfg)
    folder = _save(headless, tmp_path / "headless")
    with pytest.raises(ValueError) as e:
        arch.load_mlm(folder)
    assert "model.new_head=true" in _one_line(e)
    with pytest.raises(ValueError) as e:
        arch.check_mlm_folder(folder)
    assert "model.new_head=true" in _one_line(e)
    arch.check_mlm_folder(folder, new_head=True)
    torch.manual_seed(1)
    mlm = arch.load_mlm(folder, new_head=True)
    adapter = arch.adapter_for(mlm, mlm=True)
    assert type(mlm).__name__ == adapter.mlm_class
    base = AutoModel.from_pretrained(folder)
    got = adapter.backbone(mlm).state_dict()
    for k, v in base.state_dict().items():
        if k in got:
            assert torch.equal(got[k], v), k
    emb = mlm.get_input_embeddings().weight
    head = [getattr(mlm, m) for m in adapter.mlm_head_modules(mlm.config)]
    decoder = {"bert": lambda m: m.cls.predictions.decoder, "electra": lambda m: m.generator_lm_head}
    if family in decoder:  # DeBERTa-v3's lm_predictions multiplies by the embeddings themselves
        assert decoder[family](mlm).weight is emb
    for module in (m for h in head for m in h.modules()):
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
        elif isinstance(module, torch.nn.Linear) and module.weight is not emb:
            assert module.weight.std().item() == pytest.approx(cfg.initializer_range, rel=0.25)
        if getattr(module, "bias", None) is not None and not isinstance(module, torch.nn.LayerNorm):
            assert torch.equal(module.bias, torch.zeros_like(module.bias))
    torch.manual_seed(1)  # the same seed, the same head (every rank builds the same model)
    again = arch.load_mlm(folder, new_head=True)
    assert all(torch.equal(a, b) for a, b in zip(mlm.state_dict().values(), again.state_dict().values()))
    logits = adapter.mlm_logits(mlm, torch.randn(3, H))
    assert logits.shape == (3, V) and torch.isfinite(logits).all()
    with_head = _save(_build(family, "mlm"), tmp_path / "with_head")
    with pytest.raises(ValueError) as e:
        arch.load_mlm(with_head, new_head=True)
    assert "drop model.new_head=true" in _one_line(e)


def test_classifier_folder_is_refused_for_mlm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = _save(BertForSequenceClassification(_config("bert")), tmp_path / "cls")
    with pytest.raises(ValueError, match="BertForSequenceClassification has no MLM head") as e:
        arch.load_mlm(folder)
    _one_line(e)
    model = _build("bert", "cls")
    with pytest.raises(ValueError, match="no MLM head") as e:
        arch.adapter_for(model).mlm_logits(model, torch.zeros(1, H, dtype=torch.float64))
    _one_line(e)
    with pytest.raises(ValueError, match="no sequence-classification head"):
        mlm = _build("roberta")
        arch.adapter_for(mlm).classify(mlm, torch.zeros(1, T, H, dtype=torch.float64))


def test_not_a_model_folder_and_decoder_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        arch.check_mlm_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "is_decoder": True}))
    with pytest.raises(ValueError, match="is_decoder"):
        arch.check_mlm_folder(tmp_path)


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta", "electra", "deberta-v2",
                                    "deberta-v3", "modernbert"])
def test_load_mlm_round_trip_sets_the_familys_dropout(family: str, tmp_path: Path) -> None:
    model = _build(family).float()
    folder = _save(model, tmp_path / family)
    loaded = arch.load_mlm(folder, dropout=0.25)
    names = arch.adapter_for(loaded).dropout_names
    assert all(getattr(loaded.config, n) == 0.25 for n in names), names
    ps = {m.p for m in loaded.base_model.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.25}, ps
    want = model.state_dict()
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)


def test_deberta_head_kind_follows_the_checkpoint(tmp_path: Path) -> None:
    """A DeBERTa checkpoint with ``lm_predictions.*`` head weights and a config without
    ``legacy`` (transformers' default is the legacy ``cls`` head) loads with legacy=false."""
    model = _build("deberta-v3").float()
    assert not model.config.legacy
    folder = _save(model, tmp_path / "v3")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("legacy")
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded = arch.load_mlm(folder)
    assert loaded.config.legacy is False
    torch.testing.assert_close(loaded.lm_predictions.lm_head.dense.weight,
                               model.lm_predictions.lm_head.dense.weight)


def test_loaded_model_matches_stock_after_load(tmp_path: Path) -> None:
    """build_model loads any supported family from a folder (here DeBERTa-v3 and ELECTRA) and
    the model.py pieces run on it."""
    for family in ("deberta-v3", "electra"):
        folder = _save(_build(family).float(), tmp_path / family)
        m = M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=0.0, pretrained=str(folder))
        m.eval()
        ids, _, pos = _inputs(m, padded=False)
        with torch.no_grad():
            ours = M.head_at(m, M.encode(m, M.embed(m, ids)), pos)
            torch.testing.assert_close(ours, _stock_logits(m, ids, None, pos))


# ---- model.py: presets and build ---------------------------------------------------------------

def test_bert_preset_and_dispatch() -> None:
    c = M.bert_config("base", vocab_size=30522, seq_len=512, dropout=0.1)
    shape = (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size)
    assert shape == (768, 12, 12, 3072)
    assert c.max_position_embeddings == 512 and c.type_vocab_size == 2 and c.pad_token_id == 0
    assert c.hidden_dropout_prob == c.attention_probs_dropout_prob == 0.1
    assert M.model_config("bert", "tiny", vocab_size=100, seq_len=64, dropout=0.0).model_type == "bert"
    r = M.model_config("roberta", "tiny", vocab_size=100, seq_len=64, dropout=0.0)
    assert r.model_type == "roberta" and r.max_position_embeddings == 66
    with pytest.raises(ValueError, match="unknown model arch 'gpt2'"):
        M.model_config("gpt2", "tiny", vocab_size=100, seq_len=64, dropout=0.0)
    with pytest.raises(ValueError, match="unknown model preset"):
        M.bert_config("huge", vocab_size=100, seq_len=64, dropout=0.0)


def test_build_bert_from_preset_runs_the_pieces() -> None:
    torch.manual_seed(0)
    m = M.build_model(preset="tiny", vocab_size=100, seq_len=32, dropout=0.0, arch="bert").eval()
    assert type(m).__name__ == "BertForMaskedLM" and m.config.max_position_embeddings == 32
    ids = torch.randint(5, 100, (2, 32))
    pos = torch.tensor([3, 40])
    with torch.no_grad():
        ours = M.head_at(m, M.encode(m, M.embed(m, ids)), pos)
        torch.testing.assert_close(ours, _stock_logits(m, ids, None, pos), rtol=1e-5, atol=1e-5)
    emb = sum(p.numel() for mod in m.modules() if isinstance(mod, torch.nn.Embedding)
              for p in mod.parameters())
    assert M.non_embedding_params(m) == sum(p.numel() for p in m.parameters()) - emb


def test_build_model_refuses_a_model_that_does_not_fit_the_data(tmp_path: Path) -> None:
    folder = _save(_build("bert").float(), tmp_path / "bert")
    with pytest.raises(ValueError, match="has vocabulary 40 but the data's tokenizer has 8192"):
        M.build_model(preset="tiny", vocab_size=8192, seq_len=T, dropout=0.0, pretrained=str(folder))
    with pytest.raises(ValueError, match=f"holds {T} positions, fewer than data.seq_len=64"):
        M.build_model(preset="tiny", vocab_size=V, seq_len=64, dropout=0.0, pretrained=str(folder))
    # A padded embedding table (more rows than the tokenizer has) is accepted.
    m = M.build_model(preset="tiny", vocab_size=V - 8, seq_len=T, dropout=0.0, pretrained=str(folder))
    assert m.config.vocab_size == V
    # RoBERTa's positions start after the padding index: T + 2 rows hold T positions.
    rob = _save(_build("roberta").float(), tmp_path / "roberta")
    M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=0.0, pretrained=str(rob))
    with pytest.raises(ValueError, match=f"holds {T} positions"):
        M.build_model(preset="tiny", vocab_size=V, seq_len=T + 1, dropout=0.0, pretrained=str(rob))
    with pytest.raises(ValueError, match="^model.pretrained .*discriminator"):
        disc = _save(ElectraForPreTraining(_config("electra")), tmp_path / "disc")
        M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=0.0, pretrained=str(disc))


# ---- the CPU fast path on other families --------------------------------------------------------

def _train_logits(model, ids, pos) -> torch.Tensor:
    model.train()
    with torch.no_grad():
        return _stock_logits(model, ids, None, pos)


@pytest.mark.parametrize("family", ["modernbert", "bert", "deberta-v3"])
def test_cpu_fast_path_keeps_each_familys_attention(family: str) -> None:
    """``cpu_fastpath.install`` routes attention through its own kernel when dropout is on; with
    a dropout of 1e-12 (every element kept, scaled by 1 + 1e-12) the result must be the stock
    one: in particular ModernBERT's local layers keep their sliding window (T > window), and
    DeBERTa (no attention interface) keeps its own attention."""
    from alum_ds import cpu_fastpath

    p = 1e-12
    kw = ({"attention_dropout": p} if family.startswith("modernbert")
          else {"attention_probs_dropout_prob": p})
    stock = _build(family, **kw)
    fast = _build(family, **kw)
    cpu_fastpath.install(fast)
    ids, _, pos = _inputs(stock, padded=False)
    torch.testing.assert_close(_train_logits(fast, ids, pos), _train_logits(stock, ids, pos),
                               rtol=1e-9, atol=1e-9)


def test_non_embedding_params_unchanged_for_roberta() -> None:
    """The FLOP model's count: the old rule (without word and position embeddings) differs only
    by the one-row token type table."""
    m = _build("roberta")
    old = sum(p.numel() for n, p in m.named_parameters()
              if "word_embeddings" not in n and "position_embeddings" not in n)
    assert M.non_embedding_params(m) == old - H


