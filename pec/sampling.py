"""The rollout sampler shared by pretraining evaluation, the trainer and the evaluator.

`sample` runs the SDE sampler of Flow-GRPO (DESIGN.md §2.1) with classifier-free guidance and an
optional PCGS guidance shift, records the whole trajectory and each step's log-probability, and
returns a `Rollout`. `step_log_prob` re-evaluates one recorded step for a micro-batch, with grad,
through the same `pec_kernels.sde.guided_sde_step` call, so the first on-policy ratio is exactly 1.

Conventions: flow time sigma from 1 (noise) down to 0, `FlowModel.velocity` predicts eps - x0; CFG
is one batched forward of [uncond; cond]. At guidance_scale 1 (no CFG, the training default) the
unconditional forward is skipped, in sampling and re-evaluation alike: v_uncond is v_cond, so the
combined velocity v_cond + 1·(v_cond − v_cond) is exactly v_cond, at half the model cost.
Which steps are SDE steps, and which train (DESIGN.md 2.1, 2.3), decided on the host from the
schedule before sampling (no read of device data):
- SDE steps (`Rollout.sde_steps`): the steps inside `sde_window` (all without one) whose noise std s
  is not 0 for the kind and eta (`step_noise_std`). They are sampled with noise and have a
  log-probability. Every other step is a deterministic ODE step (eta = 0): log_prob 0, never trained.
  s is exactly 0 at eta = 0, and at the last `cps` step (s = sigma_next * sin(eta*pi/2), sigma_next = 0):
  that step is an ODE step whatever the window says.
- Trained steps (`Rollout.train_steps(timestep_fraction)`): Flow-GRPO's rule, the SDE steps among the
  first int(T * timestep_fraction) steps in denoising order (T = all steps of the trajectory, not
  those of the window). With Flow-GRPO's 0.99 the last step is still sampled with noise but not trained.

Guided sampling (the PCGS guided form, DESIGN.md 2.5): `guidance_shift` is the one place that
decides the sign and the scale of the guidance (see there); the shift is stored in the rollout and
re-added unchanged at re-evaluation. The fused KL comes in the units `kl_in_units` defines ("exact"
or Flow-GRPO's).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pec.config import KL_UNITS, check_timestep_fraction
from pec.models.base import FlowModel, PromptBatch
from pec.models.schedules import schedule_sigmas
from pec_kernels import (SdeStep, cfg_velocity, dpm_solver_step, guided_sde_step, step_coefficients,
                         step_sigmas)

# How ODE steps are solved (`sample`): the Euler step (the SDE kernel at eta 0) or DPM-Solver++(2M).
SOLVERS = ("euler", "dpm2")
# guidance_fn(latents (B, ...), sigma (B,), v_cfg (B, ...)) -> direction (B, ...): where the latents
# should move (e.g. the gradient of an objective to raise); `guidance_shift` turns it into the
# velocity shift the sampler adds (sign and scale are decided there, nowhere else).
GuidanceFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_shift(direction: torch.Tensor, velocity: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """The velocity shift of guided sampling: the one place that decides its sign and its scale.

    Sign: sampling runs sigma from 1 down to 0 and every SDE kind's mean is mu = a*x + b*v with
    b < 0 (b = dt*(1 + ...) for flow and dance, b <= dt for cps, dt = sigma_next - sigma < 0), so
    adding dv to the velocity moves the step's mean by b*dv, *against* dv. To move the latents along
    `direction` (e.g. up the gradient of the group's perceptual entropy) the shift is subtracted.

    Scale (scale-free): per sample i, the shift has norm `weight` times the norm of the velocity,

        dv_i = -weight * ||v_i|| * direction_i / ||direction_i||        (norms over all non-batch dims),

    so `weight` is a fraction of the step (0.1 = a shift a tenth the size of the velocity), whatever
    the scale of the gradient (the encoder's feature scale, the estimator, the latent dimension): one
    default serves the 8x8 embedded model and SD3.5/FLUX latents alike. A zero direction gives a zero
    shift. `weight` may be a float or a (B,) tensor (e.g. 0 at steps the schedule leaves unguided).
    """
    if direction.shape != velocity.shape:
        raise ValueError(f"direction must have the shape of the velocity {tuple(velocity.shape)}, "
                         f"got {tuple(direction.shape)}")
    d = direction.detach().float()
    v_norm = velocity.detach().float().flatten(1).norm(dim=1)
    d_norm = d.flatten(1).norm(dim=1)
    scale = torch.where(d_norm > 0, v_norm / d_norm.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(d_norm))
    w = torch.as_tensor(weight, dtype=d.dtype, device=d.device)
    scale = -(w * scale)
    return (d * scale.reshape(-1, *([1] * (d.dim() - 1)))).to(velocity.dtype)


def sde_step_mask(num_steps: int, sde_window: tuple[int, int] | None) -> torch.Tensor:
    """(num_steps,) bool: True for steps start <= t < end of `sde_window` (all if None): the SDE steps, or
    any other step window (the trainer's guidance window)."""
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


def step_noise_std(sigmas: torch.Tensor, kind: str, eta: float, sde_window: tuple[int, int] | None = None
                   ) -> torch.Tensor:
    """(T,) float32 noise std s of each step of the CPU schedule `sigmas` (T + 1,), as the sampler takes them.

    s comes from the same formulas as the SDE kernels (`pec_kernels.sde.coefficients.step_coefficients`,
    in float32): 0 wherever the step is deterministic, i.e. outside `sde_window` (sampled with eta = 0)
    and wherever s^2 is not a positive normal float (eta = 0, or the last `cps` step, sigma_next = 0).
    Computed on the host: the schedule is known there before sampling, so no device value is read.
    """
    if sigmas.device.type != "cpu":
        raise ValueError(f"sigmas must be on the CPU (the host decides which steps are SDE steps), got {sigmas.device}")
    sig = sigmas.to(torch.float32)
    t = sig.shape[0] - 1
    # Flow-GRPO's stand-in for sigma in 1 - sigma at sigma = 1, as `step_sigmas` computes it.
    below_one = torch.where(sig < 1, sig, torch.full_like(sig, float("-inf"))).max()
    coefficients = step_coefficients(kind, sig[:-1], sig[1:], torch.full((t,), float(eta)), below_one.expand(t))
    return torch.where(sde_step_mask(t, sde_window), coefficients.s, torch.zeros(t))


@dataclass
class Rollout:
    """A batch of sampled trajectories, B = len(prompts) * group_size, each group contiguous.

    latents:   (T+1, B, *sample_shape); latents[0] is the initial noise, latents[t+1] the result of step t.
    log_probs: (T, B) float32 log-probability of each recorded transition (0 at deterministic steps).
    sigmas:    (T+1,) float32 schedule, 1 down to 0.
    images:    (B, C, H, W) decoded final latents, clamped to [0, 1] (a video model: frames (B, F, C, H, W)).
    prompts:   the B prompts (expanded); group_ids: (B,) int64 index of each sample's prompt.
    sde_steps: (T,) bool on the CPU (metadata the host branches on: no device read), which steps were
               sampled with noise and have a log-probability: inside the SDE window with a noise std
               that is not 0 (the module docstring). Which of them train: `train_steps`.
    step_std:  (T,) float32 on the CPU, each step's noise std s from the schedule (`step_noise_std`; 0 at
               ODE steps), what the policy entropy is computed from without a device read.
    guidance:  (T, B, *sample_shape) the velocity shift added at each step (`guidance_shift` of what
               guidance_fn returned: already signed and scaled), or None without guidance_fn. It is
               part of the behaviour policy's mean, so re-evaluation adds it unchanged.
    guidance_weight: (T,) float32 per-step weight gamma_t the shifts were made with (zeros without guidance).
    cond, uncond: the encoded prompts and null prompts (B rows), reused at re-evaluation.
    eta, kind, guidance_scale, group_size, sigma_max, solver: the sampler settings.
    step_expert, step_guidance: each step's expert (`FlowModel.expert_at`) and the CFG scale it used
               (`FlowModel.expert_guidance_scale`), host values, reused at re-evaluation.
    means:     (T, B, *sample_shape) the behaviour policy's mean of each step (what an SDE step adds its noise
               to; the ODE step's result elsewhere), when the sampler was asked to record it (GRPO-Guard's
               mu_old), else None.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    images: torch.Tensor
    prompts: list[str]
    group_ids: torch.Tensor
    sde_steps: torch.Tensor
    step_std: torch.Tensor
    guidance: torch.Tensor | None
    cond: PromptBatch
    uncond: PromptBatch
    eta: float
    kind: str
    guidance_scale: float
    guidance_weight: torch.Tensor
    group_size: int
    sigma_max: torch.Tensor
    step_expert: list[int]
    step_guidance: list[float]
    solver: str = "euler"
    means: torch.Tensor | None = None

    @property
    def num_steps(self) -> int:
        return self.log_probs.shape[0]

    @property
    def batch_size(self) -> int:
        return self.log_probs.shape[1]

    def train_steps(self, timestep_fraction: float = 1.0) -> list[int]:
        """Indices of the trained steps: Flow-GRPO's rule, the SDE steps among the first
        int(T * timestep_fraction) steps in denoising order (T: all the trajectory's steps). 1.0 trains
        every SDE step; Flow-GRPO's 0.99 leaves the last step sampled with noise but untrained."""
        n = check_timestep_fraction(timestep_fraction, self.num_steps)
        return torch.nonzero(self.sde_steps[:n]).flatten().tolist()


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
           seed: int | None = None, guidance_fn: GuidanceFn | None = None,
           guidance_weight: float | Sequence[float] | torch.Tensor = 0.0, batch_size: int | None = None,
           shift: float | None = None, sigmas: torch.Tensor | None = None,
           backend: str = "auto", noise: torch.Tensor | None = None, solver: str = "euler",
           record_means: bool = False, on_decoded: Callable[[torch.Tensor, list[str]], None] | None = None
           ) -> Rollout:
    """Sample `group_size` images per prompt and record the trajectories (no grad).

    Each sample draws its own initial noise and per-step noise from `generator` (or a fresh one
    seeded with `seed`; neither: the global RNG), in one draw for the whole batch, so results do
    not depend on `batch_size`, which only chunks the model forwards. `sigmas` overrides the
    schedule of `schedule_sigmas(num_steps, shift)`; with neither, the model's own schedule
    (`FlowModel.schedule`: SD3's scheduler shift, FLUX's dynamic shift). kind, eta, backend: as in
    `pec_kernels.sde.guided_sde_step`. `noise` (num_steps + 1, B, *sample_shape), when given, replaces
    the draws: noise[0] is the initial noise and noise[t + 1] step t's (the trainer draws it per sample
    from the sample's global index, so samples do not depend on how a batch is split over processes).

    Guidance: `guidance_fn(latents, sigma, v_cfg)` is called on the whole batch with grad enabled (it
    may backpropagate through the decoder and an encoder) and returns the direction in which the
    latents should move (e.g. `pec.regularizers.entropy_guidance`: up each group's perceptual
    entropy). `guidance_shift` turns it into the velocity shift -gamma_t*||v||*g/||g|| (the sign
    that moves x *along* g, since dt < 0; the size a fraction gamma_t of the velocity's), which is
    added to the CFG velocity and stored in the rollout. `guidance_weight` is gamma: one float for
    every step, or (num_steps,) per-step values (a schedule; guidance_fn is not called where it is 0).

    ODE steps (outside `sde_window`, or with noise std 0): `solver` "euler" steps them with the SDE kernel
    at eta 0 (x + dt*v); "dpm2" with DPM-Solver++(2M) in data prediction (`pec_kernels.dpm_solver_step`:
    first order where no earlier data prediction exists, the last step returns x0_hat), the solver
    DiffusionNFT samples with. Experts (`FlowModel.expert_at`) are chosen per step from the host-side
    schedule, with each expert's CFG scale; `FlowModel.cfg_renorm` rescales the CFG velocity as the model's
    pipeline does. `record_means` keeps each step's mean (`Rollout.means`).

    `on_decoded(images, prompts)` (the trainer's overlapped scoring, `pec.scoring.Scorer.submit`): called with
    each micro-batch of `batch_size` rows, in order, its images (clamped to [0, 1]) and their prompts, as soon
    as they are decoded, so that the caller can score them while the sampler goes on. Without guidance the
    micro-batches are then sampled one after the other, each through every step, and each is decoded (in the
    chunks of `FlowModel.decode_chunk`) once its rows are sampled: the next micro-batch samples while the
    caller scores this one. With guidance,
    which couples a group's samples, the whole batch steps together as without `on_decoded`, and is then
    decoded chunk by chunk, each micro-batch handed on as soon as it is decoded. Either way the rollout is the
    one of the call without it, bit for bit: the forwards see the same chunks, the step kernels work row by
    row, and the decoder sees the chunks one call on the whole batch makes.
    """
    _check_sample_args(prompts, group_size, guidance_scale, eta, batch_size)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {list(SOLVERS)}, got {solver!r}")
    device = next(model.parameters()).device
    if sigmas is None:  # built on the host, where the SDE steps are decided
        sigmas = model.schedule(num_steps) if shift is None else schedule_sigmas(num_steps, shift)
    # A schedule given on the device is read once here (callers of the trainer's path pass none).
    host_sigmas = sigmas.detach().to("cpu", torch.float32)
    step_std = step_noise_std(host_sigmas, kind, eta, sde_window)
    sde_steps = step_std > 0
    sigmas = sigmas.to(device=device, dtype=torch.float32, non_blocking=True)
    num_steps = sigmas.shape[0] - 1
    if generator is None and seed is not None:
        generator = torch.Generator(device).manual_seed(seed)

    expanded = [p for p in prompts for _ in range(group_size)]
    b = len(expanded)
    # One prompt at a time: an embedding must not depend on which other prompts share its batch (BLAS
    # rounds a row by its batch), or samples would change with the number of processes.
    cond = PromptBatch.cat([model.encode_prompts([p]) for p in prompts]).repeat_interleave(group_size)
    uncond = model.encode_prompts([""]).repeat_interleave(b)
    shape = (b, *model.sample_shape)
    if noise is None:
        x_init = torch.randn(shape, generator=generator, device=device)
        step_noise = torch.randn((num_steps, *shape), generator=generator, device=device)
    else:
        if noise.shape != (num_steps + 1, *shape):
            raise ValueError(f"noise must have shape (num_steps + 1, B, *sample_shape) = {(num_steps + 1, *shape)}, "
                             f"got {tuple(noise.shape)}")
        x_init, step_noise = noise[0].to(device), noise[1:].to(device)
    weights = _step_weights(guidance_weight, num_steps) if guidance_fn is not None else torch.zeros(num_steps)
    sigma_max = step_sigmas(sigmas, 0).sigma_max
    experts = [model.expert_at(float(host_sigmas[t])) for t in range(num_steps)]
    scales = [model.expert_guidance_scale(e, guidance_scale) for e in experts]

    def denoise(rows: slice) -> _Trajectory:
        """Every step for the samples `rows`, from their initial noise."""
        x = x_init[rows]
        n = x.shape[0]
        cond_rows, uncond_rows = (cond, uncond) if n == b else (cond.index(rows), uncond.index(rows))
        latents, log_probs, guidance, means = [x], [], [], []
        x0_prev = None  # the previous step's data prediction, for the multistep ODE solver
        for t in range(num_steps):
            sig = step_sigmas(sigmas, torch.full((n,), t, device=device))
            scale = scales[t]
            with model.use_expert(experts[t]):
                v_uncond, v_cond = cfg_velocities(model, x, sig.sigma, cond_rows, uncond_rows, batch_size, scale)
            g = None
            if guidance_fn is not None:
                v_cfg = combined_velocity(model, v_uncond, v_cond, scale)
                if weights[t] != 0:
                    with torch.enable_grad():
                        direction = guidance_fn(x, sig.sigma, v_cfg)
                    if direction.shape != x.shape:
                        raise ValueError(f"guidance_fn must return a tensor of shape {tuple(x.shape)}, "
                                         f"got {tuple(direction.shape)}")
                    g = guidance_shift(direction, v_cfg, float(weights[t]))
                else:
                    g = torch.zeros_like(x)
                guidance.append(g)
            if solver == "dpm2" and not sde_steps[t]:
                v = combined_velocity(model, v_uncond, v_cond, scale)
                v = v if g is None else v + g
                x0 = x - sig.sigma.reshape(-1, *([1] * (x.dim() - 1))) * v
                order = 1 if x0_prev is None else 2
                x_next = dpm_solver_step(x, x0, x0_prev, host_sigmas[t - 1].item() if t else None,
                                         host_sigmas[t].item(), host_sigmas[t + 1].item(), order=order)
                x0_prev = x0
                log_probs.append(torch.zeros(n, device=device))
                if record_means:
                    means.append(x_next)
                x = x_next.to(x.dtype)
                latents.append(x)
                continue
            out = guided_sde_step(x, v_uncond, v_cond, scale, sig.sigma, sig.sigma_next, guidance=g,
                                  guidance_weight=1.0, noise=step_noise[t, rows], eta=eta if sde_steps[t] else 0.0,
                                  kind=kind, sigma_max=sigma_max, backend=backend, cfg_renorm=model.cfg_renorm,
                                  return_mean=record_means)
            if solver == "dpm2":  # an SDE step inside a DPM-solved trajectory still feeds the solver's history
                v = combined_velocity(model, v_uncond, v_cond, scale)
                x0_prev = x - sig.sigma.reshape(-1, *([1] * (x.dim() - 1))) * (v if g is None else v + g)
            x = out.prev_sample
            latents.append(x)
            log_probs.append(out.log_prob.float())
            if record_means:
                means.append(out.mean)
        return _Trajectory(torch.stack(latents), torch.stack(log_probs),
                           torch.stack(guidance) if guidance_fn is not None else None,
                           torch.stack(means) if record_means else None)

    if on_decoded is None:
        path = denoise(slice(0, b))
        images = model.decode(path.latents[-1]).float().clamp(0, 1)
    else:
        # Guidance couples a group's samples (and the processes' shares of it): the whole batch steps together.
        micro = batch_size or b
        pieces = [slice(0, b)] if guidance_fn is not None else [slice(i, min(i + micro, b)) for i in range(0, b, micro)]
        decoder = _Decoder(model, expanded, micro, on_decoded)
        parts = []
        for rows in pieces:
            parts.append(denoise(rows))
            decoder.push(parts[-1].latents[-1])
        path = _Trajectory.cat(parts)
        images = decoder.images()

    return Rollout(
        latents=path.latents, log_probs=path.log_probs, sigmas=sigmas, images=images, prompts=expanded,
        group_ids=torch.arange(len(prompts), device=device).repeat_interleave(group_size),
        sde_steps=sde_steps, step_std=step_std, guidance=path.guidance,
        cond=cond, uncond=uncond, eta=float(eta), kind=kind, guidance_scale=float(guidance_scale),
        guidance_weight=weights.to(device, non_blocking=True), group_size=group_size, sigma_max=sigma_max,
        step_expert=experts, step_guidance=scales, solver=solver, means=path.means)


@dataclass
class _Trajectory:
    """What `sample` records for some samples: latents (T+1, n, ...), log_probs (T, n), guidance and means
    (T, n, ...) or None."""

    latents: torch.Tensor
    log_probs: torch.Tensor
    guidance: torch.Tensor | None
    means: torch.Tensor | None

    @staticmethod
    def cat(parts: Sequence[_Trajectory]) -> _Trajectory:
        """The samples of every part, in order (one part: itself)."""
        if len(parts) == 1:
            return parts[0]

        def join(field: str) -> torch.Tensor | None:
            values = [getattr(p, field) for p in parts]
            return None if values[0] is None else torch.cat(values, dim=1)

        return _Trajectory(join("latents"), join("log_probs"), join("guidance"), join("means"))


class _Decoder:
    """`sample`'s decoding with `on_decoded`: the final latents arrive in order, some rows at a time (`push`); each
    chunk of `model.decode_chunk` rows (every `micro` rows when each row decodes alone; the whole batch when the
    model decodes it at once) is decoded as soon as all its rows are there, and each micro-batch of `micro` rows
    is handed to `on_decoded(images, prompts)` as soon as all its rows are decoded. The decoder thus sees the
    chunks that one `model.decode` of the whole batch makes, and the images are the same, bit for bit."""

    def __init__(self, model: FlowModel, prompts: list[str], micro: int,
                 on_decoded: Callable[[torch.Tensor, list[str]], None]) -> None:
        self.model, self.prompts, self.micro, self.on_decoded = model, prompts, micro, on_decoded
        self.total = len(prompts)
        chunk = model.decode_chunk
        self.piece = self.total if chunk is None else micro if chunk == 1 else chunk
        self.latents: list[torch.Tensor] = []  # final latents of the rows sampled but not decoded yet
        self.decoded: list[torch.Tensor] = []  # images of the decoded rows, in chunks
        self.waiting: list[torch.Tensor] = []  # images decoded but not handed on yet
        self.sampled = self.done = self.handed = 0

    def push(self, latents: torch.Tensor) -> None:
        """The final latents of the next rows: decode and hand on what is complete."""
        self.latents.append(latents)
        self.sampled += latents.shape[0]
        while self.done < self.total and min(self.done + self.piece, self.total) <= self.sampled:
            pending = torch.cat(self.latents) if len(self.latents) > 1 else self.latents[0]
            count = min(self.piece, self.total - self.done)
            images = self.model.decode(pending[:count]).float().clamp(0, 1)
            self.latents = [pending[count:]] if count < pending.shape[0] else []
            self.decoded.append(images)
            self.waiting.append(images)
            self.done += count
            self.hand_on()

    def hand_on(self) -> None:
        """Hand every complete micro-batch of decoded images to `on_decoded` (the last one may be shorter)."""
        while self.handed < self.done and (self.done - self.handed >= self.micro or self.done == self.total):
            ready = torch.cat(self.waiting) if len(self.waiting) > 1 else self.waiting[0]
            count = min(self.micro, self.done - self.handed)
            self.on_decoded(ready[:count], self.prompts[self.handed:self.handed + count])
            self.waiting = [ready[count:]] if count < ready.shape[0] else []
            self.handed += count

    def images(self) -> torch.Tensor:
        """Every row's images, once every row was pushed."""
        return torch.cat(self.decoded) if len(self.decoded) > 1 else self.decoded[0]


def combined_velocity(model: FlowModel, v_uncond: torch.Tensor, v_cond: torch.Tensor,
                      guidance_scale: float) -> torch.Tensor:
    """The CFG velocity v_uncond + scale*(v_cond - v_uncond) a step combines (v_cond itself at scale 1, and
    with the model's CFG renorm where it has one: `pec_kernels.cfg_velocity`)."""
    if model.cfg_renorm:
        return cfg_velocity(v_uncond, v_cond, guidance_scale, cfg_renorm=True)
    return v_cond if skips_uncond(guidance_scale) else v_uncond + guidance_scale * (v_cond - v_uncond)


def _step_weights(weight: float | Sequence[float] | torch.Tensor, num_steps: int) -> torch.Tensor:
    """gamma as a (num_steps,) float32 CPU tensor: a number for every step, or one value per step."""
    w = torch.as_tensor(weight, dtype=torch.float32).detach().cpu()
    if w.dim() == 0:
        w = w.expand(num_steps).clone()
    if w.shape != (num_steps,) or not torch.isfinite(w).all():
        raise ValueError(f"guidance_weight must be a finite number or {num_steps} per-step values, got {weight!r:.80}")
    return w


def _recorded_step(model: FlowModel, rollout: Rollout, step: int, sample_idx: torch.Tensor | slice | None,
                   guidance_scale: float | None = None):
    """x, prev_sample, StepSigmas, v_uncond, v_cond, guidance and the CFG scale of recorded `step` for
    `sample_idx` (the scale the step was sampled with unless `guidance_scale` is given; v_uncond is v_cond,
    from one cond forward, when the scale is 1, as in `sample`)."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < rollout.num_steps:
        raise ValueError(f"step must be an int in [0, {rollout.num_steps}), got {step!r}")
    if not bool(rollout.sde_steps[step]):
        raise ValueError(f"step {step} is a deterministic (ODE) step (outside the SDE window, or its noise std "
                         f"is 0); the SDE steps are {torch.nonzero(rollout.sde_steps).flatten().tolist()}")
    if sample_idx is None:
        sample_idx = slice(None)
    elif not isinstance(sample_idx, (slice, torch.Tensor)) or (
            isinstance(sample_idx, torch.Tensor) and (sample_idx.is_floating_point() or sample_idx.dim() != 1)):
        raise ValueError(f"sample_idx must be a 1-D integer tensor, a slice or None, got {sample_idx!r:.80}")
    if guidance_scale is None:
        guidance_scale = rollout.step_guidance[step]
    x, prev = rollout.latents[step][sample_idx], rollout.latents[step + 1][sample_idx]
    sig = step_sigmas(rollout.sigmas, torch.full((x.shape[0],), step, device=x.device))
    with model.use_expert(rollout.step_expert[step]):
        v_uncond, v_cond = cfg_velocities(model, x, sig.sigma, rollout.cond.index(sample_idx),
                                          rollout.uncond.index(sample_idx), guidance_scale=guidance_scale)
    guidance = None if rollout.guidance is None else rollout.guidance[step][sample_idx]
    return x, prev, sig, v_uncond, v_cond, guidance, guidance_scale


def guided_velocity(model: FlowModel, rollout: Rollout, step: int,
                    sample_idx: torch.Tensor | slice | None = None) -> torch.Tensor:
    """The combined velocity v_uncond + scale·(v_cond − v_uncond) + shift of `model` at a recorded
    step (shift: the stored guidance shift), as `step_log_prob` forms it. Call it under
    `torch.no_grad()` with the reference model (e.g. LoRA adapters disabled) to get `v_ref` for the KL."""
    _, _, _, v_uncond, v_cond, guidance, scale = _recorded_step(model, rollout, step, sample_idx)
    v = combined_velocity(model, v_uncond, v_cond, scale)
    return v if guidance is None else v + guidance


def check_kl_units(units: str, kind: str) -> None:
    """ValueError unless `units` is one of KL_UNITS and defined for SDE `kind` (see `kl_in_units`)."""
    if units not in KL_UNITS:
        raise ValueError(f"kl_units must be one of {list(KL_UNITS)}, got {units!r}")
    if units == "flow_grpo" and kind not in ("flow", "cps"):
        raise ValueError(f"kl_units 'flow_grpo' is defined for SDE kinds 'flow' and 'cps' only: Flow-GRPO has no "
                         f"KL for kind {kind!r}; use kl_units 'exact'")


def kl_in_units(kl: torch.Tensor, units: str, kind: str, sigma: torch.Tensor | float,
                sigma_next: torch.Tensor | float) -> torch.Tensor:
    """The fused KL (B,) of a step, ||mu_theta - mu_ref||^2 / (2 s^2) mean-reduced, in `units`.

    "exact": the Gaussian KL itself, s the step's standard deviation (DESIGN.md 2.1).
    "flow_grpo": what Flow-GRPO's trainer computes, so that a beta quoted from Flow-GRPO means the same:
      - kind "flow": Flow-GRPO divides by 2*std_dev_t^2 with std_dev_t = eta*sqrt(sigma/(1 - sigma)),
        without the step's sqrt(-dt) (s = std_dev_t*sqrt(-dt)), so its KL is |dt| = sigma - sigma_next
        times the exact one, step by step: about 10x weaker at 10 uniform steps, and by a varying
        factor under SD3's or FLUX's shifted schedules;
      - kind "cps": Flow-GRPO's std_dev_t = sigma_next*sin(eta*pi/2) already is the step's s, so the
        two units coincide;
      - kind "dance": Flow-GRPO has no formula for it: ValueError.
    sigma, sigma_next: floats or (B,) tensors, the step's flow times.
    """
    check_kl_units(units, kind)
    if units == "exact" or kind == "cps":
        return kl
    dt_abs = torch.as_tensor(sigma, dtype=kl.dtype, device=kl.device) - torch.as_tensor(
        sigma_next, dtype=kl.dtype, device=kl.device)
    return kl * dt_abs


def step_log_prob(model: FlowModel, rollout: Rollout, step: int, sample_idx: torch.Tensor | slice | None = None,
                  *, eta: float | None = None, kind: str | None = None, guidance_scale: float | None = None,
                  v_ref: torch.Tensor | None = None, kl_units: str = "exact", backend: str = "auto",
                  return_mean: bool = False) -> SdeStep:
    """Re-evaluate recorded step `step` for samples `sample_idx` (all if None), with grad.

    Uses the recorded latents (x and prev_sample), prompt encodings, guidance and sampler settings
    of the rollout (eta, kind, guidance_scale: the rollout's unless given), through the same
    `guided_sde_step` call as `sample`, so for unchanged weights log_prob equals the rollout's.
    v_ref: the reference model's combined velocity (see `guided_velocity`) for the fused KL, returned
    in `kl_units` ("exact" or "flow_grpo", see `kl_in_units`). return_mean: also return the step's mean
    under the model (GRPO-Guard's mu_theta).
    Raises ValueError for an ODE step (not in `rollout.sde_steps`), or kl_units "flow_grpo" with kind "dance".
    """
    kind = rollout.kind if kind is None else kind
    check_kl_units(kl_units, kind)
    x, prev, sig, v_uncond, v_cond, guidance, scale = _recorded_step(model, rollout, step, sample_idx,
                                                                     guidance_scale)
    out = guided_sde_step(
        x, v_uncond, v_cond, scale,
        sig.sigma, sig.sigma_next, guidance=guidance, guidance_weight=1.0, prev_sample=prev,
        eta=rollout.eta if eta is None else eta, kind=kind, sigma_max=rollout.sigma_max, v_ref=v_ref,
        backend=backend, cfg_renorm=model.cfg_renorm, return_mean=return_mean)
    if out.kl is None:
        return out
    return out._replace(kl=kl_in_units(out.kl, kl_units, kind, sig.sigma, sig.sigma_next))
