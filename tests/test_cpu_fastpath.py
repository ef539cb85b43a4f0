"""alum_ds.cpu_fastpath: the CPU dropout and attention compute what the stock model computes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForMaskedLM

from alum_ds import cpu_fastpath as C
from alum_ds import model as M
from alum_ds.config import AlumConfig
from alum_ds.objective import AlumObjective

V, T = 300, 16


def pair(dropout: float, **kw) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same weights twice: with the fast path and stock."""
    torch.manual_seed(0)
    fast = C.install(M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=dropout, **kw))
    torch.manual_seed(0)
    stock = M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=dropout, **kw)
    return fast, stock


def ids(b: int = 3) -> torch.Tensor:
    return torch.randint(3, V, (b, T), generator=torch.Generator().manual_seed(1))


def test_dropout_drops_a_fraction_p_and_scales_the_rest() -> None:
    n, p = 1_000_000, 0.1
    torch.manual_seed(0)
    x = torch.ones(n, requires_grad=True)
    y = C.dropout(x, p)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 5 * math.sqrt(p * (1 - p) / n), dropped
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - p)))  # F.dropout's scale, exactly
    # Neighbours drop independently (the masks come from 31-bit draws, one per element).
    both = ((y[:-1] == 0) & (y[1:] == 0)).double().mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / n), both
    (g,) = torch.autograd.grad(y, x, torch.full_like(y, 3.0))
    assert torch.equal(g, 3.0 * y.detach())  # the same mask and scale in the backward


def test_dropout_is_seeded_by_torch_and_off_where_it_should_be() -> None:
    x = torch.randn(64, 64)
    torch.manual_seed(7)
    a = C.dropout(x, 0.3)
    torch.manual_seed(7)
    assert torch.equal(C.dropout(x, 0.3), a)
    assert not torch.equal(C.dropout(x, 0.3), a)
    assert torch.equal(C.dropout(x, 0.3, training=False), x)
    assert torch.equal(C.dropout(x, 0.0), x)
    assert torch.equal(C.dropout(x, 1.0), torch.zeros_like(x))  # F.dropout's answer, no 0 * inf
    b = C.dropout(x.bfloat16(), 0.5)
    assert b.dtype == torch.bfloat16 and set((b / x.bfloat16()).float().unique().tolist()) <= {0.0, 2.0}


def test_install_replaces_every_dropout_and_the_attention() -> None:
    fast, stock = pair(0.1)
    assert fast.config._attn_implementation == C.ATTENTION
    assert stock.config._attn_implementation != C.ATTENTION
    drops = [m for m in fast.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(type(m) is C.FastDropout for m in drops)
    assert {m.p for m in drops} == {0.1}
    assert not any(type(m) is C.FastDropout for m in stock.modules())
    assert fast.state_dict().keys() == stock.state_dict().keys()


def test_attention_path_computes_the_stock_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout p = 1e-12 sends training through the fast attention and dropout while dropping
    nothing, so logits and gradients must equal the stock model's."""
    calls = []
    real = C._dropout_fn
    monkeypatch.setattr(C, "_dropout_fn", lambda x, p: calls.append(p) or real(x, p))
    fast, stock = pair(1e-12)
    x = ids()
    out = []
    for m in (fast, stock):
        m.train()
        logits = m(input_ids=x).logits
        logits.square().mean().backward()
        out.append((logits.detach(), {n: p.grad for n, p in m.named_parameters()}))
    assert len(calls) == fast.config.num_hidden_layers  # the fast attention ran in every layer
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-5)
    for name, g in out[1][1].items():
        torch.testing.assert_close(out[0][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_masks_still_mask() -> None:
    """With a padding mask attention goes to SDPA with SDPA's mask format (registered with the
    attention; without it transformers builds no mask at all for a custom attention)."""
    fast, stock = pair(0.1)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, T // 2:] = 0
    fast.eval()
    stock.eval()
    with torch.no_grad():
        a = fast(input_ids=x, attention_mask=mask).logits
        b = stock(input_ids=x, attention_mask=mask).logits
        unmasked = fast(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[0], unmasked[0], atol=1e-3)  # the mask did something


def test_activation_checkpointing_replays_the_fast_masks() -> None:
    """Non-reentrant checkpointing restores the generator for the recomputation, so with dropout
    on a checkpointed ALUM step equals the plain one."""
    x = ids(2)
    labels = torch.where(torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.3, x,
                         torch.full_like(x, -100))
    labels[:, 0] = x[:, 0]
    out = []
    for ckpt in (True, False):
        torch.manual_seed(0)
        m = C.install(M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=0.1,
                                    activation_checkpointing=ckpt)).train()
        torch.manual_seed(5)
        loss, stats = AlumObjective(m, AlumConfig(eta=0.1, epsilon=0.1))(x, labels)
        assert stats["adv_skipped"] == 0
        loss.backward()
        out.append((loss.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-6, atol=1e-7)
    for name, g in out[1][1].items():
        torch.testing.assert_close(out[0][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_saved_folder_is_stock(tmp_path: Path) -> None:
    fast, _ = pair(0.1)
    fast.save_pretrained(tmp_path)
    assert C.ATTENTION not in (tmp_path / "config.json").read_text()
    assert not any("attn" in k for k in json.loads((tmp_path / "config.json").read_text()))
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation != C.ATTENTION
    assert not any(type(m) is C.FastDropout for m in loaded.modules())
    fast.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(input_ids=ids()).logits, loaded(input_ids=ids()).logits)
