"""Batched SDE steps of flow-matching samplers with their log-probabilities (DESIGN.md §2.1, §3).

`sde_step_logprob` (one velocity) and `guided_sde_step` (CFG combine in the same pass) return an
`SdeStep`; `cfg_velocity` is that CFG combination alone (with Qwen-Image's norm rescale
optionally); `step_sigmas` turns per-sample step indices into per-sample σ on the device.
Modules: coefficients (schedule math, shared by all backends), schedule (σ lookup), api (public ops),
function (autograd), backends (dispatch), torch_backend / triton_backend / cuda_backend (the fused pass).
"""
from pec_kernels.sde.api import SdeStep, cfg_velocity, guided_sde_step, sde_step_logprob
from pec_kernels.sde.schedule import StepSigmas, step_sigmas

__all__ = ["SdeStep", "StepSigmas", "cfg_velocity", "guided_sde_step", "sde_step_logprob", "step_sigmas"]
