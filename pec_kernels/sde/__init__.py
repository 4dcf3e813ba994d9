"""Batched SDE steps of flow-matching samplers with their log-probabilities (DESIGN.md §2.1, §3), and ODE steps.

`sde_step_logprob` (one velocity) and `guided_sde_step` (CFG combine in the same pass) return an
`SdeStep`; `cfg_velocity` is that CFG combination alone (with Qwen-Image's norm rescale optionally);
`step_sigmas` turns per-sample step indices into per-sample σ on the device; `dpm_solver_step` is the
deterministic DPM-Solver++ step (1st order = Euler, 2nd order = DiffusionNFT's "dpm2"); the Euler ODE
step is also `guided_sde_step` with eta=0.
Modules: coefficients (schedule math, shared by all backends), schedule (σ lookup), api (public ops),
function (autograd), backends (dispatch), torch_backend / triton_backend / cuda_backend (the fused pass),
solvers (the ODE solver steps, torch only).
"""
from pec_kernels.sde.api import SdeStep, cfg_velocity, guided_sde_step, sde_step_logprob
from pec_kernels.sde.schedule import StepSigmas, step_sigmas
from pec_kernels.sde.solvers import ORDERS as SOLVER_ORDERS
from pec_kernels.sde.solvers import dpm_solver_step

__all__ = ["SOLVER_ORDERS", "SdeStep", "StepSigmas", "cfg_velocity", "dpm_solver_step", "guided_sde_step",
           "sde_step_logprob", "step_sigmas"]
