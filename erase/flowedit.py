"""FlowEdit: edit an image towards another prompt along the flow, without inverting it (docs/method.md, section 7).

With x_t = (1 - t)·x_0 + t·ε and the schedule running from t = 1 (noise) to t = 0 (image), the
edited latent starts at the source image and, at every step from the start of the edit down to
0, moves by the difference of two velocities:

    z_src = (1 - t)·x_src + t·n                      the source image noised to t (n fresh noise)
    z_tar = z_edit + (z_src - x_src)                 the edited image, noised with the same n
    z_edit += (t_next - t) · mean_n [v(z_tar, t, c_target) - v(z_src, t, c_source)]

The steps before the start are skipped: the edit keeps the source's layout and changes what
the prompts disagree on. Where both prompts are the same, the edit is the source itself.

The reference code's erasure target is such an edit of the original model's image of each
concept prompt towards the prompt with the concept substituted (`--target edit`); it needs no
gradient and is computed once per (prompt, noise seed).
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def edit_start(num_steps: int, strength: float) -> int:
    """The first edited step of a `num_steps` schedule: the last `strength` share of it is edited."""
    return num_steps - max(1, round(strength * num_steps))


@torch.no_grad()
def flowedit(source_velocity: Velocity, target_velocity: Velocity, source: torch.Tensor, sigmas: torch.Tensor, *,
             start: int, noise: Callable[[int, int], torch.Tensor], average: int = 1) -> torch.Tensor:
    """The edit of the clean latents `source` (batch first) from step `start` of `sigmas` to its end.

    `noise(step, k)` gives the k-th fresh noise of a step, shaped like `source`; `average` noises
    are averaged in each step.
    """
    edited = source.clone()
    for step in range(start, len(sigmas) - 1):
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        delta = torch.zeros_like(source)
        for k in range(average):
            noised_source = (1 - sigma) * source + sigma * noise(step, k)
            noised_edit = edited + (noised_source - source)
            delta += target_velocity(noised_edit, sigma) - source_velocity(noised_source, sigma)
        edited = edited + (sigma_next - sigma) * delta / average
    return edited


def edit_noise_seeds(seeds: list[int], step: int, k: int) -> list[int]:
    """Seeds of the k-th fresh noise of an edit step, one per sample: set by the sample's own seed,
    so a (prompt, seed) pair is edited the same way in any batch."""
    return [zlib.crc32(f"flowedit:{seed}:{step}:{k}".encode()) for seed in seeds]
