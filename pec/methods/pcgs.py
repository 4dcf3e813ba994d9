"""PCGS, the perceptual constraint on the generation space (DESIGN.md 2.5), in its two forms.

- Reward form (`--pcgs.form reward`, the paper's): R~_t = R - lambda * omega_t * (log p_perc - log p_gen),
  with log p_gen the behaviour policy's log-prob of each trained step (`--pcgs.generation_density policy`,
  which needs per-step log-probs) or the sample's log-density under its group's Gaussian fit in latent
  space (`latent_group`, which any algorithm can give).
- Guided form (`--pcgs.form guided`, this project's): the rollout's velocity is shifted up each group's
  perceptual-entropy gradient (`pec.regularizers.pcgs_guidance`); the rewards are not shaped. It needs
  nothing from the algorithm: the shift enters the sampler's velocity, SDE or ODE steps alike.
"""
from __future__ import annotations

import torch

from pec.methods.base import GuidanceContext, GuidanceFn, Method, ShapingInputs, StepContext
from pec.methods.registry import METHODS
from pec.regularizers import latent_group_log_density, omega_weights, pcgs_guidance, pcgs_reward


@METHODS.register("pcgs")
class PCGS(Method):
    """PCGS in the form `--pcgs.form` selects."""

    name = "pcgs"

    def requirements(self) -> dict[str, str]:
        pcgs = self.cfg.pcgs
        if pcgs.form == "reward" and pcgs.generation_density == "policy":
            return {"log_probs": "its reward form with --pcgs.generation_density policy reads log p_gen as each "
                                 "trained step's log-prob (--pcgs.generation_density latent_group or --pcgs.form "
                                 "guided need none)"}
        return {}

    def guidance(self, ctx: GuidanceContext) -> tuple[GuidanceFn | None, float | torch.Tensor]:
        if self.cfg.pcgs.form != "guided":
            return None, 0.0
        return pcgs_guidance(self.cfg, ctx.decode, ctx.encoder, ctx.group_size, ctx.num_steps, gather=ctx.gather)

    def shape(self, inputs: ShapingInputs, ctx: StepContext) -> torch.Tensor:
        cfg = self.cfg
        if cfg.pcgs.form != "reward":
            return super().shape(inputs, ctx)
        omega = omega_weights(cfg.pcgs.omega, inputs.columns, device=inputs.rewards.device)
        if cfg.pcgs.generation_density == "latent_group":
            density = latent_group_log_density(inputs.latents, cfg.sampling.group_size,
                                               per_dim=cfg.perceptual.per_dim, valid=inputs.valid,
                                               check_finite=False)
            log_p_gen = density[:, None].expand(-1, inputs.columns)
        else:
            log_p_gen = inputs.log_probs
        return pcgs_reward(inputs.rewards, -inputs.surprisal, log_p_gen, cfg.pcgs.lambda_, omega)
