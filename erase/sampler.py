"""The differentiable flow-match Euler sampler, with step-wise gradient checkpointing.

MCE's loss is on the *final* latent, so gradients flow back through every sampling step.
Plain backprop keeps every step's activations alive (memory grows with the step count).
With `checkpointing=True` each step but the last runs inside torch.utils.checkpoint
(non-reentrant): its activations are dropped after the forward, only its input latent is kept,
and the step is recomputed when backward reaches it. Memory is then about one step's
activations whatever the step count, at the cost of one extra forward per step. The last step
keeps its activations: backward needs them first, so recomputing it would be pure waste.

Weights are frozen (requires_grad False), so only gradients for the latents and for whatever
the velocity function closes over (mask values, prompt embeddings) are ever formed.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], latents: torch.Tensor,
           sigmas: torch.Tensor, checkpointing: bool = True) -> torch.Tensor:
    """Integrate x from sigmas[0] (noise) to sigmas[-1] (0, the image): x += (σ_next - σ) · v(x, σ)."""
    x = latents
    steps = len(sigmas) - 1
    for k in range(steps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]

        def euler_step(x, sigma=sigma, sigma_next=sigma_next):
            return x + (sigma_next - sigma) * velocity(x, sigma)

        if checkpointing and torch.is_grad_enabled() and k < steps - 1:
            x = checkpoint(euler_step, x, use_reentrant=False)
        else:
            x = euler_step(x)
    return x
