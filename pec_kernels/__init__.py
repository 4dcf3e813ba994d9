"""Fused GPU kernels for perceptual-entropy RLHF, each with a torch reference and autograd.

Ops (DESIGN.md §3): `knn_entropy` (Kozachenko-Leonenko kNN entropy and its gradient),
`sde_step_logprob` and `guided_sde_step` (batched SDE steps with log-probabilities; eta=0 is the Euler ODE
step; `cfg_velocity` is the latter's CFG combination alone), `dpm_solver_step` (the deterministic
DPM-Solver++ step, 1st and 2nd order, in plain torch).
Backends: "cuda" (pec_kernels._C, built from csrc/), "triton", "torch" (reference and CPU path);
"auto" picks the fastest one available and never fails where a slower one would work: a faster
backend that fails to compile or launch is replaced by the next, with one warning (`failed_backends()`
lists them, `reset_fallbacks()` retries them).
This package depends on torch and triton only. Also public: the argument checks every op uses
(`check_tensor`, `check_choice`: one-line ValueErrors naming the argument), the SDE kinds (`SDE_KINDS`)
and their per-step coefficients (`step_coefficients`), for callers that decide on the host which steps
have noise.
"""
from pec_kernels._checks import check_choice, check_tensor
from pec_kernels._extension import cuda_ops_available, extension_status
from pec_kernels._fallback import failed_backends, reset_fallbacks
from pec_kernels.knn import KnnEntropy, knn_entropy
from pec_kernels.gaussian import GaussianEntropy, gaussian_entropy
from pec_kernels.sde import (SOLVER_ORDERS, SdeStep, cfg_velocity, dpm_solver_step, guided_sde_step,
                             sde_step_logprob, step_sigmas)
from pec_kernels.sde.coefficients import KINDS as SDE_KINDS
from pec_kernels.sde.coefficients import step_coefficients

__all__ = ["SDE_KINDS", "check_choice", "check_tensor", "step_coefficients", "cuda_ops_available", "extension_status", "failed_backends", "reset_fallbacks", "GaussianEntropy",
           "gaussian_entropy", "KnnEntropy", "knn_entropy", "SdeStep", "guided_sde_step", "sde_step_logprob",
           "step_sigmas", "SOLVER_ORDERS", "dpm_solver_step", "cfg_velocity"]
