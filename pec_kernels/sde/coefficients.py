"""Per-sample coefficients of one SDE step (DESIGN.md §2.1), shared by every backend.

Every kind is affine in (x, v) per sample: μ = a·x + b·v, and the step's noise scale s depends
only on the schedule. So the schedule math lives here, once, on (B,) tensors on the device, and the
kernels only do the elementwise pass μ = a·x + b·v, x' = μ + s·ε and the per-sample sums.

  flow  (Flow-GRPO):  std² = η²·σ/(1−σ̃) with σ̃ = σ except at σ ≥ 1, where σ̃ = sigma_max,
                      a = 1 + std²·dt/(2σ) = 1 + η²·dt/(2(1−σ̃)),
                      b = (1 + std²·(1−σ)/(2σ))·dt = (1 + η²·(1−σ)/(2(1−σ̃)))·dt,  s = std·sqrt(−dt)
  dance (DanceGRPO):  x̂0 = x − σv, score = −(x + (1−σ)v)/σ,
                      a = 1 + η²·dt/(2σ), b = dt + η²·dt·(1−σ)/(2σ),  s = η·sqrt(−dt)
  cps:                s = σ'·sin(ηπ/2), c = sqrt(σ'² − s²),
                      a = (1−σ') + c, b = −σ(1−σ') + (1−σ)·c
with dt = σ' − σ < 0. Writing std²/(2σ) as η²/(2(1−σ̃)) removes the division by σ, so σ = 0 is
harmless in `flow`.

Convention for deterministic steps (η = 0, σ' = σ, or cps at σ' = 0): when s² is not a positive
normal float, the step is an ODE step: x' = μ, log_prob = 0, KL = 0, and no gradient flows from the
log-prob or the KL. `inv_two_var` and `log_norm` encode this, so no kernel ever divides by zero.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

KINDS = ("flow", "dance", "cps")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class StepCoefficients(NamedTuple):
    """(B,) tensors in the compute dtype: μ = a·x + b·v, x' = μ + s·ε,
    log p = −inv_two_var·(x' − μ)² + log_norm per element (both 0 for a deterministic step)."""

    a: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    inv_two_var: torch.Tensor
    log_norm: torch.Tensor


def per_sample(name: str, value: float | torch.Tensor, batch: int, device: torch.device,
               dtype: torch.dtype) -> torch.Tensor:
    """Turn a Python number, a 0-d tensor or a (B,) tensor into a (B,) tensor on `device`.

    Checks metadata only (never values: that would cost a host synchronisation). Tensors here are
    data, not parameters, so they must not require grad.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{name} must be a float or a tensor of shape () or ({batch},), "
                         f"got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return torch.full((batch,), float(value), dtype=dtype, device=device)
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"{name} must have shape () or ({batch},) (one value per sample), "
                         f"got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}: move them to one device")
    if value.requires_grad:
        raise ValueError(f"{name} is not differentiable in this op: pass {name}.detach()")
    return value.to(dtype).expand(batch)


def step_coefficients(kind: str, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: torch.Tensor,
                      sigma_max: torch.Tensor | None) -> StepCoefficients:
    """Coefficients of one step of `kind` for per-sample (B,) sigma, sigma_next, eta.

    sigma_max (flow only) replaces σ in 1 − σ where σ ≥ 1; None means "use sigma_next there",
    which for a schedule starting at σ = 1 is exactly Flow-GRPO's choice (sigmas[1]).
    """
    dt = sigma_next - sigma
    # Floors for the denominators 1 − σ̃ (flow) and σ (dance): they only bind off-schedule (σ' = 1,
    # or a σ = 0 padding step where dt = 0), and keep the coefficients finite there.
    floor = torch.finfo(sigma.dtype).eps
    if kind == "flow":
        sigma_max = sigma_next if sigma_max is None else sigma_max
        one_minus = (1 - torch.where(sigma >= 1, sigma_max, sigma)).clamp_min(floor)
        half_k = eta * eta / (2 * one_minus)
        a = 1 + half_k * dt
        b = (1 + half_k * (1 - sigma)) * dt
        s = eta * torch.sqrt(sigma.clamp_min(0) / one_minus) * torch.sqrt((-dt).clamp_min(0))
    elif kind == "dance":
        half_k = eta * eta / (2 * sigma.clamp_min(floor))
        a = 1 + half_k * dt
        b = dt + half_k * dt * (1 - sigma)
        s = eta * torch.sqrt((-dt).clamp_min(0))
    elif kind == "cps":
        s = sigma_next * torch.sin(eta * (math.pi / 2))
        c = torch.sqrt((sigma_next * sigma_next - s * s).clamp_min(0))
        a = (1 - sigma_next) + c
        b = c * (1 - sigma) - sigma * (1 - sigma_next)
        s = s.abs()
    else:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    var = s * s
    stochastic = var > torch.finfo(var.dtype).tiny
    safe_var = torch.where(stochastic, var, torch.ones_like(var))
    inv_two_var = torch.where(stochastic, 0.5 / safe_var, torch.zeros_like(var))
    log_norm = torch.where(stochastic, -0.5 * torch.log(safe_var) - _HALF_LOG_2PI, torch.zeros_like(var))
    s = torch.where(stochastic, s, torch.zeros_like(s))
    return StepCoefficients(a, b, s, inv_two_var, log_norm)
