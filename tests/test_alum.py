"""ALUM invariants on tiny CPU models: each test pins one clause of docs/ALUM.md.

Models are built inline (preset "tiny", vocabulary 300, 16 tokens). Where a value is compared at
the 1e-8 level (KLs at small perturbations are O(delta^2) and sit below fp32 rounding noise) the
model runs in float64; that is a test device only, not a supported training precision.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from alum_ds import adversarial as A
from alum_ds import model as M
from alum_ds import objective as O
from alum_ds.adversarial import (
    PrecisionError,
    add_perturbation,
    adversarial_loss,
    symmetric_kl,
    token_norm,
)
from alum_ds.config import AlumConfig
from alum_ds.objective import AlumObjective
from tests._alum_helpers import kl_logits

V, T, B = 300, 16, 2
MASK_ID = 4


def tiny(*, dropout: float = 0.0, dtype: torch.dtype = torch.float32, seed: int = 0,
         ckpt: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=dropout,
                      activation_checkpointing=ckpt)
    return m.to(dtype).train()


def batch(seed: int = 0, b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (no padding id 1) and MLM labels: about 30% masked, at least one per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, T), generator=g)
    sel = torch.rand(b, T, generator=g) < 0.3
    sel[:, 1] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    return torch.where(sel, torch.full_like(ids, MASK_ID), ids), labels


def parts(m, ids, labels):
    """What AlumObjective hands adversarial_loss: masked positions, h0, clean logits and f."""
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    h0 = M.embed(m, ids)
    clean = M.head_at(m, M.encode(m, h0), positions)

    def f(h):
        return M.head_at(m, M.encode(m, h), positions)

    return positions, h0, clean, f


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def delta0_of(h: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    """The initial perturbation adversarial_loss draws from ``gen(seed)`` (N(0, sigma^2), fp32)."""
    return torch.randn(h.shape, dtype=torch.float32, generator=gen(seed)) * sigma


class Recorder:
    """Wraps ``f`` and remembers every input it was called with."""

    def __init__(self, f):
        self.f, self.inputs = f, []

    def __call__(self, h):
        self.inputs.append(h.detach().clone())
        return self.f(h)


def spy_project(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record (input, output) of every projection: the input is delta + eta * normalize(g)."""
    calls = []
    real = A.project

    def spy(delta, eps, norm):
        out = real(delta, eps, norm)
        calls.append((delta.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(A, "project", spy)
    return calls


def spy_ascent_gradients(monkeypatch) -> list[torch.Tensor]:
    """Record every ascent gradient (normalize's input) while letting it through."""
    grads = []
    real = A.normalize

    def spy(g, norm):
        grads.append(g.detach().clone())
        return real(g, norm)

    monkeypatch.setattr(A, "normalize", spy)
    return grads


def params_grads(m):
    return {n: p.grad for n, p in m.named_parameters()}


# ---------------------------------------------------------------- 1. where delta goes (trap 1)


def test_zero_perturbation_reproduces_clean_pass_exactly():
    m = tiny()
    ids, labels = batch()
    positions, h0, clean, f = parts(m, ids, labels)
    # The split (embed -> encode -> head) is the model's own forward.
    full = m(input_ids=ids).logits.reshape(-1, V).index_select(0, positions)
    torch.testing.assert_close(clean, full, rtol=1e-5, atol=1e-5)
    # delta = 0 through the perturbed path: bit-identical to the clean pass.
    zero = torch.zeros(h0.shape, dtype=torch.float32)
    assert torch.equal(f(add_perturbation(h0, zero)), clean)
    assert torch.equal(M.encode(m, add_perturbation(h0, zero)), M.encode(m, h0))
    # End to end: sigma = 0 means the first perturbed pass is the clean pass, so KL is exactly 0.
    rec = Recorder(f)
    adversarial_loss(rec, h0, clean, AlumConfig(sigma=0.0), generator=gen())
    with torch.no_grad():
        assert float(kl_logits(clean, f(rec.inputs[0]))) == 0.0


def test_inputs_embeds_would_embed_twice():
    """The trap the project avoids: feeding the embedding output back as ``inputs_embeds`` adds
    position embeddings and LayerNorm a second time, so even delta = 0 changes the logits."""
    m = tiny()
    ids, labels = batch()
    h0 = M.embed(m, ids)
    clean = m(input_ids=ids).logits
    twice = m(inputs_embeds=h0).logits
    assert not torch.allclose(twice, clean, atol=1e-3)
    assert (twice - clean).abs().max() > 1e-2
    # ... while our path is exact.
    ours = m.lm_head(M.encode(m, add_perturbation(h0, torch.zeros(h0.shape))))
    torch.testing.assert_close(ours, clean, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- 2. the ascent step (trap 5)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_ascent_step_has_norm_eta(monkeypatch, norm, dropout):
    m = tiny(dropout=dropout)
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    calls = spy_project(monkeypatch)
    rec = Recorder(f)
    cfg = AlumConfig(norm=norm, epsilon=10.0)  # a radius the step never reaches: no clipping
    res = adversarial_loss(rec, h0, clean, cfg, generator=gen(3))
    assert not res.skipped
    d0 = delta0_of(h0, cfg.sigma, 3)
    # The reproduction of delta0 is the one the encoder saw (up to fp32 rounding of h + delta).
    torch.testing.assert_close(rec.inputs[0] - h0.detach(), d0, rtol=0, atol=5e-7)
    (pre, post), = calls
    step_norm = token_norm(pre - d0, norm)
    torch.testing.assert_close(step_norm, torch.full_like(step_norm, cfg.eta), rtol=1e-5, atol=0)
    assert torch.equal(pre, post)  # epsilon = 10 clips nothing
    if dropout == 0.0:
        # The regime of trap 5: the gradient is far below 1e-6, so the published max|g| + 1e-6
        # normalisation would have shrunk this step by orders of magnitude.
        assert res.grad_norm < 1e-6
        assert cfg.eta * res.grad_norm / (res.grad_norm + 1e-6) < 1e-2 * cfg.eta


def test_normalize_is_scale_free():
    g = torch.randn(3, 5, 8, dtype=torch.float32)
    for norm in ("linf", "l2"):
        for scale in (1.0, 1e-12, 1e-30, 1e20):
            n = token_norm(A.normalize(g * scale, norm), norm)
            torch.testing.assert_close(n, torch.ones_like(n), rtol=1e-5, atol=0)
        # An all-zero gradient (a perturbation rounded away entirely) stays zero, never NaN.
        z = A.normalize(torch.zeros(2, 4, 8), norm)
        assert torch.equal(z, torch.zeros_like(z))
        # One zero token among others stays zero too.
        g2 = g.clone()
        g2[0, 0] = 0
        assert torch.equal(A.normalize(g2, norm)[0, 0], torch.zeros(8))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_rule_respects_radius(monkeypatch, norm):
    m = tiny()
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    calls = spy_project(monkeypatch)
    eps = 2e-3
    res = adversarial_loss(f, h0, clean, AlumConfig(norm=norm, eta=1e-2, epsilon=eps), generator=gen())
    (pre, post), = calls
    assert (token_norm(pre, norm) > eps).all()  # the step overshoots the ball on every token ...
    n = token_norm(post, norm)
    # ... and is projected back onto its surface, per token.
    torch.testing.assert_close(n, torch.full_like(n, eps), rtol=1e-5, atol=0)
    assert res.delta_norm == pytest.approx(eps, rel=1e-5)
    # Unit checks of the projection itself: inside the ball nothing moves.
    x = torch.randn(4, 6, 10)
    small = x / token_norm(x, norm) * 0.5
    assert torch.equal(A.project(small, 1.0, norm), small)
    big = A.project(x * 100, 1.0, norm)
    torch.testing.assert_close(token_norm(big, norm), torch.ones(4, 6, 1), rtol=1e-6, atol=0)
    if norm == "l2":  # the l2 projection scales (keeps the direction)
        torch.testing.assert_close(big, x / token_norm(x, "l2"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_normalize_rule_gives_unit_token_norm(norm):
    m = tiny(dtype=torch.float64)
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    rec = Recorder(f)
    res = adversarial_loss(rec, h0, clean, AlumConfig(norm=norm, update="normalize"), generator=gen())
    final = rec.inputs[-1] - h0.detach()  # the delta the adversarial pass actually saw
    n = token_norm(final, norm)
    torch.testing.assert_close(n, torch.ones_like(n), rtol=1e-6, atol=0)
    assert res.delta_norm == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_ascent_increases_kl(norm):
    """After the ascent the KL exceeds both its value at delta0 and its value after a random step
    of the same per-token size: the step goes uphill, not just anywhere."""
    m = tiny(dtype=torch.float64)
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    rec = Recorder(f)
    cfg = AlumConfig(norm=norm, epsilon=10.0)
    adversarial_loss(rec, h0, clean, cfg, generator=gen(1))
    with torch.no_grad():
        kl_before = float(kl_logits(clean, f(rec.inputs[0])))
        kl_after = float(kl_logits(clean, f(rec.inputs[-1])))
        d0 = delta0_of(h0, cfg.sigma, 1).double()
        rand_step = cfg.eta * A.normalize(torch.randn(h0.shape, generator=gen(7), dtype=torch.float64), norm)
        kl_rand = float(kl_logits(clean, f(add_perturbation(h0, d0 + rand_step))))
    assert kl_before > 0
    assert kl_after > 100 * kl_before
    assert kl_after > 1.5 * kl_rand


# ---------------------------------------------------------------- 3. ascent gradient == finite differences


def test_ascent_gradient_matches_finite_differences(monkeypatch):
    m = tiny(dtype=torch.float64)
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    grads = spy_ascent_gradients(monkeypatch)
    cfg = AlumConfig(sigma=1e-2)
    adversarial_loss(f, h0, clean, cfg, generator=gen(5))
    g = grads[0].double()  # the (unscaled) ascent gradient: the first normalize call
    d0 = delta0_of(h0, cfg.sigma, 5).double()

    @torch.no_grad()
    def kl_at(d):
        return float(kl_logits(clean, f(add_perturbation(h0, d))))

    assert float(g.norm()) > 0
    dirs = [g / g.norm()] + [torch.randn(h0.shape, generator=gen(10 + i), dtype=torch.float64)
                             for i in range(3)]
    for u in dirs:
        u = u / u.norm()
        e = 1e-3
        fd = (kl_at(d0 + e * u) - kl_at(d0 - e * u)) / (2 * e)
        an = float((g * u).sum())
        assert an == pytest.approx(fd, rel=1e-4, abs=1e-6 * float(g.norm()))
    # A few single coordinates, the largest ones.
    for idx in g.flatten().abs().topk(3).indices:
        u = torch.zeros(g.numel(), dtype=torch.float64)
        u[idx] = 1.0
        u = u.reshape(g.shape)
        e = 1e-4
        fd = (kl_at(d0 + e * u) - kl_at(d0 - e * u)) / (2 * e)
        assert float(g.flatten()[idx]) == pytest.approx(fd, rel=1e-4)


# ---------------------------------------------------------------- 4. masked positions only (trap 2)


def test_masked_only_kl_equals_full_kl_restricted(monkeypatch):
    m = tiny(dtype=torch.float64)
    ids, labels = batch()
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    seen = {}
    real = O.adversarial_loss

    def spy(f, h0, clean, cfg, **kw):
        rec = Recorder(f)
        res = real(rec, h0, clean, cfg, **kw)
        seen.update(rec=rec, res=res, clean=clean, h0=h0)
        return res

    monkeypatch.setattr(O, "adversarial_loss", spy)
    obj = AlumObjective(m, AlumConfig(eta=0.1, epsilon=0.1))
    loss, stats = obj(ids, labels)
    n = int(positions.numel())
    assert n < B * T and stats["rows"] == n
    assert seen["clean"].shape == (n, V)  # the head ran at masked positions only
    # Full-sequence logits from the stock forward, then restricted to the masked positions.
    with torch.no_grad():
        full_clean = m(input_ids=ids).logits.reshape(-1, V)
        final_input = seen["rec"].inputs[-1]
        full_adv = m.lm_head(M.encode(m, final_input)).reshape(-1, V)
    sel_clean, sel_adv = full_clean[positions], full_adv[positions]
    torch.testing.assert_close(seen["clean"].detach(), sel_clean, rtol=1e-10, atol=1e-10)
    expected = symmetric_kl(sel_clean, sel_adv)
    assert float(seen["res"].loss.detach()) == pytest.approx(float(expected), rel=1e-8)
    assert stats["adv_loss"] == pytest.approx(float(expected), rel=1e-8)
    # The restriction is real: averaged over every position the KL is a different number.
    assert float(symmetric_kl(full_clean, full_adv)) != pytest.approx(float(expected), rel=1e-3)
    # And the total is MLM (mean CE at masked positions, in fp32) + alpha * that KL.
    ce = torch.nn.functional.cross_entropy(sel_clean, labels.reshape(-1)[positions])
    assert float(loss.detach()) == pytest.approx(float(ce) + 10.0 * float(expected), rel=1e-6)


# ---------------------------------------------------------------- 5. alpha = 0 is plain MLM


def test_alpha_zero_equals_plain_mlm():
    ids, labels = batch()

    def run(alum: AlumConfig):
        m = tiny(seed=1)
        torch.manual_seed(123)
        loss, _ = AlumObjective(m, alum)(ids, labels)
        loss.backward()
        return loss.detach(), params_grads(m)

    loss_plain, g_plain = run(AlumConfig(enabled=False))
    loss_a0, g_a0 = run(AlumConfig(alpha=0.0))
    loss_a1, g_a1 = run(AlumConfig(alpha=1.0, eta=0.1, epsilon=0.1))
    assert torch.equal(loss_a0, loss_plain)
    assert g_plain.keys() == g_a0.keys()
    for name, g in g_plain.items():
        assert torch.equal(g_a0[name], g), name
    # The comparison can fail: alpha = 1 changes the loss and the gradients.
    assert float(loss_a1) > float(loss_plain)
    assert any(not torch.allclose(g_a1[n], g_plain[n]) for n in g_plain)


# ---------------------------------------------------------------- 6. no parameter grads in ascent (trap 3)


def test_ascent_takes_no_parameter_gradients():
    m = tiny(dropout=0.1)
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    calls = []

    def wrapped(h):
        calls.append(h.requires_grad)
        return f(h)

    res = adversarial_loss(wrapped, h0, clean, AlumConfig(ascent_steps=2), generator=gen())
    assert calls == [True, True, False]  # two ascent passes (grad w.r.t. delta), one final pass
    assert all(p.grad is None for p in m.parameters())
    # Not vacuous: the adversarial loss itself does reach the parameters.
    res.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.roberta.encoder.parameters())


def test_objective_forward_leaves_grads_none_until_backward():
    m = tiny(dropout=0.1)
    ids, labels = batch()
    loss, stats = AlumObjective(m, AlumConfig())(ids, labels)
    assert stats["adv_skipped"] == 0
    assert all(p.grad is None for p in m.parameters())
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.roberta.embeddings.word_embeddings.weight.grad is not None


# ---------------------------------------------------------------- 7. symmetric KL and reductions (trap 8)


def test_symmetric_kl_properties_and_reductions():
    gen_ = gen(11)
    for _ in range(20):
        a = torch.randn(5, 7, generator=gen_, dtype=torch.float64) * 3
        b = torch.randn(5, 7, generator=gen_, dtype=torch.float64) * 3
        assert float(symmetric_kl(a, b)) >= 0
        assert float(kl_logits(a, b)) >= 0
    assert float(symmetric_kl(a, a)) == 0.0
    assert float(symmetric_kl(a, a + 5.0)) == pytest.approx(0.0, abs=1e-6)  # softmax is shift-free

    # Hand computation: sum over the vocabulary, mean over positions.
    def hand(p_logits, q_logits):
        total = 0.0
        rows = p_logits.tolist()
        for i, row in enumerate(rows):
            zp = sum(math.exp(x) for x in row)
            zq = sum(math.exp(x) for x in q_logits[i].tolist())
            for x, y in zip(row, q_logits[i].tolist()):
                p, q = math.exp(x) / zp, math.exp(y) / zq
                total += p * math.log(p / q)
        return total / len(rows)

    assert float(kl_logits(a, b)) == pytest.approx(hand(a, b), rel=1e-5)
    assert float(symmetric_kl(a, b)) == pytest.approx(hand(a, b) + hand(b, a), rel=1e-5)
    # Mean over positions: repeating the rows changes nothing; sum over vocab: not a mean.
    assert float(kl_logits(a.repeat(3, 1), b.repeat(3, 1))) == pytest.approx(hand(a, b), rel=1e-5)
    assert float(kl_logits(a[:1], b[:1])) == pytest.approx(hand(a[:1], b[:1]), rel=1e-5)
    # Always fp32 (or wider), whatever the logits' dtype.
    assert kl_logits(a.bfloat16(), b.bfloat16()).dtype == torch.float32
    assert symmetric_kl(a.half(), b.half()).dtype == torch.float32


def test_symmetric_kl_stop_gradients():
    """KL(sg(p_clean) || p_adv) + KL(sg(p_adv) || p_clean): each side's target is detached."""
    a = torch.randn(4, 6, dtype=torch.float64, generator=gen(2)).requires_grad_()
    b = torch.randn(4, 6, dtype=torch.float64, generator=gen(3)).requires_grad_()
    ga, gb = torch.autograd.grad(symmetric_kl(a, b), (a, b))
    (ga_ref,) = torch.autograd.grad(kl_logits(b.detach(), a), a)
    (gb_ref,) = torch.autograd.grad(kl_logits(a.detach(), b), b)
    torch.testing.assert_close(ga, ga_ref)
    torch.testing.assert_close(gb, gb_ref)
    # (Differs from the gradient of the undetached symmetric KL.)
    (ga_full,) = torch.autograd.grad(kl_logits(a, b) + kl_logits(b, a), a)
    assert not torch.allclose(ga, ga_full)


# ---------------------------------------------------------------- 8. precision guard (trap 4)


def radius_from(msg: str) -> float:
    match = re.search(r"radius of at least ([0-9.eE+-]+)", msg)
    assert match, msg
    return float(match.group(1))


def low_precision_parts(dtype):
    m = tiny(dtype=dtype)
    ids, labels = batch()
    return parts(m, ids, labels)


def test_precision_guard_does_not_blame_delta_when_the_weights_diverged():
    """bf16 weights after a few steps at lr=1e3 (Adam moves each weight ~lr per step): the embedding
    LayerNorm's weight near 1e4, every value finite. The radius that survives bf16 there (~1e2) is
    no advice: the model has diverged, and the message says so without naming a radius."""
    m = tiny(dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("embeddings.LayerNorm.weight"):
                p.mul_(1e4)
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    assert torch.isfinite(h0).all() and float(h0.float().abs().median()) > A.DIVERGED_MEDIAN
    with pytest.raises(PrecisionError) as err:
        adversarial_loss(f, h0, clean, AlumConfig(), generator=gen())
    msg = str(err.value)
    assert "diverged" in msg and "optim.lr" in msg and "median |h|" in msg
    assert "radius of at least" not in msg and "--alum.eta=" not in msg


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_precision_guard_bf16(monkeypatch, norm):
    _, h0, clean, f = low_precision_parts(torch.bfloat16)
    assert h0.dtype == torch.bfloat16
    with pytest.raises(PrecisionError, match="bfloat16") as err:
        adversarial_loss(f, h0, clean, AlumConfig(norm=norm), generator=gen())
    r = radius_from(str(err.value))
    assert r > 1e-3
    assert f"--alum.eta={r:g}" in str(err.value) and f"--alum.epsilon={r:g}" in str(err.value)
    calls = spy_project(monkeypatch)
    res = adversarial_loss(f, h0, clean, AlumConfig(norm=norm, eta=r, epsilon=r), generator=gen())
    assert not res.skipped and math.isfinite(float(res.loss.detach())) and float(res.loss.detach()) > 0
    assert A.surviving_fraction(h0, calls[-1][1]) >= 0.5
    assert calls[-1][1].dtype == torch.float32  # delta is kept in fp32 under a bf16 model


def test_precision_guard_silent_in_fp32():
    _, h0, clean, f = low_precision_parts(torch.float32)
    for norm in ("linf", "l2"):
        res = adversarial_loss(f, h0, clean, AlumConfig(norm=norm), generator=gen())
        assert not res.skipped
    # ... and even a 1e-5 radius survives fp32.
    res = adversarial_loss(f, h0, clean, AlumConfig(eta=1e-5, epsilon=1e-5), generator=gen())
    assert not res.skipped


def _fp16_works_here() -> bool:
    try:
        lin = torch.nn.Linear(4, 4).half()
        lin(torch.ones(2, 4, dtype=torch.float16)).sum()
        return True
    except RuntimeError:
        return False


@pytest.mark.skipif(not _fp16_works_here(), reason="fp16 kernels missing on this device")
def test_precision_guard_fp16_tensors():
    """fp16 training is GPU-only, but the guard's arithmetic runs on fp16 CPU tensors here: a
    1e-5 radius is refused and the suggested one works. With sigma tiny and dropout off the first
    KL is exactly 0; that must not overflow the (scaled) ascent gradient into a skip that hides
    the refusal."""
    _, h0, clean, f = low_precision_parts(torch.float16)
    with pytest.raises(PrecisionError, match="float16") as err:
        adversarial_loss(f, h0, clean, AlumConfig(sigma=1e-9, eta=1e-5, epsilon=1e-5), generator=gen())
    r = radius_from(str(err.value))
    res = adversarial_loss(f, h0, clean, AlumConfig(eta=r, epsilon=r), generator=gen())
    assert not res.skipped


def test_surviving_fraction():
    h = torch.randn(2, 8, 64)
    d = torch.full(h.shape, 1e-5)
    assert A.surviving_fraction(h, d) == pytest.approx(1.0, rel=1e-2)
    assert A.surviving_fraction(h.bfloat16(), d) < 0.05
    assert A.surviving_fraction(h.bfloat16(), d * 1e3) > 0.5
    assert A.surviving_radius(h) == 0.0 and A.surviving_radius(h.bfloat16()) > 0


# ---------------------------------------------------------------- 9. non-finite guard (trap 6)


class NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def nan_in_ascent(f):
    def g(h):
        return f(NanGrad.apply(h)) if h.requires_grad else f(h)

    return g


def test_nan_ascent_gradient_is_skipped():
    m = tiny()
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    rec = Recorder(nan_in_ascent(f))
    res = adversarial_loss(rec, h0, clean, AlumConfig(), generator=gen())
    assert res.skipped
    # The NaN gradient never reaches delta: the remaining pass sees a finite (zero) perturbation.
    assert len(rec.inputs) == 2 and torch.isfinite(rec.inputs[-1]).all()
    assert torch.equal(rec.inputs[-1], h0.detach())
    assert torch.equal(res.loss, torch.zeros(()))
    assert not res.loss.requires_grad
    # Control: the same f without the injection is not skipped.
    assert not adversarial_loss(f, h0, clean, AlumConfig(), generator=gen()).skipped


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_adversarial_loss_is_skipped(bad):
    m = tiny()
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)

    def final_pass_bad(h):
        out = f(h)
        return out if h.requires_grad else out + bad  # only the last (adversarial) pass

    res = adversarial_loss(final_pass_bad, h0, clean, AlumConfig(), generator=gen())
    assert res.skipped and torch.equal(res.loss, torch.zeros(()))


def test_skip_is_collective():
    """A skip on another rank (any_rank says so) skips here too, so every rank runs one graph."""
    m = tiny()
    ids, labels = batch()
    _, h0, clean, f = parts(m, ids, labels)
    flags = []

    def any_rank(flag):
        flags.append(flag)
        return True

    res = adversarial_loss(f, h0, clean, AlumConfig(), any_rank=any_rank, generator=gen())
    assert flags == [False] and res.skipped


def test_objective_counts_skips_and_keeps_weights_finite(monkeypatch):
    real = O.adversarial_loss
    monkeypatch.setattr(O, "adversarial_loss", lambda f, *a, **kw: real(nan_in_ascent(f), *a, **kw))
    m = tiny(dropout=0.1)
    obj = AlumObjective(m, AlumConfig())
    ids, labels = batch()
    for k in (1, 2):
        m.zero_grad(set_to_none=True)
        loss, stats = obj(ids, labels)
        assert obj.skipped_total == k
        assert stats["adv_skipped"] == 1 and stats["adv_loss"] == 0.0
        assert float(loss.detach()) == stats["mlm_loss"]
        loss.backward()
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


# ---------------------------------------------------------------- 10. activation checkpointing (trap 7)


def test_activation_checkpointing_is_non_reentrant_and_matches():
    ids, labels = batch()
    m_ck = tiny(seed=2, ckpt=True)
    m_ref = tiny(seed=2)
    assert m_ck.training
    for layer in m_ck.roberta.encoder.layer:  # every layer checkpointed, non-reentrant
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    out = []
    for m in (m_ck, m_ref):
        torch.manual_seed(5)
        loss, stats = AlumObjective(m, AlumConfig(eta=0.1, epsilon=0.1))(ids, labels)
        assert stats["adv_skipped"] == 0
        loss.backward()
        out.append((loss.detach(), params_grads(m)))
    (l_ck, g_ck), (l_ref, g_ref) = out
    torch.testing.assert_close(l_ck, l_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g_ck[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_with_dropout_trains():
    m = tiny(dropout=0.1, ckpt=True)
    ids, labels = batch()
    loss, stats = AlumObjective(m, AlumConfig())(ids, labels)
    assert stats["adv_skipped"] == 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_reentrant_checkpointing_would_break_the_ascent():
    """Why build_model insists on non-reentrant: the reentrant kind refuses torch.autograd.grad."""
    torch.manual_seed(0)
    m = M.build_model(preset="tiny", vocab_size=V, seq_len=T, dropout=0.0)
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    m.train()
    ids, labels = batch()
    with pytest.raises(RuntimeError, match="(?i)checkpoint"):
        AlumObjective(m, AlumConfig())(ids, labels)


# ---------------------------------------------------------------- 11. fused first pass (docs/ALUM.md, "Cost")


def run_objective(alum: AlumConfig, *, ckpt: bool = False, dtype=torch.float64, seed: int = 3):
    """Loss, parameter gradients and stats of one objective step; delta_0 from ``gen(seed)``."""
    ids, labels = batch()
    m = tiny(seed=1, dtype=dtype, ckpt=ckpt)
    obj = AlumObjective(m, alum)
    obj.generator = gen(seed)
    loss, stats = obj(ids, labels)
    loss.backward()
    return loss.detach(), params_grads(m), stats


@pytest.mark.parametrize("update", ["project", "normalize"])
@pytest.mark.parametrize("steps", [1, 2])
def test_fused_first_pass_equals_unfused(monkeypatch, update, steps):
    """One forward over [h0; h0 + delta_0] gives the same ascent gradient, loss and parameter
    gradients as separate passes (float64, dropout off, the same delta_0)."""
    grads = spy_ascent_gradients(monkeypatch)
    cfg = dict(eta=0.1, epsilon=0.1, update=update, ascent_steps=steps)
    loss_u, g_u, st_u = run_objective(AlumConfig(**cfg))
    n_calls = len(grads)
    loss_f, g_f, st_f = run_objective(AlumConfig(fused_first_pass=True, **cfg))
    # The ascent gradient w.r.t. delta (the first normalize call of each run) is the same.
    assert float(grads[0].abs().max()) > 0
    torch.testing.assert_close(grads[n_calls], grads[0], rtol=1e-9, atol=1e-20)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-12, atol=0)
    assert g_f.keys() == g_u.keys()
    for name, g in g_u.items():
        assert g is not None, name
        torch.testing.assert_close(g_f[name], g, rtol=1e-9, atol=1e-14, msg=name)
    for key in ("mlm_loss", "adv_loss", "delta_norm", "ascent_grad_norm"):
        torch.testing.assert_close(st_f[key], st_u[key], rtol=1e-9, atol=1e-20, msg=key)
    assert st_f["adv_skipped"] == st_u["adv_skipped"] == 0


def test_fused_first_pass_with_activation_checkpointing():
    """The ascent backpropagates the doubled graph with retain_graph=True; non-reentrant
    checkpointing recomputes it for the final backward as well."""
    cfg = dict(eta=0.1, epsilon=0.1)
    loss_u, g_u, _ = run_objective(AlumConfig(**cfg))
    loss_f, g_f, _ = run_objective(AlumConfig(fused_first_pass=True, **cfg), ckpt=True)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-12, atol=0)
    for name, g in g_u.items():
        torch.testing.assert_close(g_f[name], g, rtol=1e-9, atol=1e-14, msg=name)


def test_fused_first_pass_trains_with_dropout():
    m = tiny(dropout=0.1)
    ids, labels = batch()
    loss, stats = AlumObjective(m, AlumConfig(fused_first_pass=True))(ids, labels)
    assert stats["adv_skipped"] == 0 and float(stats["adv_loss"]) > 0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert m.roberta.embeddings.word_embeddings.weight.grad is not None


def test_fused_first_pass_skip_keeps_weights_finite(monkeypatch):
    """A non-finite first perturbed pass under fusion: the adversarial term is skipped and the
    MLM gradient does not pass through the poisoned doubled graph (0 * NaN = NaN)."""
    real = M.encode

    def nan_in_second_half(model, h):
        out = real(model, h)
        if h.shape[0] == 2 * B:  # the doubled batch: poison the perturbed half
            out = torch.cat([out[:B], out[B:] * float("nan")])
        return out

    monkeypatch.setattr(M, "encode", nan_in_second_half)
    m = tiny()
    ids, labels = batch()
    obj = AlumObjective(m, AlumConfig(fused_first_pass=True))
    loss, stats = obj(ids, labels)
    assert stats["adv_skipped"] == 1 and obj.skipped_total == 1
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # The loss is the plain MLM loss of the clean pass (dropout off).
    torch.manual_seed(0)
    plain, _ = AlumObjective(m, AlumConfig(enabled=False))(ids, labels)
    torch.testing.assert_close(loss.detach(), plain.detach())


def test_fused_first_pass_refuses_zero3():
    """ZeRO-3 re-gathers a module's parameters once per forward; the fused graph is traversed
    twice. The objective says so instead of failing inside LayerNorm's backward."""
    from alum_ds.config import ConfigError

    m = tiny()
    next(m.parameters()).ds_id = 0  # what ZeRO-3 marks its partitioned parameters with
    ids, labels = batch()
    with pytest.raises(ConfigError, match="fused_first_pass.*ZeRO-3"):
        AlumObjective(m, AlumConfig(fused_first_pass=True))(ids, labels)
    AlumObjective(m, AlumConfig())(ids, labels)  # unfused is fine


# ---------------------------------------------------------------- 12. fused KL / CE forms, host syncs


def test_fast_kl_forms_equal_the_autograd_reference():
    a = torch.randn(6, 40, dtype=torch.float64, generator=gen(4)) * 2
    b = torch.randn(6, 40, dtype=torch.float64, generator=gen(5)) * 2
    y = torch.randint(0, 40, (6,), generator=gen(6))
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    fast = A.kl_to_target(A.Target.of(a1), b1) + 3 * A.symmetric_kl(a1, b1) + 0.5 * O.cross_entropy(a1, y)
    ref = (kl_logits(a2.detach(), b2) + 3 * (kl_logits(a2.detach(), b2) + kl_logits(b2.detach(), a2))
           + 0.5 * torch.nn.functional.cross_entropy(a2, y))
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=0)
    fast.backward()
    ref.backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-10, atol=1e-15)
    # Low-precision logits: the arithmetic is fp32, the gradient comes back in the logits' dtype.
    h = a.bfloat16().requires_grad_()
    out = A.symmetric_kl(h, b.bfloat16()) + O.cross_entropy(h, y)
    assert out.dtype == torch.float32
    out.backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad).all()
    # (No gradcheck: with its stop-gradients the symmetric KL's gradient is, by design, not the
    # derivative of its value; the autograd reference above is the specification.)


def test_alum_forward_reads_the_device_once(monkeypatch):
    """Every finite check, the precision guard and the stats stay on the device: one host read per
    ALUM forward (plus the skip's any_rank, whose all-reduce the trainer supplies). float()/
    bool()/item() on a CUDA tensor is a device sync each."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counting(self, *a, _real=real, _name=name, **kw):
            reads.append(_name)
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counting)
    m = tiny(dropout=0.1)
    ids, labels = batch()
    for fused in (False, True):
        reads.clear()
        _, stats = AlumObjective(m, AlumConfig(fused_first_pass=fused))(ids, labels)
        assert reads == ["tolist"], reads
        assert all(isinstance(v, int) or (v.ndim == 0 and not v.requires_grad) for v in stats.values())
    reads.clear()
    AlumObjective(m, AlumConfig(enabled=False))(ids, labels)
    assert reads == []


# ---------------------------------------------------------------- GPU precision (run when a GPU is lent)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_precision_guard_cuda(dtype):
    m = tiny(dtype=dtype).cuda()
    ids, labels = (t.cuda() for t in batch())
    _, h0, clean, f = parts(m, ids, labels)
    g = torch.Generator(device="cuda").manual_seed(0)
    if dtype == torch.float32:
        assert not adversarial_loss(f, h0, clean, AlumConfig(), generator=g).skipped
        return
    with pytest.raises(PrecisionError) as err:
        adversarial_loss(f, h0, clean, AlumConfig(sigma=1e-9, eta=1e-5, epsilon=1e-5), generator=g)
    r = radius_from(str(err.value))
    res = adversarial_loss(f, h0, clean, AlumConfig(eta=r, epsilon=r), generator=g)
    assert not res.skipped and math.isfinite(float(res.loss.detach()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fp16_ascent_gradient_does_not_underflow_cuda(monkeypatch, dropout):
    """fp16 on the GPU (trap 5): at delta_0 ~ sigma the KL and its gradient are far below fp16's
    range; the KL is scaled before the gradient, so the ascent gradient is finite and non-zero on
    every token and each token's step is eta."""
    m = tiny(dropout=dropout, dtype=torch.float16).cuda()
    ids, labels = (t.cuda() for t in batch())
    _, h0, clean, f = parts(m, ids, labels)
    r = A.surviving_radius(h0)  # a radius fp16 keeps (the precision guard's suggestion)
    calls = spy_project(monkeypatch)
    cfg = AlumConfig(eta=r, epsilon=10.0)
    res = adversarial_loss(f, h0, clean, cfg, generator=torch.Generator(device="cuda").manual_seed(0))
    assert not res.skipped and torch.isfinite(res.loss) and float(res.grad_norm) > 0
    d0 = torch.randn(h0.shape, dtype=torch.float32, device="cuda",
                     generator=torch.Generator(device="cuda").manual_seed(0)) * cfg.sigma
    (pre, _), = calls
    step = token_norm(pre - d0, "linf")
    torch.testing.assert_close(step, torch.full_like(step, r), rtol=1e-4, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_first_pass_equals_unfused_cuda():
    cfg = dict(eta=0.1, epsilon=0.1)

    def run(fused: bool):
        ids, labels = (t.cuda() for t in batch())
        m = tiny(seed=1, dtype=torch.float64).cuda()
        obj = AlumObjective(m, AlumConfig(fused_first_pass=fused, **cfg))
        obj.generator = torch.Generator(device="cuda").manual_seed(3)
        loss, _ = obj(ids, labels)
        loss.backward()
        return loss.detach(), params_grads(m)

    (loss_u, g_u), (loss_f, g_f) = run(False), run(True)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-10, atol=0)
    for name, g in g_u.items():
        torch.testing.assert_close(g_f[name], g, rtol=1e-7, atol=1e-12, msg=name)


# ---------------------------------------------------------------- controls and robustness measures


def test_random_perturbation_control_takes_no_ascent_step(monkeypatch):
    """alum.perturbation=random: the objective runs its task's logits twice (clean and
    adversarial passes), never a third (the ascent's), takes no gradient w.r.t. delta, and delta
    has ALUM's radius (eta per token, L-inf)."""
    ids, labels = batch()
    calls, grads = [], []
    real_grad = torch.autograd.grad
    monkeypatch.setattr(A.torch.autograd, "grad", lambda *a, **k: grads.append(1) or real_grad(*a, **k))

    def count(obj: AlumObjective):
        real = obj.logits
        monkeypatch.setattr(obj, "logits", lambda h, b: calls.append(1) or real(h, b))
        return obj

    for perturbation, passes, ascents in (("random", 2, 0), ("adversarial", 3, 1)):
        calls.clear()
        grads.clear()
        obj = count(AlumObjective(tiny(dropout=0.1, seed=2), AlumConfig(perturbation=perturbation)))
        loss, stats = obj(ids, labels)
        assert len(calls) == passes and len(grads) == ascents, perturbation
        assert stats["adv_skipped"] == 0 and float(stats["adv_loss"]) > 0
        assert float(stats["delta_norm"]) == pytest.approx(1e-3, rel=2e-2)  # eta, both arms
        loss.backward()  # the final backward still trains on the symmetric KL


def test_mlm_pgd_matches_a_hand_computed_attack():
    """mode="pgd": the summed MLM cross-entropy at the clean input and at each iterate of the
    L-inf attack (signed steps of 2.5 r / K, clamped to r), against the same attack written out
    by hand on the model's own pieces; a larger radius never lowers the final loss here."""
    m = tiny(seed=4).to(torch.float64).eval()
    ids, labels = batch(seed=5)
    obj = AlumObjective(m, AlumConfig()).eval()
    r, k = 0.05, 2
    got, stats = obj(ids, labels, mode="pgd", radius=r, steps=k)
    positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
    targets = labels.reshape(-1)[positions]
    with torch.no_grad():
        h0 = M.embed(m, ids)
    delta = torch.zeros(h0.shape, dtype=torch.float32)
    want = []
    for i in range(k + 1):
        d = delta.clone().requires_grad_(True)
        logits = M.head_at(m, M.encode(m, h0 + d.to(h0.dtype)), positions)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        want.append(float(loss.detach()))
        if i < k:
            (g,) = torch.autograd.grad(loss, d)
            delta = (delta + 2.5 * r / k * g.sign()).clamp(-r, r)
    assert stats["rows"] == targets.numel()
    assert got.tolist() == pytest.approx(want, rel=1e-9)
    assert got[-1] > got[0]  # the attack raises the loss
    clean, _ = obj(ids, labels, mode="pgd", radius=0.0, steps=k)
    assert clean.tolist() == pytest.approx(want[:1], rel=1e-12)  # radius 0: the clean loss only
