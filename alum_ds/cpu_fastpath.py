"""Faster dropout and attention for training a stock Hugging Face RoBERTa on the CPU.

Profiling a small-preset forward on one CPU thread (fp32, 8 x 128 tokens) put ~60% of it outside
the matrix products, and a quarter in dropout alone: ``torch.bernoulli_`` draws a double per
element (~5 ns each here), four times the cost of the int32 draws below. The attention's SDPA
"math" fallback (flash attention on the CPU has no dropout) adds a ``_safe_softmax`` (isneginf,
all, where over the [B, heads, T, T] scores) and scales both q and k. An ALUM step runs three
forwards to a plain step's one, so this share weighs on it most.

``install(model)`` changes no weight and no result's distribution, only how it is computed, and
only where it pays: a CPU tensor in training with dropout > 0. Everything else (GPU tensors, eval
mode, a padding mask, p = 0) goes to the stock code (``F.dropout``, ``sdpa_attention_forward``).

- Dropout masks: keep an element iff a uniform 31-bit integer from torch's generator is at least
  round(p * 2**31), so P(drop) is p to within 2**-32; kept values are scaled by 1/(1-p), as
  ``F.dropout``. The masks come from torch's default generator, so seeding, checkpointed RNG
  state (exact resume) and non-reentrant activation checkpointing (which replays the generator)
  work as before; the stream differs from ``bernoulli_``'s.
- Attention: softmax((q * scale) k^T) -> dropout -> @ v, which is what the stock eager and SDPA
  paths compute without a mask.

The attention is registered with transformers' ``AttentionInterface`` under ``ATTENTION`` (with
SDPA's mask builder, so masks keep SDPA's format); the name lives in the in-memory config only
(``_attn_implementation`` is not saved), so exported folders load with stock transformers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "alum_ds_cpu"


@torch.library.custom_op("alum_ds::dropout_scale", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def dropout_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout's multiplier for ``x``: 0 or 1/(1-p) per element (in ``x``'s dtype), from
    int32 draws of torch's default generator. An opaque op (a custom op) so that torch.compile
    keeps it whole instead of breaking its graph at ``random_``; tagged nondeterministic_seeded so
    that compiled activation checkpointing replays the generator for it as for torch's own
    random ops (untagged, the recomputed mask differed from the forward's)."""
    keep = torch.empty(x.shape, dtype=torch.int32).random_() >= round(p * 2**31)
    return keep.to(x.dtype).mul_(1.0 / (1.0 - p))


@dropout_scale.register_fake
def _(x: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(x)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)``: the int32-mask form for CPU tensors, the stock one else. The
    multiplier is saved for the backward (as ``F.dropout`` does: a bool mask would save memory,
    but multiplying by one costs twice a same-dtype product, in the backward too)."""
    if not training or p == 0.0 or p == 1.0 or x.device.type != "cpu":
        return F.dropout(x, p, training)
    return x * dropout_scale(x.detach(), p)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` through ``dropout`` above (same ``p``, same state dict: none)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An ``AttentionInterface`` function: [B, heads, T, d] in, [B, T, heads, d] out."""
    if attention_mask is not None or dropout == 0.0 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    weights = torch.softmax(torch.matmul(query * scale, key.transpose(-1, -2)), dim=-1)
    out = torch.matmul(_dropout_fn(weights, dropout), value)
    return out.transpose(1, 2).contiguous(), None


_dropout_fn = dropout  # ``attention``'s ``dropout`` argument (HF's name) shadows the function


def install(model: nn.Module) -> nn.Module:
    """Route ``model``'s dropout modules and self-attention through the functions above (in place;
    returns ``model``). Idempotent."""
    # Families whose attention does not go through the interface (DeBERTa's disentangled
    # attention) keep theirs; their dropout modules still take the fast path.
    if getattr(model, "_supports_attention_backend", False):
        AttentionInterface.register(ATTENTION, attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        model.set_attn_implementation(ATTENTION)
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p, child.inplace)
                fast.train(child.training)
                setattr(parent, name, fast)
    return model
