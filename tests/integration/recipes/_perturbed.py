"""Tiny models whose norm weights and biases are not the init values (1 / 0).

HF initialises RMSNorm / LayerNorm weights to 1 (Gemma's w to 0) and most biases to 0, which
would hide a missing γ, a wrong (1 + w) or a forgotten bias term. Every 1-D parameter (norm
weights, biases) gets seeded noise here, in place, so the recipes see non-trivial values.
"""

from __future__ import annotations

import torch

import oculi_dsl as oculi
from oculi_dsl.models import OculiModel


def perturbed(family: str, *, seed: int = 1, scale: float = 0.3, **overrides: object) -> OculiModel:
    model = oculi.testing.tiny_model(family, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.hf.parameters():
            if param.dim() == 1:
                param.add_(scale * torch.randn(param.shape, generator=gen))
    return model
