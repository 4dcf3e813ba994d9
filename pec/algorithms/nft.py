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

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from pec_kernels import check_tensor

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
