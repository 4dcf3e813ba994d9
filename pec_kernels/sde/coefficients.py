"""Per-sample parameters and coefficients of one SDE step (DESIGN.md §2.1).

Every kind is affine in (x, v) per sample: μ = a·x + b·v, and the step's noise scale s depends
only on the schedule, so a step is described by a few per-sample scalars. `step_coefficients` is
the torch formulation (the reference, used by the torch backend); the Triton and CUDA kernels
evaluate the same formulas per program from `StepParams` (triton_backend._coefficients,
csrc/sde_step.cu step_coefficients), because building (B,) coefficient tensors in torch costs ~20
small launches per call, more host time than the whole fused pass. All three are tested against an
independent float64 reference.

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


KIND_IDS = {kind: i for i, kind in enumerate(KINDS)}

#: A per-sample parameter: a Python float (same for every sample), or a 0-d or (B,) tensor in the compute dtype.
Param = float | torch.Tensor


class StepParams(NamedTuple):
    """The validated per-sample inputs of one step. sigma_max is sigma_next where the caller gave
    none; guidance_scale/guidance_weight are 0 for the unguided op."""

    kind: str
    sigma: Param
    sigma_next: Param
    sigma_max: Param
    eta: float
    guidance_scale: Param
    guidance_weight: Param
    batch: int
    device: torch.device
    dtype: torch.dtype

    def expanded(self, value: Param) -> torch.Tensor:
        """A parameter as a (B,) tensor (torch backend)."""
        if isinstance(value, torch.Tensor):
            return value.expand(self.batch)
        return torch.full((self.batch,), value, dtype=self.dtype, device=self.device)

    def coefficients(self) -> "StepCoefficients":
        """The step's (B,) coefficients, computed with torch ops."""
        return step_coefficients(self.kind, self.expanded(self.sigma), self.expanded(self.sigma_next),
                                 self.expanded(self.eta), self.expanded(self.sigma_max))


class StepCoefficients(NamedTuple):
    """(B,) tensors in the compute dtype: μ = a·x + b·v, x' = μ + s·ε,
    log p = −inv_two_var·(x' − μ)² + log_norm per element (both 0 for a deterministic step)."""

    a: torch.Tensor
    b: torch.Tensor
    s: torch.Tensor
    inv_two_var: torch.Tensor
    log_norm: torch.Tensor


def check_param(name: str, value: float | torch.Tensor, batch: int, device: torch.device,
                dtype: torch.dtype) -> Param:
    """Check a per-sample parameter: a Python number, or a 0-d or (B,) float tensor on `device`
    (returned in `dtype`, a no-op when it already is).

    Checks metadata only (never values: that would cost a host synchronisation). Tensors here are
    data, not parameters, so they must not require grad.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{name} must be a float or a tensor of shape () or ({batch},), "
                         f"got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        return float(value)
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
        raise ValueError(f"{name} must have shape () or ({batch},) (one value per sample), "
                         f"got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating-point dtype, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but x is on {device}: move them to one device")
    if value.requires_grad:
        raise ValueError(f"{name} is not differentiable in this op: pass {name}.detach()")
    return value.to(dtype)


def check_schedule_values(kind: str, sigma: Param, sigma_next: Param, eta: float, *, debug: bool = False,
                          finite: tuple[tuple[str, Param], ...] = ()) -> None:
    """Check the schedule's values: η ≥ 0; σ in (0, 1] for kind "flow" (σ = 0 divides by zero there)
    and in [0, 1] otherwise; σ' in [0, σ); each (name, value) of `finite` (e.g. the guidance scales)
    finite. ValueError naming the argument.

    Python floats are checked always (free: no device work). Tensor values are checked only with
    `debug` (one host synchronisation for all of them, so never by default: the ops stay sync-free and
    capturable); under torch.compile the debug check becomes device-side asserts
    (torch._assert_async), which do not break the graph but fail without naming the argument.
    """
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    low_open = kind == "flow"
    sigma_range = "(0, 1]" if low_open else "[0, 1]"
    why = " (sigma = 0 divides by zero in the flow step)" if low_open else ""
    if not isinstance(sigma, torch.Tensor) and not ((0 < sigma if low_open else 0 <= sigma) and sigma <= 1):
        raise ValueError(f"sigma must be in {sigma_range} for kind={kind!r}{why}, got {sigma!r}")
    if not isinstance(sigma_next, torch.Tensor):
        upper = sigma if not isinstance(sigma, torch.Tensor) else 1.0
        if not 0 <= sigma_next < upper:
            bound = f"sigma = {sigma!r}" if not isinstance(sigma, torch.Tensor) else "sigma <= 1"
            raise ValueError(f"sigma_next must be in [0, sigma) (a step goes down the schedule; "
                             f"{bound}), got {sigma_next!r}")
    for name, value in finite:
        if not isinstance(value, torch.Tensor) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    tensors = [t for t in (sigma, sigma_next, *(v for _, v in finite)) if isinstance(t, torch.Tensor)]
    if not debug or not tensors:
        return
    s, sn = (torch.as_tensor(t, dtype=torch.float64, device=tensors[0].device) for t in (sigma, sigma_next))
    sigma_ok = ((s > 0) if low_open else (s >= 0)) & (s <= 1)
    next_ok = (sn >= 0) & (sn < s)
    checks = [(f"sigma must be in {sigma_range} for kind={kind!r}{why}", s, sigma_ok.all()),
              ("sigma_next must be in [0, sigma) (a step goes down the schedule)", sn, next_ok.all())]
    checks += [(f"{name} must be finite", v, torch.isfinite(v).all()) for name, v in finite
               if isinstance(v, torch.Tensor)]
    check_tensor_values(checks)


def check_tensor_values(checks: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    """Raise a ValueError "<message>; check_schedule found values in [min, max]" for the first failed
    (message, values, ok) check, ok being a 0-d bool tensor on the device. One host synchronisation for
    all of them; under torch.compile device-side asserts instead (no graph break, no sync)."""
    if torch.compiler.is_compiling():
        for message, _, ok in checks:
            torch._assert_async(ok, message)
        return
    if bool(torch.stack([ok for _, _, ok in checks]).all()):  # the one host synchronisation
        return
    for message, bad, ok in checks:
        if not bool(ok):
            raise ValueError(f"{message}; check_schedule found values in [{bad.min().item()}, "
                             f"{bad.max().item()}]")


def step_coefficients(kind: str, sigma: torch.Tensor, sigma_next: torch.Tensor, eta: torch.Tensor,
                      sigma_max: torch.Tensor) -> StepCoefficients:
    """Coefficients of one step of `kind` for per-sample (B,) sigma, sigma_next, eta, sigma_max.

    sigma_max (flow only) replaces σ in 1 − σ where σ ≥ 1 (Flow-GRPO: sigmas[1]).
    """
    dt = sigma_next - sigma
    # Floors for the denominators 1 − σ̃ (flow) and σ (dance): they only bind off-schedule (σ' = 1,
    # or a σ = 0 padding step where dt = 0), and keep the coefficients finite there.
    floor = torch.finfo(sigma.dtype).eps
    if kind == "flow":
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
