"""The cheaper ALUM variants (docs/ALUM.md, "Cheaper variants"), one process, tiny models: each
is exact ALUM bitwise at its neutral setting; the row fraction runs the adversarial passes on
the rows its statistics name; the perturbation table is read, updated by the one backward,
guarded and kept as checkpoint state."""

from __future__ import annotations

import pytest
import torch

from alum_ds import model as M
from alum_ds.adversarial import PrecisionError, project
from alum_ds.config import AlumConfig
from alum_ds.objective import AlumObjective
from tests.test_alum import batch, tiny


def refused(alum: AlumConfig, key: str) -> bool:
    """The alum section refuses ``alum`` naming ``key`` (what validate turns into a ConfigError)."""
    return any(k == key and not ok for k, ok, _ in alum.checks())


def step(alum: AlumConfig, *, seed: int = 3, b: int = 4, dtype=torch.float64, gen_seed: int = 7,
         model=None, obj=None):
    """One objective forward and backward: (loss, stats, parameter gradients, objective)."""
    m = model if model is not None else tiny(dtype=dtype, seed=seed)
    o = obj if obj is not None else AlumObjective(m, alum)
    o.generator = torch.Generator().manual_seed(gen_seed)
    ids, labels = batch(seed, b=b)
    loss, stats = o(ids, labels, True, None)
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
    for p in m.parameters():
        p.grad = None
    return loss.detach(), stats, grads, o


def test_neutral_settings_equal_exact_alum_bitwise():
    ref_loss, ref_stats, ref_grads, _ = step(AlumConfig(), dtype=torch.float32)
    for neutral in (AlumConfig(row_fraction=1.0), AlumConfig(every_k_steps=1),
                    AlumConfig(perturbation="adversarial")):
        loss, stats, grads, _ = step(neutral, dtype=torch.float32)
        assert torch.equal(loss, ref_loss)
        assert torch.equal(stats["adv_loss"], ref_stats["adv_loss"])
        assert "adv_sequences" not in stats and stats["adv_rows"] == stats["rows"]
        assert len(grads) == len(ref_grads) and all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


def test_every_k_steps_schedule():
    exact = AlumConfig()
    for start in (0, 5):
        assert [exact.on_at(s, start) for s in range(12)] == [s >= start for s in range(12)]
    k3 = AlumConfig(every_k_steps=3)
    assert [s for s in range(12) if k3.on_at(s, 2)] == [2, 5, 8, 11]
    assert not AlumConfig(enabled=False, every_k_steps=1).on_at(5, 0)
    assert refused(AlumConfig(every_k_steps=0), "alum.every_k_steps")


class Shapes:
    """Records the batch size of every encoder pass."""

    def __init__(self, m):
        self.sizes: list[int] = []
        self.m = m
        self.orig = M.encode

    def __enter__(self):
        def spy(model, h, *a, **k):
            self.sizes.append(h.shape[0])
            return self.orig(model, h, *a, **k)
        M.encode = spy
        return self

    def __exit__(self, *exc):
        M.encode = self.orig


def test_row_fraction_runs_the_adversarial_passes_on_its_rows_only():
    b = 6
    alum = AlumConfig(row_fraction=0.5)
    m = tiny(dtype=torch.float64, seed=3)
    with Shapes(m) as spy:
        loss, stats, grads, _ = step(alum, b=b, model=m)
    seqs = stats["adv_sequences"]
    assert seqs.numel() == 3 and torch.equal(seqs, seqs.sort().values) and len(set(seqs.tolist())) == 3
    # clean pass on all 6, ascent and adversarial pass on the 3 named sequences
    assert spy.sizes == [b, 3, 3]
    ids, labels = batch(3, b=b)
    assert stats["adv_rows"] == int((labels[seqs] != -100).sum())
    assert stats["rows"] == int((labels != -100).sum())
    # the adversarial term is exact ALUM's on those sequences alone (same noise stream: the
    # generator after the draw of the subset)
    g = torch.Generator().manual_seed(7)
    expect_seqs = torch.randperm(b, generator=g)[:3].sort().values
    assert torch.equal(expect_seqs, seqs)
    o2 = AlumObjective(m, AlumConfig())
    o2.generator = g
    _, sub = o2(ids[seqs], labels[seqs], True, None)
    assert float(stats["adv_loss"]) == pytest.approx(float(sub["adv_loss"]), rel=1e-9)
    assert float(stats["adv_loss"]) > 0 and all(torch.isfinite(x).all() for x in grads)
    # at least one sequence, and refused with the fused first pass
    _, st, _, _ = step(AlumConfig(row_fraction=0.01), b=b)
    assert st["adv_sequences"].numel() == 1
    assert refused(AlumConfig(row_fraction=0.5, fused_first_pass=True), "alum.row_fraction")
    assert refused(AlumConfig(row_fraction=0.0), "alum.row_fraction")


def test_table_perturbation_needs_no_ascent_and_the_backward_updates_the_table():
    alum = AlumConfig(perturbation="table", eta=1e-3, epsilon=1e-3)
    m = tiny(dtype=torch.float64, seed=3)
    o = AlumObjective(m, alum)
    with Shapes(m) as spy:
        loss, stats, grads, _ = step(alum, model=m, obj=o)
    assert spy.sizes == [4, 4]  # clean and perturbed forward only: no ascent pass
    table = o.delta_table
    ids, _ = batch(3, b=4)
    seen = torch.zeros(table.shape[0], dtype=torch.bool)
    seen[ids.reshape(-1)] = True
    assert table.dtype == torch.float32 and table.shape == (300, m.config.hidden_size)
    assert (table[~seen] == 0).all()                      # rows of unseen tokens untouched
    once = torch.bincount(ids.reshape(-1), minlength=300) == 1
    # an eta step on the row of every token seen once (a token seen more often gets the mean)
    assert (table[once].abs().amax(-1) > 0.5e-3).all()
    assert table.abs().max() <= 1e-3                      # in the epsilon ball
    # the next step starts from the table: its perturbation is table[ids] + noise, projected
    first = table.clone()
    seen_h = []
    orig = M.encode

    def spy2(model, h, *a, **k):
        seen_h.append(h.detach())
        return orig(model, h, *a, **k)

    M.encode = spy2
    try:
        step(alum, model=m, obj=o, gen_seed=11)
    finally:
        M.encode = orig
    h0, h_adv = seen_h
    g11 = torch.Generator().manual_seed(11)
    noise = torch.randn(h0.shape, dtype=torch.float32, generator=g11) * alum.sigma
    want = project(first[ids.reshape(-1)].reshape(h0.shape) + noise, alum.epsilon, "linf")
    assert torch.allclose(h_adv - h0, want.double(), atol=1e-12)


def test_table_guards_and_state():
    alum = AlumConfig(perturbation="table")
    m = tiny(dtype=torch.float64, seed=3)
    o = AlumObjective(m, alum)
    step(alum, model=m, obj=o)
    before = o.delta_table.clone()
    ids, _ = batch(3, b=4)
    # a non-finite free gradient leaves the table as it was
    g = torch.full((4, 16, m.config.hidden_size), float("nan"))
    o._update_table(ids, torch.zeros_like(g), g)
    assert torch.equal(o.delta_table, before)
    # state round trip, onto a fresh objective
    o2 = AlumObjective(tiny(dtype=torch.float64, seed=3), alum)
    o2.load_extra_state(o.extra_state())
    assert torch.equal(o2.delta_table, before)
    assert AlumObjective(m, AlumConfig()).extra_state() == {}
    # the precision guard stands: the table's first perturbation rounds away in bf16
    ob = AlumObjective(tiny(dtype=torch.bfloat16, seed=3), alum)
    with pytest.raises(PrecisionError):
        ob(*batch(3, b=4), True, None)
    assert refused(AlumConfig(perturbation="table", fused_first_pass=True), "alum.fused_first_pass")


def test_fine_tuning_refuses_the_pretraining_variants():
    from alum_ds.config import ConfigError, load_config
    from alum_ds.finetune.config import FinetuneConfig

    assert load_config(None, [], cls=FinetuneConfig).alum.alpha == 1.0
    for flag, key in (("--alum.row_fraction=0.5", "alum.row_fraction"),
                      ("--alum.every_k_steps=2", "alum.every_k_steps"),
                      ("--alum.perturbation=table", "alum.perturbation")):
        with pytest.raises(ConfigError, match=f"^{key}: .*pretraining setting"):
            load_config(None, [flag], cls=FinetuneConfig)
