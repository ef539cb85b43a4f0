"""Test-side references for the ALUM maths: the plain autograd forms the fused ones in
``alum_ds.adversarial`` are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alum_ds.adversarial import _kl_dtype


def kl_logits(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) from logits, in the dtype the production KLs use (at least fp32): summed over
    the vocabulary, mean over positions, by plain autograd."""
    dt = _kl_dtype(p_logits, q_logits)
    logp = F.log_softmax(p_logits.to(dt), dim=-1)
    logq = F.log_softmax(q_logits.to(dt), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).mean()
