"""The rollout sampler shared by pretraining evaluation, the trainer and the evaluator.

`sample` runs the SDE sampler of Flow-GRPO (DESIGN.md §2.1) with classifier-free guidance and an
optional PCGS guidance shift, records the whole trajectory and each step's log-probability, and
returns a `Rollout`. `step_log_prob` re-evaluates one recorded step for a micro-batch, with grad,
through the same `pec_kernels.sde.guided_sde_step` call, so the first on-policy ratio is exactly 1.

Conventions: flow time sigma from 1 (noise) down to 0, `FlowModel.velocity` predicts eps - x0; CFG
is one batched forward of [uncond; cond]. At guidance_scale 1 (no CFG, the training default) the
unconditional forward is skipped, in sampling and re-evaluation alike: v_uncond is v_cond, so the
combined velocity v_cond + 1·(v_cond − v_cond) is exactly v_cond, at half the model cost.
Steps outside the SDE window are deterministic (eta = 0) ODE steps: their log_prob is 0 and they
are not trained on.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from pec.models.base import FlowModel, PromptBatch
from pec_kernels.sde import SdeStep, guided_sde_step, step_sigmas

# The embedded 8x8 model needs no resolution shift (SD3 uses 3.0 at 1024 px).
EMBEDDED_SHIFT = 1.0
# guidance_fn(latents (B, ...), sigma (B,), v_cfg (B, ...)) -> guidance (B, ...): the PCGS shift.
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    return scheduler.sigmas.to(device=device, dtype=torch.float32)


def sde_step_mask(num_steps: int, sde_window: tuple[int, int] | None) -> torch.Tensor:
    """(num_steps,) bool: True for SDE steps, i.e. steps start <= t < end of `sde_window` (all if None)."""
    mask = torch.ones(num_steps, dtype=torch.bool)
    if sde_window is None:
        return mask
    if (not isinstance(sde_window, (tuple, list)) or len(sde_window) != 2
            or not 0 <= sde_window[0] < sde_window[1] <= num_steps):
        raise ValueError(f"sde_window must be (start, end) with 0 <= start < end <= num_steps={num_steps}, "
                         f"got {sde_window!r}")
    mask[:] = False
    mask[sde_window[0]:sde_window[1]] = True
    return mask


@dataclass
class Rollout:
    """A batch of sampled trajectories, B = len(prompts) * group_size, each group contiguous.

    latents:   (T+1, B, *sample_shape); latents[0] is the initial noise, latents[t+1] the result of step t.
    log_probs: (T, B) float32 log-probability of each recorded transition (0 at deterministic steps).
    sigmas:    (T+1,) float32 schedule, 1 down to 0.
    images:    (B, C, H, W) decoded final latents, clamped to [0, 1].
    prompts:   the B prompts (expanded); group_ids: (B,) int64 index of each sample's prompt.
    sde_steps: (T,) bool, which steps were stochastic (trainable).
    guidance:  (T, B, *sample_shape) what guidance_fn returned at each step, or None without it.
    cond, uncond: the encoded prompts and null prompts (B rows), reused at re-evaluation.
    eta, kind, guidance_scale, guidance_weight, group_size, sigma_max: the sampler settings.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    images: torch.Tensor
    prompts: list[str]
    group_ids: torch.Tensor
    sde_steps: torch.Tensor
    guidance: torch.Tensor | None
    cond: PromptBatch
    uncond: PromptBatch
    eta: float
    kind: str
    guidance_scale: float
    guidance_weight: float
    group_size: int
    sigma_max: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[0]

    @property
    def batch_size(self) -> int:
        return self.log_probs.shape[1]

    def train_steps(self) -> list[int]:
        """Indices of the SDE (trainable) steps."""
        return torch.nonzero(self.sde_steps).flatten().tolist()


def cfg_velocities(model: FlowModel, latents: torch.Tensor, sigma: torch.Tensor, cond: PromptBatch,
                   uncond: PromptBatch, batch_size: int | None = None,
                   guidance_scale: float | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_uncond, v_cond): one batched forward of [uncond; cond] per chunk of `batch_size` samples.

    With `guidance_scale` exactly 1 (a float) the unconditional forward is skipped: one forward of
    the cond batch per chunk, and v_uncond is v_cond itself (CFG 1 needs no unconditional velocity).
    """
    cond_only = skips_uncond(guidance_scale)
    n = latents.shape[0]
    step = n if batch_size is None else batch_size
    v_uncond, v_cond = [], []
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        x, s = latents[rows], sigma[rows]
        if cond_only:
            v_cond.append(model.velocity(x, s, cond.index(rows)))
            continue
        v = model.velocity(torch.cat([x, x]), torch.cat([s, s]),
                           PromptBatch.cat([uncond.index(rows), cond.index(rows)]))
        vu, vc = v.chunk(2)
        v_uncond.append(vu)
        v_cond.append(vc)
    v_cond = torch.cat(v_cond)
    return (v_cond if cond_only else torch.cat(v_uncond)), v_cond


def skips_uncond(guidance_scale: float | torch.Tensor | None) -> bool:
    """True when `guidance_scale` is the plain number 1: the CFG combination is then v_cond exactly."""
    return not isinstance(guidance_scale, (torch.Tensor, type(None))) and float(guidance_scale) == 1.0


def _check_sample_args(prompts: Sequence[str], group_size: int, guidance_scale: float, eta: float,
                       batch_size: int | None) -> None:
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r:.80}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if guidance_scale < 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}")


@torch.no_grad()
def sample(model: FlowModel, prompts: Sequence[str], *, group_size: int = 1, num_steps: int = 10,
           guidance_scale: float = 2.0, eta: float = 0.7, kind: str = "flow",
           sde_window: tuple[int, int] | None = None, generator: torch.Generator | None = None,
           seed: int | None = None, guidance_fn: GuidanceFn | None = None, guidance_weight: float = 0.0,
           batch_size: int | None = None, shift: float = EMBEDDED_SHIFT, sigmas: torch.Tensor | None = None,
           backend: str = "auto") -> Rollout:
    """Sample `group_size` images per prompt and record the trajectories (no grad).

    Each sample draws its own initial noise and per-step noise from `generator` (or a fresh one
    seeded with `seed`; neither: the global RNG), in one draw for the whole batch, so results do
    not depend on `batch_size`, which only chunks the model forwards. `sigmas` overrides the
    schedule of `schedule_sigmas(num_steps, shift)`. `guidance_fn(latents, sigma, v_cfg)` is called
    on the whole batch at each step with grad enabled (it may backpropagate through the decoder and
    an encoder); its result, detached, is added with `guidance_weight` to the CFG velocity and
    stored in the rollout. kind, eta, backend: as in `pec_kernels.sde.guided_sde_step`.
    """
    _check_sample_args(prompts, group_size, guidance_scale, eta, batch_size)
    device = next(model.parameters()).device
    if sigmas is None:
        sigmas = schedule_sigmas(num_steps, shift, device)
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    num_steps = sigmas.shape[0] - 1
    sde_steps = sde_step_mask(num_steps, sde_window)
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)

    expanded = [p for p in prompts for _ in range(group_size)]
    b = len(expanded)
    cond = model.encode_prompts(list(prompts)).repeat_interleave(group_size)
    uncond = model.encode_prompts([""]).repeat_interleave(b)
    shape = (b, *model.sample_shape)
    x = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn((num_steps, *shape), generator=generator, device=device)

    latents, log_probs, guidance = [x], [], []
    sigma_max = step_sigmas(sigmas, 0).sigma_max
    for t in range(num_steps):
        sig = step_sigmas(sigmas, torch.full((b,), t, device=device))
        v_uncond, v_cond = cfg_velocities(model, x, sig.sigma, cond, uncond, batch_size, guidance_scale)
        g = None
        if guidance_fn is not None:
            with torch.enable_grad():
                g = guidance_fn(x, sig.sigma, v_uncond + guidance_scale * (v_cond - v_uncond)).detach()
            if g.shape != x.shape:
                raise ValueError(f"guidance_fn must return a tensor of shape {tuple(x.shape)}, got {tuple(g.shape)}")
            guidance.append(g)
        out = guided_sde_step(x, v_uncond, v_cond, guidance_scale, sig.sigma, sig.sigma_next, guidance=g,
                              guidance_weight=guidance_weight, noise=noise[t], eta=eta if sde_steps[t] else 0.0,
                              kind=kind, sigma_max=sigma_max, backend=backend)
        x = out.prev_sample
        latents.append(x)
        log_probs.append(out.log_prob.float())

    return Rollout(
        latents=torch.stack(latents), log_probs=torch.stack(log_probs), sigmas=sigmas,
        images=model.decode(x).float().clamp(0, 1), prompts=expanded,
        group_ids=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        sde_steps=sde_steps.to(device), guidance=torch.stack(guidance) if guidance_fn is not None else None,
        cond=cond, uncond=uncond, eta=float(eta), kind=kind, guidance_scale=float(guidance_scale),
        guidance_weight=float(guidance_weight), group_size=group_size, sigma_max=sigma_max)


def _recorded_step(model: FlowModel, rollout: Rollout, step: int, sample_idx: torch.Tensor | slice | None,
                   guidance_scale: float):
    """x, prev_sample, StepSigmas, v_uncond, v_cond and guidance of recorded `step` for `sample_idx`
    (v_uncond is v_cond, from one cond forward, when `guidance_scale` is 1, as in `sample`)."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < rollout.num_steps:
        raise ValueError(f"step must be an int in [0, {rollout.num_steps}), got {step!r}")
    if not bool(rollout.sde_steps[step]):
        raise ValueError(f"step {step} is a deterministic (ODE) step outside the SDE window; "
                         f"trainable steps are {rollout.train_steps()}")
    if sample_idx is None:
        sample_idx = slice(None)
    elif not isinstance(sample_idx, (slice, torch.Tensor)) or (
            isinstance(sample_idx, torch.Tensor) and (sample_idx.is_floating_point() or sample_idx.dim() != 1)):
        raise ValueError(f"sample_idx must be a 1-D integer tensor, a slice or None, got {sample_idx!r:.80}")
    x, prev = rollout.latents[step][sample_idx], rollout.latents[step + 1][sample_idx]
    sig = step_sigmas(rollout.sigmas, torch.full((x.shape[0],), step, device=x.device))
    v_uncond, v_cond = cfg_velocities(model, x, sig.sigma, rollout.cond.index(sample_idx),
                                      rollout.uncond.index(sample_idx), guidance_scale=guidance_scale)
    guidance = None if rollout.guidance is None else rollout.guidance[step][sample_idx]
    return x, prev, sig, v_uncond, v_cond, guidance


def guided_velocity(model: FlowModel, rollout: Rollout, step: int,
                    sample_idx: torch.Tensor | slice | None = None) -> torch.Tensor:
    """The combined velocity v_uncond + scale·(v_cond − v_uncond) + weight·guidance of `model` at a
    recorded step, as `step_log_prob` forms it. Call it under `torch.no_grad()` with the reference
    model (e.g. LoRA adapters disabled) to get `v_ref` for the KL."""
    _, _, _, v_uncond, v_cond, guidance = _recorded_step(model, rollout, step, sample_idx, rollout.guidance_scale)
    v = v_cond if skips_uncond(rollout.guidance_scale) else v_uncond + rollout.guidance_scale * (v_cond - v_uncond)
    return v if guidance is None else v + rollout.guidance_weight * guidance


def step_log_prob(model: FlowModel, rollout: Rollout, step: int, sample_idx: torch.Tensor | slice | None = None,
                  *, eta: float | None = None, kind: str | None = None, guidance_scale: float | None = None,
                  v_ref: torch.Tensor | None = None, backend: str = "auto") -> SdeStep:
    """Re-evaluate recorded step `step` for samples `sample_idx` (all if None), with grad.

    Uses the recorded latents (x and prev_sample), prompt encodings, guidance and sampler settings
    of the rollout (eta, kind, guidance_scale: the rollout's unless given), through the same
    `guided_sde_step` call as `sample`, so for unchanged weights log_prob equals the rollout's.
    v_ref: the reference model's combined velocity (see `guided_velocity`) for the fused KL.
    Raises ValueError for a step outside the SDE window.
    """
    scale = rollout.guidance_scale if guidance_scale is None else guidance_scale
    x, prev, sig, v_uncond, v_cond, guidance = _recorded_step(model, rollout, step, sample_idx, scale)
    return guided_sde_step(
        x, v_uncond, v_cond, scale,
        sig.sigma, sig.sigma_next, guidance=guidance, guidance_weight=rollout.guidance_weight, prev_sample=prev,
        eta=rollout.eta if eta is None else eta, kind=rollout.kind if kind is None else kind,
        sigma_max=rollout.sigma_max, v_ref=v_ref, backend=backend)
