"""The held-out adversarial smoothness measure (alum_ds.smoothness) against a brute-force search
where the perturbation has two dimensions, exactly 0 where the output ignores the input, and
through the MLM objective on a tiny model."""

from __future__ import annotations

import pytest
import torch

from alum_ds import model as M
from alum_ds.adversarial import add_perturbation, normalize, symmetric_kl
from alum_ds.config import AlumConfig
from alum_ds.objective import AlumObjective
from alum_ds.smoothness import adversarial_smoothness


def toy(seed: int) -> tuple[torch.nn.Module, torch.Tensor]:
    """A two-layer network on one token with a 2-dimensional embedding output: the whole
    perturbation is two numbers, so a grid over the box finds its max."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 7)).double()
    h0 = torch.randn(1, 1, 2, dtype=torch.float64)
    return net, h0


def brute_force(net, h0, r: float, n: int = 201) -> float:
    """The largest symmetric KL over an n x n grid of the box (its corners included)."""
    with torch.no_grad():
        grid = torch.linspace(-r, r, n, dtype=torch.float64)
        d = torch.cartesian_prod(grid, grid)  # [n*n, 2]
        p = torch.log_softmax(net(h0.reshape(1, 2)), -1)
        q = torch.log_softmax(net(h0.reshape(1, 2) + d), -1)
        return float(((p.exp() - q.exp()) * (p - q)).sum(-1).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("r", [0.05, 0.5])
def test_smoothness_finds_the_brute_force_max(seed, r):
    net, h0 = toy(seed)
    found = adversarial_smoothness(lambda h: net(h).reshape(1, -1), h0, radius=r, steps=10,
                                   sigma=1e-3, generator=torch.Generator().manual_seed(seed))
    best = brute_force(net, h0, r)
    assert best > 0
    # PGD's iterates are feasible: never above the max (the grid holds the corners); and
    # ALUM's normalised ascent reaches it (the max sits on the box's boundary here).
    assert float(found) <= best * (1 + 1e-7)
    assert float(found) >= 0.98 * best


def test_smoothness_is_zero_for_a_model_that_ignores_its_input():
    bias = torch.randn(5, 11)
    h0 = torch.randn(1, 5, 8)
    s = adversarial_smoothness(lambda h: bias, h0, radius=0.1, steps=3)
    assert float(s) == 0.0
    # the same when the input enters the graph but not the output's value
    s = adversarial_smoothness(lambda h: bias + 0.0 * h.sum(), h0, radius=0.1, steps=3)
    assert float(s) == 0.0


def test_mlm_smoothness_through_the_objective():
    torch.manual_seed(0)
    m = M.build_model(preset="tiny", vocab_size=300, seq_len=16, dropout=0.0).double().eval()
    obj = AlumObjective(m, AlumConfig()).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 300, (2, 16), generator=g)
    sel = torch.rand(2, 16, generator=g) < 0.3
    sel[:, 1] = True
    labels = torch.where(sel, ids, torch.full_like(ids, -100))
    ids = torch.where(sel, torch.full_like(ids, 4), ids)
    eps = AlumConfig().epsilon
    s, st = obj(ids, labels, mode="adv_kl", radii=(0.0, eps, 3 * eps), steps=3)
    assert st["rows"] == int(sel.sum())
    assert float(s[0]) == 0.0 and 0 < float(s[1]) < float(s[2])
    # deterministic: a function of model and batch
    s2, _ = obj(ids, labels, mode="adv_kl", radii=(0.0, eps, 3 * eps), steps=3)
    assert torch.equal(s, s2)
    # the attack beats a random step of training's shape and radius (alum.perturbation=random)
    b = obj.batch(ids, labels)
    with torch.no_grad():
        h0 = obj.embed(b)
        clean = obj.logits(h0, b)
        rnd = eps * normalize(torch.randn(h0.shape, generator=g, dtype=torch.float32), "linf")
        r_kl = float(symmetric_kl(clean, obj.logits(add_perturbation(h0, rnd), b)))
    assert float(s[1]) > 3 * r_kl
