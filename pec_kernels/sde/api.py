"""Public ops: `sde_step_logprob` and `guided_sde_step` (DESIGN.md §2.1 and §3), and `cfg_velocity`
(the CFG combination `guided_sde_step` steps with, optionally rescaled as Qwen-Image's true CFG).

One fused pass per call: (CFG combine →) μ → x' → per-sample log-prob (→ KL to a reference), with
forward and backward, no host synchronisation and no Python loop over the batch, so the ops can be
captured in a CUDA graph. Input checks look at metadata only (shapes, dtypes, devices), never values.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from pec_kernels._checks import FLOAT_DTYPES, check_choice, check_same_device, check_tensor
from pec_kernels._fallback import run as run_with_fallback
from pec_kernels.sde import backends
from pec_kernels.sde.coefficients import KINDS, StepParams, check_param, check_schedule_values
from pec_kernels.sde.function import SdeStepFunction

REDUCTIONS = ("mean", "sum")

Scalar = float | torch.Tensor


class SdeStep(NamedTuple):
    """Result of one SDE step.

    prev_sample: x' in the dtype of x (the given prev_sample in re-evaluation mode).
    log_prob:    (B,) log N(x'; μ, s²I), reduced over all non-batch dims ("mean" or "sum"); float32
                 (float64 for float64 inputs). 0 for a deterministic step (s = 0).
    mean:        μ, shape and dtype of x, when asked for with return_mean=True, else None (writing it
                 costs a full latent-sized write that sampling and re-evaluation never read).
    std:         (B,) s, the standard deviation of the step's Gaussian (Flow-GRPO's std_dev_t·sqrt(−dt)
                 for kind="flow"), in the log_prob dtype.
    kl:          (B,) ‖μθ − μref‖²/(2s²) reduced like log_prob, when a reference velocity was given,
                 else None. 0 for a deterministic step.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor | None
    std: torch.Tensor
    kl: torch.Tensor | None = None


def _check_latent(name: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    check_tensor(name, value, dtypes=FLOAT_DTYPES)
    if value.shape != like.shape:
        raise ValueError(f"{name} must have the shape of x, {tuple(like.shape)}, got {tuple(value.shape)}")
    return value


def _check_data(name: str, value: torch.Tensor | None) -> None:
    if value is not None and value.requires_grad:
        raise ValueError(f"{name} is treated as data and gets no gradient: pass {name}.detach()")


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(t.shape[0], -1).contiguous()


def _fused_step(x: torch.Tensor, vels: tuple[torch.Tensor, ...], vels_names: tuple[str, ...],
                vscale: tuple[Scalar, Scalar] | None, sigma: Scalar, sigma_next: Scalar, noise: torch.Tensor | None,
                prev_sample: torch.Tensor | None, v_ref: torch.Tensor | None, eta: float, kind: str, reduce: str,
                sigma_max: Scalar | None, backend: str, debug_schedule: bool | None,
                return_mean: bool, cfg_renorm: bool = False) -> SdeStep:
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 2:
        raise ValueError(f"x must have a batch dimension and at least one more (B, ...), got shape {tuple(x.shape)}")
    for name, v in zip(vels_names, vels):
        _check_latent(name, v, x)
    if (noise is None) == (prev_sample is None):
        raise ValueError("pass exactly one of noise (sampling: draws x' = μ + s·noise) and prev_sample "
                         "(re-evaluation: scores a given x'), got "
                         + ("both" if noise is not None else "neither"))
    target_name, target = ("noise", noise) if noise is not None else ("prev_sample", prev_sample)
    _check_latent(target_name, target, x)
    if v_ref is not None:
        _check_latent("v_ref", v_ref, x)
    for name, value in ((target_name, target), ("v_ref", v_ref)):
        _check_data(name, value)
    check_choice("kind", kind, KINDS)
    check_choice("reduce", reduce, REDUCTIONS)
    check_choice("backend", backend, backends.BACKENDS)
    for name, flag in (("return_mean", return_mean), ("cfg_renorm", cfg_renorm)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {type(flag).__name__}")
    device = check_same_device(x=x, **dict(zip(vels_names, vels)), **{target_name: target}, v_ref=v_ref)

    latents = (x, *vels, target) + (() if v_ref is None else (v_ref,))
    cd = torch.float64 if any(t.dtype == torch.float64 for t in latents) else torch.float32
    if isinstance(eta, bool) or not isinstance(eta, (int, float)):
        raise ValueError(f"eta must be a float, got {type(eta).__name__}")
    batch = x.shape[0]
    sig = check_param("sigma", sigma, batch, device, cd)
    sig_next = check_param("sigma_next", sigma_next, batch, device, cd)
    if debug_schedule is None:
        debug_schedule = os.environ.get("PEC_DEBUG") == "1"
    scales = (("guidance_scale", check_param("guidance_scale", vscale[0], batch, device, cd)),
              ("guidance_weight", check_param("guidance_weight", vscale[1], batch, device, cd))) if vscale else ()
    check_schedule_values(kind, sig, sig_next, float(eta), debug=debug_schedule, finite=scales)
    params = StepParams(
        kind=kind, sigma=sig, sigma_next=sig_next,
        sigma_max=sig_next if sigma_max is None else check_param("sigma_max", sigma_max, batch, device, cd),
        eta=float(eta), guidance_scale=scales[0][1] if scales else 0.0, guidance_weight=scales[1][1] if scales else 0.0,
        batch=batch, device=device, dtype=cd)
    if cfg_renorm:  # the combined velocity in torch (autograd), then the fused pass on it alone
        v = _combine(vels[0], vels[1], params.guidance_scale, True, cd)
        if len(vels) == 3:
            v = v + _per_sample(params.guidance_weight, v) * vels[2].to(cd)
        vels = (v,)
        params = params._replace(guidance_scale=0.0, guidance_weight=0.0)
        latents = (x, v, target) + (() if v_ref is None else (v_ref,))
    rollout = noise is not None
    norm = math.prod(x.shape[1:]) if reduce == "mean" else 1
    flat = (_flat(x), _flat(target), _flat(v_ref), *(_flat(v) for v in vels))
    prev, mean, log_prob, kl, std = run_with_fallback(
        "sde_step", backends.candidates(backend, *backends.placement(latents)),
        lambda chain: SdeStepFunction.apply(tuple(chain), params, rollout, norm, return_mean, *flat))
    prev = prev.view(x.shape) if rollout else prev_sample
    return SdeStep(prev, log_prob, None if mean is None else mean.view(x.shape), std, kl)


def _per_sample(value: Scalar, like: torch.Tensor) -> Scalar:
    """A float, or a 0-d / (B,) tensor viewed to broadcast over `like`'s non-batch dims."""
    return value.view(-1, *(1,) * (like.dim() - 1)) if isinstance(value, torch.Tensor) else value


def _combine(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: Scalar, renorm: bool,
             cd: torch.dtype) -> torch.Tensor:
    """v_u + s·(v_c − v_u) in `cd`; with `renorm`, times ‖v_c‖/‖v‖ over the last dim (1 where ‖v‖ = 0)."""
    v_uncond, v_cond = v_uncond.to(cd), v_cond.to(cd)
    v = v_uncond + _per_sample(scale, v_uncond) * (v_cond - v_uncond)
    if not renorm:
        return v
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    zero = norm == 0  # v = 0 there: leave it (0/0 in the pipeline), with a finite gradient
    factor = torch.linalg.vector_norm(v_cond, dim=-1, keepdim=True) / torch.where(zero, 1.0, norm)
    return v * torch.where(zero, 1.0, factor)


def cfg_velocity(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: Scalar, *,
                 cfg_renorm: bool = False) -> torch.Tensor:
    """The velocity `guided_sde_step` steps with, without the step: v = v_uncond + guidance_scale·(v_cond −
    v_uncond), and with cfg_renorm, v·‖v_cond‖/‖v‖ with both norms over the last dim (per token of packed
    latents (B, L, C), as QwenImagePipeline's true CFG rescales it; a token where v = 0 stays 0).

    For what callers combine themselves: the CFG velocity a guidance function sees, or a reference
    velocity `v_ref` (which `guided_sde_step` takes already combined). guidance_scale: a finite float or a
    0-d / (B,) tensor. Returned in float32 (float64 for float64 inputs); differentiable in both
    velocities; no host synchronisation.
    """
    check_tensor("v_uncond", v_uncond, dtypes=FLOAT_DTYPES)
    if v_uncond.dim() < 2:
        raise ValueError(f"v_uncond must have a batch dimension and at least one more (B, ...), "
                         f"got shape {tuple(v_uncond.shape)}")
    _check_latent("v_cond", v_cond, v_uncond)
    if not isinstance(cfg_renorm, bool):
        raise ValueError(f"cfg_renorm must be a bool, got {type(cfg_renorm).__name__}")
    device = check_same_device(v_uncond=v_uncond, v_cond=v_cond)
    cd = torch.float64 if torch.float64 in (v_uncond.dtype, v_cond.dtype) else torch.float32
    scale = check_param("guidance_scale", guidance_scale, v_uncond.shape[0], device, cd)
    if not isinstance(scale, torch.Tensor) and not math.isfinite(scale):
        raise ValueError(f"guidance_scale must be finite, got {scale}")
    return _combine(v_uncond, v_cond, scale, cfg_renorm, cd)


def sde_step_logprob(x: torch.Tensor, v: torch.Tensor, sigma: Scalar, sigma_next: Scalar, *,
                     noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
                     eta: float = 0.7, kind: str = "flow", reduce: str = "mean", sigma_max: Scalar | None = None,
                     v_ref: torch.Tensor | None = None, backend: str = "auto", return_mean: bool = False,
                     check_schedule: bool | None = None) -> SdeStep:
    """One SDE step x_σ → x_σ' of a flow-matching sampler and the log-probability of x' under it.

    x, v: latents (B, C, H, W) or packed tokens (B, L, C), any rank >= 2, float16/bfloat16/float32
    (float64 computes in float64); math is float32 inside. sigma, sigma_next: floats, 0-d or (B,)
    tensors (per-sample schedules, e.g. from `step_sigmas`). Exactly one of:
      noise:       sampling; returns x' = μ + s·noise, and log_prob of x' as rounded to x's dtype, so
                   a later re-evaluation with prev_sample=x' gives a bit-identical log_prob;
      prev_sample: re-evaluation of a recorded x' (the training path).
    eta: η (a float). kind: "flow" | "dance" | "cps" (DESIGN.md §2.1; cps uses the normalised
    Gaussian log-density, unlike Flow-GRPO's unnormalised −(x' − μ)²). reduce: "mean" | "sum" over the
    non-batch dims. sigma_max (flow): replaces σ in 1 − σ where σ >= 1; None uses σ' there, equal to
    Flow-GRPO's sigmas[1] on the first step of a schedule that starts at 1.
    v_ref: optional reference velocity (same x and variance) for the fused KL output.
    backend: "auto" | "cuda" | "triton" | "torch"; under "auto" a faster backend that fails to compile or
    launch is replaced by the next one, with one RuntimeWarning (pec_kernels._fallback).
    Schedule values: η ≥ 0; σ in (0, 1] for kind="flow" (σ = 0 divides by zero there), [0, 1] for the
    others; σ' in [0, σ). Python floats that break these raise a ValueError naming the argument, at no
    cost. Tensor schedules are not read on the host (that would synchronise); check_schedule=True, or
    the environment variable PEC_DEBUG=1 when check_schedule is None, checks them too, at the cost of
    one host synchronisation per call (under torch.compile: device-side asserts, no graph break).
    Deterministic steps (s = 0, e.g. η = 0): x' = μ, log_prob = kl = 0, no gradient from them.
    return_mean: also return μ (SdeStep.mean; None otherwise, which saves writing it).
    Differentiable in x and v (also through mean and the rollout prev_sample).
    """
    return _fused_step(x, (v,), ("v",), None, sigma, sigma_next, noise, prev_sample, v_ref, eta, kind, reduce,
                       sigma_max, backend, check_schedule, return_mean)


def guided_sde_step(x: torch.Tensor, v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: Scalar,
                    sigma: Scalar, sigma_next: Scalar, *, guidance: torch.Tensor | None = None,
                    guidance_weight: Scalar = 0.0, noise: torch.Tensor | None = None,
                    prev_sample: torch.Tensor | None = None, eta: float = 0.7, kind: str = "flow",
                    reduce: str = "mean", sigma_max: Scalar | None = None, v_ref: torch.Tensor | None = None,
                    backend: str = "auto", return_mean: bool = False,
                    check_schedule: bool | None = None, cfg_renorm: bool = False) -> SdeStep:
    """Classifier-free guidance and an SDE step with its log-prob, in one pass.

    v = v_uncond + guidance_scale·(v_cond − v_uncond) + guidance_weight·guidance, then exactly
    `sde_step_logprob(x, v, ...)`. guidance_scale and guidance_weight: finite floats or (B,) tensors
    (not differentiable; a non-finite float raises a ValueError naming it, and tensors are checked as
    the schedule's are, on request: check_schedule); guidance: optional latent-shaped shift (PCGS,
    DESIGN.md §2.5). v_ref is the reference velocity already combined by the caller (CFG and guidance
    applied as for v; `cfg_velocity` combines it).
    cfg_renorm (Qwen-Image's true CFG): the CFG velocity is rescaled to the conditional velocity's norm
    per token before the guidance shift is added, v = cfg_velocity(v_uncond, v_cond, guidance_scale,
    cfg_renorm=True) + guidance_weight·guidance. That combination runs in torch (float32, or float64 for
    float64 inputs; differentiable by autograd, no host synchronisation) and every backend then gets it
    as the single velocity of `sde_step_logprob`: the norms need whole tokens, which the fused kernels do
    not see. With low-precision latents the fused pass thus sees a float32 velocity beside them, which
    the CUDA kernels (compiled for one dtype) do not take: "auto" then runs Triton.
    Differentiable in x, v_uncond, v_cond and guidance.
    """
    vels = (v_uncond, v_cond) if guidance is None else (v_uncond, v_cond, guidance)
    names = ("v_uncond", "v_cond", "guidance")[:len(vels)]
    return _fused_step(x, vels, names, (guidance_scale, guidance_weight), sigma, sigma_next, noise, prev_sample,
                       v_ref, eta, kind, reduce, sigma_max, backend, check_schedule, return_mean, cfg_renorm)
