"""The FLOP model behind the MFU figures, checked against FLOPs counted by PyTorch.

``FlopCounterMode`` counts every matrix product autograd actually runs. The checks: a plain step
is the FLOP model's 6N + 12·L·h·s per token (with the head at the masked positions only), and an
ALUM step (K = 1) is 8/3 of a plain step, which also proves the ascent runs no weight-gradient
products (with them it would be 9/3)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from alum_ds.config import AlumConfig
from alum_ds.metrics import flops_per_token, forward_equivalents
from alum_ds.model import build_model, non_embedding_params
from alum_ds.objective import AlumObjective

B, S, V = 2, 64, 512


def _step_flops(alum_on: bool) -> tuple[int, int, torch.nn.Module]:
    torch.manual_seed(0)
    mlm = build_model(preset="tiny", vocab_size=V, seq_len=S, dropout=0.0)
    # The counter has no formula for the CPU's fused attention kernel; the eager attention is the
    # same arithmetic as explicit matrix products it counts.
    mlm.set_attn_implementation("eager")
    obj = AlumObjective(mlm, AlumConfig(enabled=True))
    ids = torch.randint(5, V, (B, S))
    labels = torch.full((B, S), -100)
    labels[:, ::7] = ids[:, ::7]  # fixed masked positions, so both steps predict the same ones
    with FlopCounterMode(display=False) as fc:
        loss, _ = obj(ids, labels, alum_on=alum_on)
        loss.backward()
    return fc.get_total_flops(), int((labels != -100).sum()), mlm


def test_plain_step_matches_the_flop_model() -> None:
    counted, masked, mlm = _step_flops(alum_on=False)
    c = mlm.config
    head = mlm.lm_head
    head_dense = head.dense.weight.numel()
    # The FLOP model's N: non-embedding parameters; the head's dense layer is among them but runs
    # at the masked positions only, and its decoder (tied to the embeddings) is outside N.
    encoder_n = non_embedding_params(mlm) - sum(p.numel() for p in head.parameters()
                                                if p is not head.decoder.weight)
    model = B * S * flops_per_token(encoder_n, c.num_hidden_layers, c.hidden_size, S)
    model += masked * 6 * (head_dense + head.decoder.weight.numel())
    # Biases and LayerNorm weights are in N but not matrix products: within a percent.
    assert counted == pytest.approx(model, rel=0.01)


def test_alum_step_is_eight_thirds_of_a_plain_step() -> None:
    plain, _, _ = _step_flops(alum_on=False)
    alum, _, _ = _step_flops(alum_on=True)
    expected = forward_equivalents(True, 1) / forward_equivalents(False, 1)
    assert alum / plain == pytest.approx(expected, rel=0.02)
    # Weight gradients in the ascent would add one more forward-equivalent: 9/3.
    assert alum / plain < 2.9
