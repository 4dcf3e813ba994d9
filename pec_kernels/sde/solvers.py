"""Deterministic (ODE) steps of flow-matching samplers: DPM-Solver++ in data prediction, 1st and 2nd order.

DiffusionNFT samples with it (NVlabs/DiffusionNFT `flow_grpo/diffusers_patch/solver.py`, solver "dpm2":
`dpm_step` with order 2, `multistep_dpm_solver_second_order_update`, "midpoint" form), and MixGRPO-Flash
solves the steps after its SDE window with the same update (Tencent-Hunyuan/MixGRPO
`fastvideo/utils/sampling_utils.py`, `dpm_step`). For flow matching x_σ = (1 − σ)x0 + σε, so α = 1 − σ,
λ = log(α/σ), and the model's data prediction is x̂0 = x − σ·v. With h = λ' − λ and h_prev = λ − λ_prev,
the authors' step from σ to σ' is

    x' = (σ'/σ)·x − α'(e^{−h} − 1)·(D0 + ½·D1),   D0 = x̂0,  D1 = (x̂0 − x̂0_prev)·h/h_prev,

and −α'(e^{−h} − 1) = (σ − σ')/σ exactly, so the op computes x' = a·x + b·x̂0 + c·x̂0_prev with

    a = σ'/σ,   b = (σ − σ')/σ + c2,   c = −c2,   c2 = ½·(σ − σ')/σ · h/h_prev.

The first order (c2 = 0) is DDIM with η = 0, i.e. exactly the Euler step x + (σ' − σ)·v. The update is first
order where the authors' is:
  - on the first step (no x̂0_prev: call with order=1);
  - on the last step (σ' = 0, diffusers' `lower_order_final`): x' = x̂0;
  - on the step after σ_prev = 1, where λ_prev = −∞ makes h/h_prev = 0 (the authors get D1 = 0 from
    float64 infinities; here c2 is set to 0 there, so no infinity ever reaches the latents).
The σ-coefficients are computed in float64 (as the authors' σ are), the latents in float32 (float64 for
float64 inputs), and the result is returned in x's dtype.

Why torch and no Triton kernel: the step is three latent-sized multiply-adds on (B,) coefficients, ~4 reads
and 1 write of the latent. At DiffusionNFT's SD3.5-M rollout shape (9 × 16 × 64 × 64, 2.4 MB in float32)
that is ~12 MB of traffic, a few microseconds on an H100 plus four kernel launches, once per sampling step
next to a transformer forward of tens of milliseconds (DESIGN.md §6: 146 ms for B = 16), i.e. < 0.1 % of a
step; a fused kernel could save at most that. The SDE steps are fused because their log-prob pass runs per
trained step with a backward; this step has neither.
"""
from __future__ import annotations

import os

import torch

from pec_kernels._checks import FLOAT_DTYPES, check_choice, check_same_device, check_tensor
from pec_kernels.sde.coefficients import check_param, check_tensor_values

ORDERS = (1, 2)

Scalar = float | torch.Tensor


def solver_coefficients(sigma_prev: torch.Tensor | None, sigma: torch.Tensor, sigma_next: torch.Tensor,
                        order: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, b, c) of x' = a·x + b·x̂0 + c·x̂0_prev for (B,) float64 σ_prev, σ, σ' (c is None for order 1).

    Assumes 0 ≤ σ' < σ < σ_prev ≤ 1 and σ > 0. Second order only where σ' > 0 and σ_prev < 1; elsewhere
    c = 0 exactly, so the step is the first-order one.
    """
    a = sigma_next / sigma
    first = (sigma - sigma_next) / sigma  # = 1 − a, without the cancellation
    if order == 1:
        return a, first, None

    def lam(s: torch.Tensor) -> torch.Tensor:  # λ = log(α/σ), α = 1 − σ; −∞ at σ = 1, +∞ at σ = 0
        return torch.log1p(-s) - torch.log(s)

    lam_sigma = lam(sigma)
    h, h_prev = lam(sigma_next) - lam_sigma, lam_sigma - lam(sigma_prev)
    second = (sigma_next > 0) & (sigma_prev < 1)
    # Where `second` is False the quotient may be inf/inf (σ' = 0 and σ_prev = 1): discarded by the where.
    half_d1 = torch.where(second, 0.5 * first * h / h_prev, torch.zeros_like(first))
    return a, first + half_d1, -half_d1


def _check_float_schedule(sigma_prev: Scalar | None, sigma: Scalar, sigma_next: Scalar) -> None:
    """Range checks of the schedule values given as Python floats (free: no device work)."""
    def given(value: Scalar | None) -> bool:
        return value is not None and not isinstance(value, torch.Tensor)

    if given(sigma) and not 0 < sigma <= 1:
        raise ValueError(f"sigma must be in (0, 1] (x̂0 = x − σ·v and the step divides by σ), got {sigma!r}")
    if given(sigma_next):
        upper = sigma if given(sigma) else 1.0
        if not 0 <= sigma_next < upper:
            raise ValueError(f"sigma_next must be in [0, sigma) (a step goes down the schedule; sigma = "
                             f"{upper!r}), got {sigma_next!r}" if given(sigma) else
                             f"sigma_next must be in [0, 1) (a step goes down the schedule), got {sigma_next!r}")
    if given(sigma_prev):
        lower = sigma if given(sigma) else 0.0
        if not lower < sigma_prev <= 1:
            raise ValueError(f"sigma_prev must be in (sigma, 1] (the previous step's σ, above this one; "
                             f"sigma = {lower!r}), got {sigma_prev!r}")


def _check_tensor_schedule(sigma_prev: torch.Tensor | None, sigma: torch.Tensor, sigma_next: torch.Tensor) -> None:
    """The same checks on (B,) float64 tensors: one host synchronisation (check_schedule=True / PEC_DEBUG=1)."""
    checks = [("sigma must be in (0, 1]", sigma, ((sigma > 0) & (sigma <= 1)).all()),
              ("sigma_next must be in [0, sigma)", sigma_next, ((sigma_next >= 0) & (sigma_next < sigma)).all())]
    if sigma_prev is not None:
        checks.append(("sigma_prev must be in (sigma, 1]", sigma_prev,
                       ((sigma_prev > sigma) & (sigma_prev <= 1)).all()))
    check_tensor_values(checks)


def dpm_solver_step(x: torch.Tensor, x0: torch.Tensor, x0_prev: torch.Tensor | None, sigma_prev: Scalar | None,
                    sigma: Scalar, sigma_next: Scalar, *, order: int = 2,
                    check_schedule: bool | None = None) -> torch.Tensor:
    """One DPM-Solver++ step (data prediction, multistep, midpoint form) of a flow-matching sampler.

    x: the latent at σ, (B, ...) of any rank >= 2 (images (B, C, H, W), packed tokens (B, L, C), video
    (B, C, F, H, W)); x0: the model's data prediction at σ, x̂0 = x − σ·v; x0_prev: the data prediction of
    the previous step (at σ_prev), or None with order=1. All float16/bfloat16/float32/float64 of x's shape,
    on one device, views allowed. sigma_prev, sigma, sigma_next: floats, 0-d or (B,) tensors (per-sample
    schedules); 0 ≤ σ' < σ < σ_prev ≤ 1, σ > 0 (σ_prev unused and may be None with order=1).
    order: 1 (DDIM η = 0, exactly the Euler step x + (σ' − σ)·v) or 2 (DPM-Solver++(2M), the authors'
    "dpm2"). order=2 falls back to first order exactly where the authors' does: σ' = 0 (returns x̂0) and
    σ_prev = 1 (λ_prev = −∞); call order=1 on the first step, where no x̂0_prev exists.
    Returns x' at σ' in x's dtype (float32 math inside; float64 if any input is float64; the σ-coefficients
    in float64). No host synchronisation, no loop over the batch; differentiable in x, x0 and x0_prev.
    Schedule values given as floats are checked always; tensor values only with check_schedule=True (or
    PEC_DEBUG=1 when it is None), at the cost of one host synchronisation. A NaN in a latent stays NaN.
    Bad input raises a ValueError naming the argument.
    """
    check_choice("order", order, ORDERS)
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension and at least one more (B, ...), got shape {tuple(x.shape)}")
    if order == 2 and (x0_prev is None or sigma_prev is None):
        missing = "x0_prev" if x0_prev is None else "sigma_prev"
        raise ValueError(f"{missing} is required for order=2 (the previous step's data prediction and σ); "
                         "pass order=1 on the first step")
    latents = {"x": x, "x0": x0, "x0_prev": x0_prev if order == 2 else None}
    for name, value in latents.items():
        if value is None or name == "x":
            continue
        check_tensor(name, value, dtypes=FLOAT_DTYPES)
        if value.shape != x.shape:
            raise ValueError(f"{name} must have the shape of x, {tuple(x.shape)}, got {tuple(value.shape)}")
    device = check_same_device(**latents)
    batch = x.shape[0]
    given = {"sigma_prev": sigma_prev if order == 2 else None, "sigma": sigma, "sigma_next": sigma_next}
    params = {k: None if v is None else check_param(k, v, batch, device, torch.float64) for k, v in given.items()}
    _check_float_schedule(params["sigma_prev"], params["sigma"], params["sigma_next"])

    # (B,) float64 columns on the device: a float becomes a fill kernel, never a host-to-device copy.
    cols = {k: None if v is None else (v.expand(batch) if isinstance(v, torch.Tensor) else
                                       torch.full((batch,), v, dtype=torch.float64, device=device))
            for k, v in params.items()}
    if check_schedule is None:
        check_schedule = os.environ.get("PEC_DEBUG") == "1"
    if check_schedule and any(isinstance(v, torch.Tensor) for v in params.values()):
        _check_tensor_schedule(cols["sigma_prev"], cols["sigma"], cols["sigma_next"])

    present = [t for t in latents.values() if t is not None]
    cd = torch.float64 if any(t.dtype == torch.float64 for t in present) else torch.float32
    shape = (batch,) + (1,) * (x.dim() - 1)
    a, b, c = (None if t is None else t.to(cd).view(shape)
               for t in solver_coefficients(cols["sigma_prev"], cols["sigma"], cols["sigma_next"], order))
    out = torch.empty_like(x, dtype=cd)  # every element is written below (copy_, then in place)
    out.copy_(x).mul_(a).addcmul_(x0, b)
    if c is not None:
        out.addcmul_(x0_prev, c)
    return out.to(x.dtype)
