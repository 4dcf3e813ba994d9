"""The regularisers compared in the paper, as reward shaping and loss terms.

- PEC (DESIGN.md 2.4): R~_t = R + lambda * omega_t * surprisal, surprisal from the perceptual entropy
  estimator, per group.
- PCGS, reward form (2.5; the paper's PCGS, named PCVAE on its project page):
  R~_t = R - lambda * omega_t * (log p_perc - log p_gen), with log p_gen read as the behaviour
  policy's log-prob of the step ("policy", the page's formula; see `pcgs_reward` for what that
  amounts to) or as the sample's log-density under its group's Gaussian fit in the generated latent
  space ("latent_group", `latent_group_log_density`).
- PCGS, guided form (2.5; this project's own method, the design card's "guided sampling", in the line
  of Particle Guidance and CADS): `entropy_guidance` returns the gradient of each group's perceptual
  entropy with respect to the current latents (the direction that pushes the group apart);
  `pec.sampling.guidance_shift` turns it into the velocity shift, with the sign and the scale-free size
  decided there.
- The policy-entropy bonus baseline: H = (D/2) log(2 pi e s^2) per step, which does not depend on
  theta (s is fixed by the schedule), so the bonus has zero gradient. That is the paper's point.

The shaped rewards are (B, T) arrays: one column per trained step, normalised per group and column by
`pec.grpo.group_advantages`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from pec.config import OMEGAS, Config
from pec.entropy import group_entropy
from pec.sampling import sde_step_mask
from pec_kernels import check_choice, check_tensor


def omega_weights(name: str, num_steps: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-step weights omega_t (T,), mean 1. The paper does not define omega publicly (notes/paper.md 8.1).

    "uniform": all 1. "late": rising linearly toward the last (least noisy) steps, where images have
    formed; "early": the reverse.
    """
    check_choice("omega", name, OMEGAS)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = torch.arange(1, num_steps + 1, dtype=torch.float32, device=device)
    w = {"uniform": torch.ones_like(ramp), "late": ramp, "early": ramp.flip(0)}[name]
    return w / w.mean()


def pec_reward(rewards: torch.Tensor, surprisal: torch.Tensor, lam: float, omega: torch.Tensor) -> torch.Tensor:
    """PEC's shaped reward R~[b, t] = R[b] + lam * omega[t] * surprisal[b].

    Args:
        rewards: (B,) task rewards of the final images.
        surprisal: (B,) perceptual surprisal -log p_perc of each sample within its group (detached:
            no gradient flows through the encoder).
        lam: lambda.
        omega: (T,) per-step weights.
    """
    _check_rows(rewards=rewards, surprisal=surprisal)
    check_tensor("omega", omega, ndims=(1,))
    return rewards.float()[:, None] + lam * omega[None, :] * surprisal.detach().float()[:, None]


def pcgs_reward(rewards: torch.Tensor, log_p_perc: torch.Tensor, log_p_theta: torch.Tensor, lam: float,
                omega: torch.Tensor) -> torch.Tensor:
    """PCGS reward form R~[b, t] = R[b] - lam * omega[t] * (log_p_perc[b] - log_p_theta[b, t]).

    What the "policy" reading amounts to: with log_p_theta the behaviour policy's log-prob of the
    sampled transition (the project page's formula), x' = mu + s*eps, so

        log p_theta(x'|x) = -1/2 mean(eps^2) - log s - 1/2 log 2 pi,

    which does not depend on theta (s is fixed by the schedule, and the same for every sample of a
    step column). After per-group, per-column normalisation the constant -log s - 1/2 log 2 pi
    cancels, and the shaped reward is PEC's R + lam*omega*surprisal plus lam*omega*(-1/2 mean(eps^2)):
    zero-mean noise (its spread is lam*omega*sqrt(1/(2D)) for D latent elements) that carries no
    information about the sample. So the "policy" reading is PEC with added noise;
    `latent_group_log_density` gives a theta-dependent reading of "generation space" to pass as
    `log_p_theta` instead (broadcast over the T columns).

    Args:
        rewards: (B,) task rewards.
        log_p_perc: (B,) perceptual log-density of each sample (= -surprisal), detached.
        log_p_theta: (B, T) the generation-space log-density of each sample per trained step: the
            behaviour policy's log-probability of each trained transition (mean-reduced, as stored in
            the rollout) in the "policy" reading, detached.
        lam: lambda.
        omega: (T,) per-step weights.
    """
    _check_rows(rewards=rewards, log_p_perc=log_p_perc)
    check_tensor("log_p_theta", log_p_theta, ndims=(2,))
    if log_p_theta.shape != (rewards.shape[0], omega.shape[0]):
        raise ValueError(f"log_p_theta must have shape (B, T) = ({rewards.shape[0]}, {omega.shape[0]}), "
                         f"got {tuple(log_p_theta.shape)}")
    one_sample_kl = log_p_perc.detach().float()[:, None] - log_p_theta.detach().float()
    return rewards.float()[:, None] - lam * omega[None, :] * one_sample_kl


def latent_group_log_density(latents: torch.Tensor, group_size: int, *, per_dim: bool = True,
                             valid: torch.Tensor | None = None, check_finite: bool = True) -> torch.Tensor:
    """The "latent_group" reading of log p_gen in the PCGS reward form: (B,) log-density of each
    generated latent under a diagonal Gaussian fitted to its group (the estimator of DESIGN.md 2.2,
    applied in the space the model generates in instead of a perceptual space).

    Unlike the behaviour log-prob it depends on theta, through the samples: it is high for a sample
    typical of what the policy generates for its prompt and low for an outlier, so
    -(log p_perc - log p_gen) rewards samples that are rarer perceptually than in latent space.

    Args:
        latents: (B, ...) final latents of the rollout (`Rollout.latents[-1]`), groups contiguous.
        group_size: samples per group (>= 2).
        per_dim: divide by the number of latent elements, like the perceptual surprisal with
            `perceptual.per_dim` and the mean-reduced policy log-prob.
        valid: optional (B,) bool mask (`pec.run_safety`): each group is fitted on its valid samples only,
            and masked samples get 0 (the mask stays on the device).
        check_finite: check the used latents for NaN/Inf (one host sync); the trainer, which has zeroed
            every non-finite value of the rollout, passes False.
    """
    check_tensor("latents", latents)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (a Gaussian fit needs two samples), got {group_size!r}")
    if latents.dim() < 2 or latents.shape[0] % group_size:
        raise ValueError(f"latents must be (B, ...) with B a multiple of group_size={group_size}, "
                         f"got shape {tuple(latents.shape)}")
    flat = latents.detach().float().reshape(-1, group_size, latents[0].numel())
    mask = None if valid is None else valid.reshape(-1, group_size)
    return -group_entropy(flat, estimator="gaussian", per_dim=per_dim, valid=mask,
                          check_finite=check_finite).surprisal.reshape(-1)


def policy_entropy(std: torch.Tensor | float, dim: int) -> torch.Tensor:
    """Analytic entropy (D/2) log(2 pi e s^2) of one SDE step's Gaussian policy N(mu_theta, s^2 I).

    It depends only on s, which the noise schedule fixes: never on theta. Pass host values (a float, or
    a CPU tensor such as `Rollout.step_std` of the trained steps): they are checked, and an s that is
    not a positive finite number raises ValueError, since an ODE step (s = 0) has no Gaussian policy
    and its entropy would be -inf.
    """
    s = torch.as_tensor(std, dtype=torch.float64)
    if s.device.type != "cpu":
        raise ValueError(f"std must be a float or a CPU tensor (the schedule's host values, e.g. Rollout.step_std), "
                         f"got a tensor on {s.device}")
    if not all(v > 0 and math.isfinite(v) for v in s.flatten().tolist()):  # host values: no device read
        raise ValueError(f"std must be > 0 and finite (a step with noise std 0 is an ODE step: it has no policy "
                         f"entropy and is never trained), got {std!r:.120}")
    return 0.5 * dim * torch.log(2 * math.pi * math.e * s.square())


def entropy_guidance(decode: Callable[[torch.Tensor], torch.Tensor],
                     encode: Callable[[torch.Tensor], torch.Tensor], group_size: int, *, estimator: str = "knn",
                     k: int = 3, per_dim: bool = True,
                     gather: Callable[[torch.Tensor], torch.Tensor] | None = None, check_finite: bool = True
                     ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A guidance function g(latents, sigma, v) for the guided PCGS sampler (`pec.sampling.sample`).

    g is the gradient of the sum of the groups' perceptual entropies with respect to the current
    latents, through x0_hat = x - sigma * v, the decoder and the encoder (the kNN op's backward); v
    is held constant, so no gradient goes through the transformer. Samples are grouped in consecutive
    runs of `group_size`, as the sampler lays them out.

    g is an ascent direction in latent space: moving x along +g pushes each group apart. It is not
    a velocity: the sampler's `guidance_shift` turns it into the shift -gamma*||v||*g/||g|| (minus,
    because sampling moves x by dt*v with dt < 0; DESIGN.md 2.5).

    Args:
        decode: latents -> images in [0, 1], differentiable (FlowModel.decode).
        encode: images -> (B, D) features, differentiable (a perceptual encoder).
        group_size: samples per group (on this process).
        estimator, k, per_dim: as in `pec.entropy.group_entropy`.
        gather: with groups spread over processes, maps this rank's (G, group_size, D) features to the
            whole groups' (G, n, D), differentiably (`pec.distributed.DistContext.gather_group_samples`):
            each group's entropy then covers all its samples and the gradient flows back to this rank's.
        check_finite: check the features for NaN/Inf at every guided step (one host sync each).
    """
    def guidance(latents: torch.Tensor, sigma: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = latents.detach().float().requires_grad_(True)
            s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *([1] * (x.dim() - 1)))
            x0_hat = x - s * velocity.detach().float()
            feats = encode(decode(x0_hat))
            groups = feats.reshape(-1, group_size, feats.shape[-1])
            if gather is not None:
                groups = gather(groups)
            total = group_entropy(groups, estimator=estimator, k=k, per_dim=per_dim,
                                  check_finite=check_finite).entropy.sum()
            (grad,) = torch.autograd.grad(total, x)
        return grad.to(latents.dtype)

    return guidance


def pcgs_guidance(cfg: Config, decode: Callable[[torch.Tensor], torch.Tensor],
                  encode: Callable[[torch.Tensor], torch.Tensor], group_size: int, num_steps: int,
                  gather: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor]:
    """The guided PCGS form's sampler arguments (guidance_fn, per-step weights (num_steps,)) from `cfg`: the
    entropy gradient in `perceptual.space` (`cfg.perceptual`'s estimator, k, per_dim) over groups of
    `group_size` consecutive samples, weighted `pcgs.guidance_weight` on the steps of `pcgs.guidance_window`
    (all steps when unset). One builder for the trainer's rollouts and `pec.evaluate --eval.guidance`.
    It does not check the features for NaN/Inf (no host sync per guided step): a non-finite feature makes
    the sample non-finite, and the run-safety mask drops it after the rollout."""
    p = cfg.perceptual
    guide = entropy_guidance(decode, encode, group_size, estimator=p.estimator, k=p.k, per_dim=p.per_dim,
                             gather=gather, check_finite=False)
    window = tuple(cfg.pcgs.guidance_window) if cfg.pcgs.guidance_window else None
    return guide, cfg.pcgs.guidance_weight * sde_step_mask(num_steps, window).float()


def _check_rows(**tensors: torch.Tensor) -> None:
    rows = None
    for name, t in tensors.items():
        check_tensor(name, t, ndims=(1,))
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            raise ValueError(f"{name} must have {rows} rows like {next(iter(tensors))}, got {t.shape[0]}")
