"""Sigma schedules of diffusers' flow-matching scheduler, for models whose pipeline config gives no other.

Below both the models (`FlowModel.schedule`) and the sampler (`pec.sampling`), which take them from here.
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

# The embedded 8x8 model needs no resolution shift (SD3 uses 3.0 at 1024 px).
EMBEDDED_SHIFT = 1.0


def make_scheduler(shift: float = EMBEDDED_SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """diffusers' flow-matching Euler scheduler configured with `shift` (1000 training timesteps)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def schedule_sigmas(num_steps: int, shift: float = EMBEDDED_SHIFT,
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """The (num_steps + 1,) float32 sigmas of `make_scheduler(shift)`, from 1 down to a terminal 0."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    scheduler = make_scheduler(shift)
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler.sigmas.to(device=device, dtype=torch.float32, non_blocking=True)  # no host sync
