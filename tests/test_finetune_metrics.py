"""GLUE's metrics against scikit-learn and scipy on fixed predictions, and regression fine-tuning's
objective (MSE; ALUM's squared-difference regulariser) on a tiny model. One process, < 1 s each."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from alum_ds.adversarial import adversarial_loss, squared_difference, squared_to_target
from alum_ds.config import AlumConfig
from alum_ds.finetune import data as FD
from alum_ds.finetune import metrics as FM
from alum_ds.finetune.objective import RegressionObjective
from alum_ds.objective import Batch

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


def _cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    noisy = np.where(rng.random(200) < 0.3, 1 - y, y)
    three = rng.integers(0, 3, 150)
    return [(y, noisy), (y, y), (y, 1 - y), (y, np.zeros_like(y)), (y, np.ones_like(y)),
            (three, np.where(rng.random(150) < 0.4, rng.integers(0, 3, 150), three)),
            (np.array([0, 0, 0]), np.array([0, 0, 0])), (np.array([1, 0]), np.array([1, 1]))]


def test_classification_metrics_match_scikit_learn() -> None:
    for y, p in _cases():
        assert FM.accuracy(y, p) == pytest.approx(sklearn_metrics.accuracy_score(y, p))
        assert FM.matthews(y, p) == pytest.approx(sklearn_metrics.matthews_corrcoef(y, p), abs=1e-12)
        ref = sklearn_metrics.f1_score(y, p, average="macro")
        assert FM.compute(["macro_f1"], y, p)["macro_f1"] == pytest.approx(ref)
        if max(y.max(), p.max()) <= 1:
            ref = sklearn_metrics.f1_score(y, p, pos_label=1, zero_division=0)
            assert FM.f1_positive(y, p) == pytest.approx(ref)


def test_correlations_match_scipy_with_ties() -> None:
    rng = np.random.default_rng(1)
    gold = np.round(rng.uniform(0, 5, 300) * 5) / 5  # STS-B-like scores: many ties
    for pred in (gold + rng.normal(0, 1, 300), np.round(gold + rng.normal(0, 0.5, 300)), -gold,
                 rng.normal(0, 1, 300)):
        assert FM.pearson(gold, pred) == pytest.approx(stats.pearsonr(gold, pred)[0], abs=1e-12)
        assert FM.spearman(gold, pred) == pytest.approx(stats.spearmanr(gold, pred)[0], abs=1e-12)
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0])
    assert FM.rankdata(x).tolist() == stats.rankdata(x).tolist()
    assert np.isnan(FM.pearson(gold, np.ones_like(gold)))  # constant predictions: undefined
    assert FM.mse([1.0, 2.0], [1.5, 1.0]) == pytest.approx(0.625)


def test_regression_labels_are_numbers_or_a_one_line_error() -> None:
    ex = FD.Examples(["a", "b"], None, ["3.5", "x"], ["f:2", "f:3"], "f")
    with pytest.raises(FD.DataError, match=r"f:3: label 'x' is not a number"):
        FD.RealLabels().ids(ex)
    ok = FD.Examples(["a", "b"], None, ["3.5", "0"], ["f:2", "f:3"], "f")
    assert FD.RealLabels().ids(ok).tolist() == [3.5, 0.0]


def test_squared_divergence_gradients_pull_both_sides() -> None:
    c = torch.tensor([[1.0], [2.0]], requires_grad=True)
    a = torch.tensor([[1.5], [1.0]], requires_grad=True)
    loss = squared_difference(c, a)
    assert float(loss.detach()) == pytest.approx((0.25 + 1.0) / 2)
    loss.backward()
    assert c.grad.flatten().tolist() == pytest.approx([-0.5, 1.0])  # 2 (c - a) / rows
    assert a.grad.flatten().tolist() == pytest.approx([0.5, -1.0])
    c.grad = a.grad = None
    squared_to_target(c, a).backward()  # the ascent's objective: the clean side is the target
    assert c.grad is None and a.grad.flatten().tolist() == pytest.approx([0.5, -1.0])


def _tiny_regressor():
    from transformers import RobertaForSequenceClassification

    from alum_ds.model import roberta_config

    cfg = roberta_config("tiny", vocab_size=300, seq_len=32, dropout=0.0)
    cfg.num_labels = 1
    torch.manual_seed(0)
    return RobertaForSequenceClassification(cfg).eval()


def test_regression_objective_is_mse_plus_alpha_times_the_squared_difference() -> None:
    model = _tiny_regressor()
    torch.manual_seed(1)
    x = torch.randint(3, 300, (4, 10))
    mask = torch.ones_like(x)
    y = torch.tensor([0.5, 1.0, 2.5, 4.0])
    alum = AlumConfig(alpha=2.0, start_fraction=0.0, eta=0.5, epsilon=0.5, sigma=1e-3)
    obj = RegressionObjective(model, alum)
    out, _ = obj(x, mask, y, mode="predict")
    assert out.shape == (4, 1)
    plain, stats_plain = obj(x, mask, y, alum_on=False)
    assert float(plain) == pytest.approx(float(torch.nn.functional.mse_loss(out[:, 0], y)), rel=1e-6)
    assert "mse_loss" in stats_plain and "adv_loss" not in stats_plain
    torch.manual_seed(2)
    total, st = obj(x, mask, y)
    adv = float(st["adv_loss"])
    assert adv > 0 and float(total) == pytest.approx(float(plain) + 2.0 * adv, rel=1e-5)
    # The ascent raises the squared difference well above a random step of the same size.
    from alum_ds.model import embed

    h0 = embed(model, x, None, mask).detach()
    b = Batch(x, y, attention_mask=mask)

    def f(h: torch.Tensor) -> torch.Tensor:
        return obj.logits(h, b)

    clean = f(h0)
    torch.manual_seed(3)
    ascended = adversarial_loss(f, h0, clean, alum, divergence="squared")
    torch.manual_seed(3)
    rand = adversarial_loss(f, h0, clean, replace(alum, perturbation="random"), divergence="squared")
    assert float(ascended.loss) > 2 * float(rand.loss) > 0
    with pytest.raises(ValueError, match="robust accuracy needs a classification task"):
        obj(x, mask, y, mode="robust", radius=0.1, steps=1)
