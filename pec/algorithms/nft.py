"""DiffusionNFT's math (DESIGN.md §2.7) as pure tensor functions, with the authors' constants.

Source: the authors' public code, NVlabs/DiffusionNFT @24af555 (research notes: notes/algorithms.md §1):
`scripts/train_nft_sd3.py` (`main`'s training loop, `return_decay`) and `config/nft.py`. Notation as in
DESIGN.md §2: x_σ = (1 − σ)x0 + σε, v ≈ ε − x0, x̂0 = x_σ − σ·v.

  optimality_probability   r = clamp(clip(A, ±5)/5/2 + 1/2, 0, 1)
  nft_timesteps            per sample, a random int(T·0.99)-subset of the T sampler grid points
  forward_noise            x_σ = (1 − σ)x0 + σε
  nft_loss                 the implicit positive/negative policies and the self-normalised x̂0 loss, × 5
  velocity_penalty         mean (v_θ − v_ref)² per sample (the authors' "kl_div_loss", weight 1e-4)
  old_policy_decay         the three decay schedules of the old (sampling) policy
  update_old_policy        θ_old ← d·θ_old + (1 − d)·θ over lists of tensors (the LoRA adapter weights)

The sampler of the old policy is `pec_kernels.dpm_solver_step` (the authors' "dpm2").

`DiffusionNFT` (`--algorithm nft`, options `--nft.*`) puts these behind the trainer's loop:
  rollout   the old policy samples deterministically (eta 0 at every step, `--nft.solver`: the authors'
            dpm2 or Euler), CFG-free; only the clean final latents x0 are used. The old policy is a copy of
            the trainable parameters (the LoRA adapter weights, or this rank's FSDP2 shards) swapped into
            the model around its forwards, never a second base model;
  shaping   one column: the shaped reward R~ (PEC's surprisal enters R before A), group-normalised with
            `--train.global_std` (the authors' global std), clipped to `--train.adv_clip`, then
            r = optimality_probability(A, adv_clip);
  update    per sample int(T·`--train.timestep_fraction`) grid points of the rollout's σ grid, drawn
            without replacement from the step's seed (stream 5), and a fresh ε per (sample, grid point)
            seeded by the sample's global index (stream 6), so no draw depends on how the batch is split
            over processes; loss = mean over samples and grid points of nft_loss (scale
            `--nft.loss_scale`, default `--train.adv_clip` = the authors' 5) + `--nft.ref_coef` ×
            velocity_penalty, in micro-batches with gradients accumulated, `--train.minibatches`
            optimizer updates (the authors: 1; their OCR preset 2); then θ_old ← d·θ_old + (1 − d)·θ with
            d = old_policy_decay(`--nft.decay`, optimizer steps so far). A forward batch never mixes two
            experts of a model that has several (Wan2.2 A14B): each micro-batch is split by
            `FlowModel.expert_at` of its samples' σ (host data);
  checkpoint the old parameters, whole, and the optimizer-step count (`state_dict`), so a resumed run
            equals the uninterrupted one.
Which steps train is NFT's own rule, not Flow-GRPO's (`pec.sampling.trained_steps`: SDE steps among the
first int(T·fraction)): NFT trains a random subset of the whole grid, σ = 1 included, per sample. It
provides no log-probs, ratio or policy entropy, so the regularisers that need them are refused
(`pec.algorithms.check_algorithm`); PEC, PCGS's guided form (the shift enters the ODE sampler's
velocity) and its reward form with `--pcgs.generation_density latent_group`, perc_entropy_bonus and
none compose.

Fusion (issue 18, item 7): not done, because it cannot matter. At DiffusionNFT's SD3.5-M micro-batch,
B = 9 latents of 16 × 64 × 64 (589,824 elements; 1.18 MB in bf16, 2.36 MB in fp32):
  - floor: a fused nft_loss forward + backward must read v_θ, v_old, x_σ, x0 in the forward and again in the
    backward and write dv_θ: 9 latent-sized accesses, 10.6 MB (bf16) / 21.2 MB (fp32), i.e. 3.5 / 7.1 µs
    at an H100's ~3 TB/s; forward_noise reads x0, ε and writes x_σ: 3.5 / 7.1 MB, 1.2 / 2.4 µs.
  - eager torch, as written here (counted on the CPU by benchmarks/bench_nft.py, a dispatch count that does
    not depend on the machine): nft_loss forward + backward runs 49 aten ops in fp32 (54 in bf16, with the
    upcasts) whose tensors total 156 MB (173 MB) read + written, 7.3× (16×) the floor; forward_noise runs
    2 ops over 7.1 MB in fp32, exactly the floor (5 ops, 17.7 MB in bf16). At ~3 TB/s that is ~55 µs of
    traffic plus ~50 launches of a few µs each: about 0.1–0.3 ms per trained step on an H100, an estimate
    from bytes and op counts, not a GPU measurement (no GPU was available for this work; the benchmark's
    GPU case measures it). The host-side launch time overlaps the transformer's queued kernels. On the
    project's shared 2-core CPU the loss took 30–210 ms over five runs (compute-bound there, and the cores are
    shared) against a 1.2–3.8 ms copy floor.
  - the model: each trained (micro-batch, σ) runs the old policy's forward, the reference's forward (for the
    velocity penalty) and the trained forward + backward. DESIGN.md §6 (H200): an SD3.5-M-size DiT at
    B = 16, 512 px takes 146 ms forward and 343 ms forward + backward, so B = 9 costs ≈ (343 + 2·146)·9/16
    ≈ 357 ms.
So the eager elementwise work is ≲ 0.1 % of a trained step (the floor is 1e-5 of it), and a fused kernel
could save at most that: the loss stays plain torch, with autograd and the authors' float64 weights.
benchmarks/bench_nft.py's GPU case asserts the rule it rests on, (loss + noise) ≤ 1 % of the model's
time measured in the same run.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from pec.algorithms.base import Algorithm, Learner, RolloutPlan, UpdateBatch
from pec.algorithms.registry import ALGORITHMS
from pec.config import Config
from pec.distributed import plain_tensor, sample_noise
from pec.seeding import step_seed
from pec_kernels import check_tensor

#: `pec.seeding.step_seed` streams of the update's draws: the trained grid points, and the forward noise.
TIMESTEP_STREAM, NOISE_STREAM = 5, 6

#: The decay schedules of the old policy (`return_decay(step, decay_type)` in train_nft_sd3.py).
DECAY_SCHEDULES = (0, 1, 2)
#: The authors' floor of the self-normalising weights (`.clip(min=0.00001)` in train_nft_sd3.py).
WEIGHT_FLOOR = 1e-5


class NftLoss(NamedTuple):
    """Per-sample (B,) outputs of `nft_loss`, float64 (the authors' float64 weights make their loss float64).

    loss:        scale·(r·L⁺ + (1 − r)·L⁻)/β, differentiable in v_θ (average it over the batch and the
                 trained steps, as the authors' `.mean()` and gradient accumulation do);
    loss_pos:    L⁺ = mean((x̂0⁺ − x0)²/w⁺), differentiable; loss_neg: L⁻ likewise;
    weight_pos:  w⁺ = max(mean|x̂0⁺ − x0|, 1e-5), no gradient; weight_neg: w⁻ likewise.
    """

    loss: torch.Tensor
    loss_pos: torch.Tensor
    loss_neg: torch.Tensor
    weight_pos: torch.Tensor
    weight_neg: torch.Tensor


def _positive_number(name: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def _latents(names: Sequence[str], tensors: Sequence[torch.Tensor], *, data: Sequence[str] = ()) -> torch.dtype:
    """Check latent-shaped inputs (same shape (B, ...) of rank >= 2, one device, float dtypes; the `data`
    ones without grad); return the compute dtype: float64 if any is float64, else float32."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names, tensors):
        check_tensor(name, t)
        if t.dim() < 2:
            raise ValueError(f"{name} must have a batch dimension and at least one more (B, ...), "
                             f"got shape {tuple(t.shape)}")
        if t.shape != first.shape:
            raise ValueError(f"{name} must have the shape of {first_name}, {tuple(first.shape)}, got {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: move them to one device")
        if name in data and t.requires_grad:
            raise ValueError(f"{name} is treated as data and gets no gradient: pass {name}.detach()")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(name: str, value: object, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float or a (B,) tensor on like's device, as a (B, 1, ..., 1) column in `dtype`."""
    batch = like.shape[0]
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise ValueError(f"{name} must be a float or a ({batch},) tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        check_tensor(name, value, ndims=(1,))
        if value.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},) (one value per sample), got {tuple(value.shape)}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the latents are on {like.device}: "
                             "move them to one device")
        if value.requires_grad:
            raise ValueError(f"{name} is treated as data and gets no gradient: pass {name}.detach()")
        column = value.to(dtype)
    else:
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        column = torch.full((batch,), float(value), dtype=dtype, device=like.device)
    return column.view((batch,) + (1,) * (like.dim() - 1))


def optimality_probability(advantages: torch.Tensor, adv_clip: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality probability r ∈ [0, 1] of each sample from its advantage A.

    r = clamp(clip(A, ±adv_clip)/adv_clip/2 + 1/2, 0, 1), i.e. A/10 + 1/2 at the authors' adv_clip 5
    (`config.train.adv_clip_max = 5`, config/base.py; train_nft_sd3.py, adv_mode "all"). advantages: any
    float tensor (e.g. (B,) group-normalised rewards, `pec.grpo.group_advantages` with global_std=True as
    the authors normalise); returns the same shape and dtype. A NaN advantage stays NaN.
    """
    check_tensor("advantages", advantages)
    adv_clip = _positive_number("adv_clip", adv_clip)
    clipped = advantages.clamp(-adv_clip, adv_clip)
    # The authors' order of operations; their final clamp cannot bind after the clip, kept for fidelity.
    return (clipped / adv_clip / 2.0 + 0.5).clamp(0, 1)


def nft_timesteps(num_samples: int, num_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """The grid points each sample trains on: (num_samples, K) int64 indices into the sampler's σ grid.

    Per sample, an independent uniformly random permutation of the T = num_steps grid points σ_0 … σ_{T−1}
    (σ_0 = 1 included, the terminal σ_T = 0 not), of which the first K = int(T·fraction) are kept: a random
    subset of size K without replacement, in random order (train_nft_sd3.py: `torch.randperm` per sample,
    then the first `int(config.sample.num_steps * config.train.timestep_fraction)`; fraction 0.99 there,
    so 9 of 10). Drawn on the CPU from `generator` (a CPU torch.Generator), so the same seed gives the same
    indices on every machine; the result is on the CPU.
    """
    for name, value in (("num_samples", num_samples), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1], got {fraction!r}")
    keep = int(num_steps * fraction)
    if keep < 1:
        raise ValueError(f"fraction {fraction} trains int({num_steps} x {fraction}) = 0 of the {num_steps} "
                         "steps: raise it or the number of steps")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got {generator!r}")
    # argsort of iid uniforms is a uniform permutation per row; float64 makes ties (and the stable order
    # they would fall back to) practically impossible.
    keys = torch.rand((num_samples, num_steps), generator=generator, dtype=torch.float64)
    return keys.argsort(dim=1, stable=True)[:, :keep]


def forward_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The forward process x_σ = (1 − σ)·x0 + σ·ε (train_nft_sd3.py: `xt = (1 - t) * x0 + t * noise`).

    x0, eps: (B, ...) latents of one shape and device; sigma: a float or a (B,) tensor, broadcast over the
    non-batch dims. Computed in float32 (float64 if an input is float64) as one lerp, returned in the
    promoted dtype of x0 and eps. Differentiable in x0 and eps.
    """
    cd = _latents(("x0", "eps"), (x0, eps))
    col = _per_sample("sigma", sigma, x0, cd)
    out_dtype = torch.promote_types(x0.dtype, eps.dtype)
    return torch.lerp(x0.to(cd), eps.to(cd), col).to(out_dtype)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_sigma: torch.Tensor, x0: torch.Tensor,
             sigma: torch.Tensor | float, r: torch.Tensor, beta: float, *, scale: float = 5.0) -> NftLoss:
    """DiffusionNFT's per-sample policy loss at one trained σ (train_nft_sd3.py, the training loop).

    Implicit policies v⁺ = β·v_θ + (1 − β)·v_old and v⁻ = (1 + β)·v_old − β·v_θ, their data predictions
    x̂0^± = x_σ − σ·v^±, self-normalising weights w^± = stopgrad(mean|x̂0^± − x0|) in float64 clamped
    below at 1e-5 (the authors' `.double()` and `.clip(min=0.00001)`), L^± = mean((x̂0^± − x0)²/w^±), and
    loss = scale·(r·L⁺ + (1 − r)·L⁻)/β per sample.

    v_theta: the trained policy's velocity (B, ...), the only input with a gradient; v_old: the old
    (sampling) policy's velocity; x_sigma: `forward_noise(x0, ε, σ)`; x0: the rollout's clean latent —
    all of one shape and device, any float dtypes (float32 math, float64 if any input is float64; the
    authors round v^± to the model's bf16 first, this does not). sigma: float or (B,); r: float or (B,),
    `optimality_probability`; beta: β > 0 (the authors' `config.beta`: 1.0 for PickScore/HPSv2/GenEval,
    0.1 for OCR and multi-reward). scale: 5.0 = the authors' `config.train.adv_clip_max`, by which they
    multiply the policy loss (it matters under gradient clipping; keep it tied to adv_clip).
    Returns an `NftLoss` of (B,) float64 tensors. The mean over the non-batch dims is taken after the
    division by the per-sample w, which is the same number.
    """
    cd = _latents(("v_theta", "v_old", "x_sigma", "x0"), (v_theta, v_old, x_sigma, x0),
                  data=("v_old", "x_sigma", "x0"))
    beta = _positive_number("beta", beta)
    scale = _positive_number("scale", scale, allow_zero=True)
    col = _per_sample("sigma", sigma, v_theta, cd)
    r = _per_sample("r", r, v_theta, torch.float64).view(-1)
    dims = tuple(range(1, v_theta.dim()))
    v_old = v_old.to(cd)
    # x̂0^± − x0 = e ∓ Δ with e = x_σ − x0 − σ·v_old (no gradient) and Δ = σβ·(v_θ − v_old).
    e = x_sigma.to(cd) - x0.to(cd) - col * v_old
    delta = (col * beta) * (v_theta.to(cd) - v_old)
    errors = (e - delta, e + delta)
    with torch.no_grad():
        weights = tuple(d.abs().mean(dim=dims, dtype=torch.float64).clamp_min(WEIGHT_FLOOR) for d in errors)
    loss_pos, loss_neg = (d.square().mean(dim=dims, dtype=torch.float64) / w for d, w in zip(errors, weights))
    loss = (r * loss_pos + (1 - r) * loss_neg) / beta * scale
    return NftLoss(loss, loss_pos, loss_neg, *weights)


def velocity_penalty(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """mean((v_θ − v_ref)²) over the non-batch dims, per sample: (B,) float32 (float64 for float64 inputs).

    DiffusionNFT's optional pull toward the base model (train_nft_sd3.py `kl_div_loss`, v_ref from the
    model with the LoRA adapter disabled), added to the mean policy loss with weight λ = `config.train.beta`
    = 1e-4 in every shipped config, not scaled by 5 or 1/β. Differentiable in v_theta.
    """
    cd = _latents(("v_theta", "v_ref"), (v_theta, v_ref), data=("v_ref",))
    return (v_theta.to(cd) - v_ref.to(cd)).square().mean(dim=tuple(range(1, v_theta.dim())))


def old_policy_decay(schedule: int, step: int) -> float:
    """The old policy's decay d after `step` optimizer steps (train_nft_sd3.py `return_decay`).

    schedule 0: d = 0 (the old policy is the current one; no shipped config uses it);
    schedule 1: d = min(0.001·step, 0.5) (PickScore, HPSv2, GenEval, multi-reward);
    schedule 2: d = 0 while step < 75, then min(0.0075·(step − 75), 0.999) (OCR).
    """
    if isinstance(schedule, bool) or schedule not in DECAY_SCHEDULES:
        raise ValueError(f"schedule must be one of {list(DECAY_SCHEDULES)}, got {schedule!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0 (optimizer steps so far), got {step!r}")
    flat, rate, cap = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[schedule]
    if step < flat:
        return 0.0
    return min((step - flat) * rate, cap)


def update_old_policy(old_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], decay: float) -> None:
    """θ_old ← d·θ_old + (1 − d)·θ in place, without gradient, for matching lists of tensors.

    The authors' update after each epoch's optimizer step (train_nft_sd3.py, end of the epoch loop), with
    d = `old_policy_decay(schedule, optimizer steps so far)`. With LoRA, the lists are the trainable adapter
    weights and a copy of them (or a second adapter's): never a second base model. decay = 0 copies θ.
    """
    decay = _positive_number("decay", decay, allow_zero=True)
    if decay > 1:
        raise ValueError(f"decay must be in [0, 1], got {decay!r}")
    old_params, params = list(old_params), list(params)
    if len(old_params) != len(params):
        raise ValueError(f"old_params must hold one tensor per parameter: {len(old_params)} for {len(params)}")
    for i, (old, new) in enumerate(zip(old_params, params)):
        check_tensor(f"old_params[{i}]", old)
        check_tensor(f"params[{i}]", new)
        if old.shape != new.shape or old.device != new.device:
            raise ValueError(f"old_params[{i}] must match params[{i}] in shape and device: "
                             f"{tuple(old.shape)} on {old.device} vs {tuple(new.shape)} on {new.device}")
    with torch.no_grad():
        for old, new in zip(old_params, params):
            old.mul_(decay).add_(new, alpha=1.0 - decay)


@ALGORITHMS.register("nft")
class DiffusionNFT(Algorithm):
    """DiffusionNFT behind the trainer's loop (see the module docstring)."""

    name = "nft"
    provides = frozenset()

    def __init__(self, cfg: Config, learner: Learner) -> None:
        super().__init__(cfg, learner)
        s = cfg.sampling
        model = learner.policy.model
        # The rollout's σ grid as `pec.sampling.sample` builds it (the model's schedule), on the host: the
        # trained σ and their experts are host data, read from no device value.
        self.sigmas = model.schedule(s.num_steps).detach().to("cpu", torch.float32)
        self.grid_experts = torch.tensor([model.expert_at(float(sig)) for sig in self.sigmas[:-1]])
        self.experts = sorted(set(self.grid_experts.tolist()))
        self.global_index = learner.dist.placement(s.prompts_per_step, s.group_size, cfg.dist.placement).global_index
        with torch.no_grad():
            self.old = [p.detach().clone() for p in learner.params]  # θ_old = θ until the first update
        self.optimizer_steps = 0

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Refuse the options DiffusionNFT has no use for, each in one line."""
        if cfg.sampling.guidance_scale != 1:
            raise ValueError(f"--sampling.guidance_scale must be 1 with --algorithm nft, got "
                             f"{cfg.sampling.guidance_scale:g}: DiffusionNFT is CFG-free (its old policy samples, "
                             f"and it trains, the conditional velocity alone)")
        if cfg.model.guidance_scale_2 is not None and cfg.model.guidance_scale_2 != 1:
            raise ValueError(f"--model.guidance_scale_2 must be 1 or empty with --algorithm nft, got "
                             f"{cfg.model.guidance_scale_2:g}: DiffusionNFT is CFG-free, for every expert")
        if cfg.train.clip_range_high is not None:
            raise ValueError("--train.clip_range_high (Clip-Higher) clips a PPO ratio, and --algorithm nft has none: "
                             "drop it")
        if cfg.train.kl_beta > 0:
            raise ValueError(f"--train.kl_beta ({cfg.train.kl_beta:g}) weighs a KL of the SDE steps' log-probs, "
                             f"which --algorithm nft has none of: use --nft.ref_coef, its velocity penalty to the "
                             f"base model")
        if cfg.sampling.sde_window is not None:
            raise ValueError("--sampling.sde_window has no meaning with --algorithm nft: its old policy samples "
                             "every step deterministically; drop it")

    @classmethod
    def needs_reference(cls, cfg: Config) -> bool:
        return cfg.nft.ref_coef > 0

    def plan(self, step: int) -> RolloutPlan:
        return RolloutPlan(solver=self.cfg.nft.solver, eta=0.0)

    def sampling_policy(self) -> contextlib.AbstractContextManager[None]:
        return self.old_policy()

    def old_policy(self) -> contextlib.AbstractContextManager[None]:
        """Within the context the trainable parameters hold the old policy's values; θ is restored on
        exit, bit for bit (`pec.policy.Policy.holding`)."""
        return self.learner.policy.holding(self.old)

    def columns(self, trained: list[int]) -> int:
        return 1

    def _passes(self, chunk: torch.Tensor, timesteps: torch.Tensor) -> list[tuple[int, int, torch.Tensor, bool]]:
        """The forward passes of micro-batch `chunk` (local rows): (slot j, expert, rows of the chunk, real).
        One pass per slot, or with several experts one per expert among the slot's σ; under several
        processes every expert of the grid gets a pass in every slot (a stand-in row with weight 0 where this
        rank has none: FSDP2's forwards are collectives, so all ranks run the same passes)."""
        experts = self.grid_experts[timesteps[chunk]]  # (n, K)
        everywhere = self.learner.dist.active
        passes = []
        for j in range(timesteps.shape[1]):
            if len(self.experts) == 1:
                passes.append((j, self.experts[0], torch.arange(len(chunk)), True))
                continue
            for e in self.experts:
                rows = torch.nonzero(experts[:, j] == e).flatten()
                if rows.numel():
                    passes.append((j, e, rows, True))
                elif everywhere:
                    passes.append((j, e, torch.zeros(1, dtype=torch.long), False))
        return passes

    def update(self, batch: UpdateBatch) -> tuple[dict[str, Any], list[str]]:
        """`train.minibatches` optimizer updates on the step's clean latents, then the old policy's decay
        (module docstring). Masked samples (`batch.valid` False) add nothing to the loss. Returns the
        averaged diagnostics (0-dim device tensors and floats) and the causes of the skipped updates."""
        cfg, learner = self.cfg, self.learner
        nft, t = cfg.nft, cfg.train
        policy, dist, device = learner.policy, learner.dist, learner.device
        model, rollout = policy.model, batch.rollout
        scale = t.adv_clip if nft.loss_scale is None else nft.loss_scale
        # Per sample, its trained grid points: one draw for the whole batch from the step's seed, this rank's rows.
        timesteps = nft_timesteps(cfg.batch_size, rollout.num_steps, t.timestep_fraction, torch.Generator().manual_seed(
            step_seed(cfg.seed, batch.step, TIMESTEP_STREAM)))[self.global_index]
        slots = timesteps.shape[1]
        noise_seed = step_seed(cfg.seed, batch.step, NOISE_STREAM)
        r = optimality_probability(batch.advantages[:, 0], t.adv_clip)
        x0_all = rollout.latents[-1]
        # DDP and FSDP2 average gradients over ranks; every rank's loss is already a share of the global mean.
        world = dist.world_size
        zero = torch.zeros((), dtype=torch.float64, device=device)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: zero)
        grad_norm_sum, updates, causes = zero, 0, []
        model.train()
        for mb_index, (chunks, mb) in enumerate(batch.minibatches):
            learner.optimizer.zero_grad(set_to_none=True)
            pieces = len(mb) * slots  # the loss is a mean over the minibatch's (global) samples and grid points
            work = [(idx, self._passes(idx, timesteps)) for idx in chunks]
            last, done = sum(len(passes) for _, passes in work), 0
            mb_loss = zero
            for idx, passes in work:
                # (slots, n, ...): ε of each (sample, slot), seeded by the sample's global index.
                eps = sample_noise(self.global_index[idx], tuple(model.sample_shape), slots - 1, noise_seed, device)
                for j, expert, rows, real in passes:
                    done += 1
                    learner.policy.gradient_sync(done == last)
                    local = idx[rows]
                    local_dev = local.to(device, non_blocking=True)
                    sigma = self.sigmas[timesteps[local, j]].to(device, non_blocking=True)
                    x0 = x0_all[local_dev]
                    x_sigma = forward_noise(x0, eps[j, rows.to(device, non_blocking=True)], sigma)
                    cond = rollout.cond.index(local_dev)
                    with torch.no_grad():
                        with self.old_policy(), model.use_expert(expert):
                            v_old = model.velocity(x_sigma, sigma, cond)
                        v_ref = None
                        if nft.ref_coef > 0:
                            with policy.reference() as ref, ref.use_expert(expert):
                                v_ref = ref.velocity(x_sigma, sigma, cond)
                    with model.use_expert(expert):
                        v_theta = model.velocity(x_sigma, sigma, cond)
                    out = nft_loss(v_theta, v_old, x_sigma, x0, sigma, r[local_dev], nft.beta, scale=scale)
                    keep = batch.valid[local_dev]
                    if not real:  # a stand-in pass: it only keeps the ranks' collectives in step
                        keep = torch.zeros_like(keep)
                    loss, terms = out.loss, {"nft/loss_pos": out.loss_pos, "nft/loss_neg": out.loss_neg}
                    if v_ref is not None:
                        terms["nft/velocity_penalty"] = velocity_penalty(v_theta, v_ref).double()
                        loss = loss + nft.ref_coef * terms["nft/velocity_penalty"]
                    piece = torch.where(keep, loss, 0).sum() / pieces
                    (piece * world).backward()
                    mb_loss = mb_loss + piece.detach()
                    for key, value in (("loss", loss), *terms.items()):
                        sums[key] = sums[key] + torch.where(keep, value.detach(), 0).sum()
                    sums["pieces"] = sums["pieces"] + keep.sum()
            grad_norm = learner.step(mb_index, mb_loss, mb, batch.global_valid, causes)
            if grad_norm is not None:
                grad_norm_sum = grad_norm_sum + grad_norm.double()
                updates += 1
        learner.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += updates  # the same on every rank: each update's decision is all-reduced
        decay = old_policy_decay(nft.decay, self.optimizer_steps)
        update_old_policy(self.old, learner.params, decay)
        valid = batch.valid.double()
        sums["nft/r_mean"] = (r.double() * valid).sum()
        sums["advantage_abs"] = (batch.advantages[:, 0].double().abs() * valid).sum()
        sums["samples"] = valid.sum()
        keys = sorted(sums)
        totals = dict(zip(keys, dist.all_reduce_(torch.stack([sums[k].double() for k in keys]))))
        row: dict[str, Any] = {k: totals[k] / totals["pieces"].clamp_min(1) for k in keys
                               if k in ("loss", "nft/loss_pos", "nft/loss_neg", "nft/velocity_penalty")}
        row.update({k: totals[k] / totals["samples"].clamp_min(1) for k in ("nft/r_mean", "advantage_abs")})
        # RMS distance from θ to the old policy the next rollout samples with.
        with torch.no_grad():
            squares = sum(plain_tensor((p.detach() - o).double().square().sum())
                          for p, o in zip(learner.params, self.old))
        numel = sum(o.numel() for o in self.old)
        row.update({"grad_norm": grad_norm_sum / updates if updates else zero + torch.nan, "nft/decay": decay,
                    "nft/optimizer_steps": float(self.optimizer_steps),
                    "nft/old_distance": (squares / max(numel, 1)).sqrt()})
        return row, causes

    def state_dict(self) -> dict[str, Any]:
        """{"old": the old policy's trainable parameters by name, whole and on the CPU (gathered like
        `Policy.trainable_state`: a collective under FSDP2, every rank calls it), "optimizer_steps": int}."""
        return {"old": self.learner.policy.values_state(self.old), "optimizer_steps": self.optimizer_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; an empty state (a checkpoint written by another algorithm) starts the old
        policy at the loaded θ with no optimizer steps counted."""
        if not state:
            with torch.no_grad():
                for old, p in zip(self.old, self.learner.params):
                    old.copy_(p)
            self.optimizer_steps = 0
            return
        if set(state) != {"old", "optimizer_steps"} or not isinstance(state["optimizer_steps"], int):
            raise ValueError(f"the checkpoint's DiffusionNFT state must hold 'old' and an int 'optimizer_steps', "
                             f"got {sorted(state)}")
        self.learner.policy.load_values_state(self.old, state["old"])  # sharded where the parameters are
        self.optimizer_steps = state["optimizer_steps"]
