"""The differentiable part of knn_entropy: exact distances of the selected pairs and their gradient.

Selection is piecewise constant, so only the distances carry gradient. The forward recomputes
d_ij = ‖x_i − c_j‖ of the k selected pairs exactly, re-sorts them, clamps them at `min_dist`; the
backward scatters through the same pairs with the backend's pair_grad kernel. No n×n matrix and no
autograd graph over a gathered (n, k, D) tensor.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from pec_kernels._fallback import Chain
from pec_kernels._fallback import run as run_with_fallback
from pec_kernels.knn.backends import module_of
from pec_kernels.knn.estimator import RowScale, pair_coefficients, sort_pairs


class NeighbourDistances(torch.autograd.Function):
    """(x, reference, index, min_dist, chain[, exact, scale]) -> (distance, index), both (G, n, k), sorted
    by exact distance.

    distance = max(‖x_i − c_j‖, min_dist); the pairs clamped by min_dist get zero gradient.
    reference is None in self mode; a (1, M, D) reference is a bank shared by all groups. chain: the
    names of the backends (pec_kernels._fallback) from the one that selected `index` on; its head
    (pec_kernels.knn.backends.module_of) computes, and the
    backward falls back along it. The indices come from the backend's own select, so no backend
    re-checks their range (that would cost a host synchronisation). `exact`, when
    the backend's selection already produced the exact fp32 distances of these pairs, saves recomputing them.
    `scale` (RowScale, cosine metric): the distances are those of the rows times their inverse norms
    u = x·s (the kernels scale as they read); the backward maps the gradient in u to x through the
    normalisation's Jacobian, s·(g − (g·u)u), in place on the gradient buffer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, reference: torch.Tensor | None, index: torch.Tensor,
                min_dist: float, chain: Chain,
                exact: torch.Tensor | None = None, scale: RowScale | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if exact is None:
            exact = module_of(chain[0]).pair_distances(x, reference, index, check_index=False, scale=scale)
        exact, index = sort_pairs(exact, index)
        ctx.save_for_backward(x, reference, index, exact)
        ctx.scale = scale
        ctx.mark_non_differentiable(index)
        ctx.min_dist = min_dist
        ctx.chain = chain
        return exact.clamp_min(min_dist), index

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_distance: torch.Tensor, _grad_index: None):
        x, reference, index, exact = ctx.saved_tensors
        coef = pair_coefficients(grad_distance, exact, ctx.min_dist)
        grad_x, grad_reference = run_with_fallback(
            "knn_entropy", ctx.chain,
            lambda chain: module_of(chain[0]).pair_grad(x, reference, index, coef, check_index=False,
                                                        scale=ctx.scale))
        if ctx.scale is not None:
            grad_x = _through_normalisation(grad_x, x, ctx.scale.x)
            if grad_reference is not None:
                grad_reference = _through_normalisation(grad_reference, reference, ctx.scale.reference)
        grad_x = grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None
        if grad_reference is not None and ctx.needs_input_grad[1]:
            grad_reference = grad_reference.to(reference.dtype)
        else:
            grad_reference = None
        return grad_x, grad_reference, None, None, None, None, None


def _through_normalisation(grad: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The gradient in t of a function of u = t·s (s = 1 / max(‖t‖, NORM_EPS) per row), given its
    gradient `grad` in u: s·g − s³(g·t)·t, in place on `grad` (G, rows, D); the row dot products are one
    batched matmul. (For rows shorter than NORM_EPS F.normalize drops the second term; such rows are 0
    in practice, masked rows among them, and then the term is 0 too.)"""
    flat = t.reshape(-1, t.shape[-1], 1).to(grad.dtype)  # a view unless t is 16-bit
    dots = torch.bmm(grad.reshape(-1, 1, t.shape[-1]), flat).reshape(scale.shape)
    radial = scale.pow(3) * dots
    grad.mul_(scale[..., None].to(grad.dtype))
    return grad.addcmul_(t, radial[..., None].to(grad.dtype), value=-1.0)
