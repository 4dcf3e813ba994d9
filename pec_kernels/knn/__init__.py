"""Kozachenko-Leonenko kNN entropy with its gradient (DESIGN.md §2.2, §3).

Modules: api (knn_entropy, validation), estimator (the shared math), autograd (the exact-distance
Function), backends (dispatch and the backend contract), torch_backend, triton_backend + triton_kernels,
cuda (the CUDA-extension backend).
"""
from pec_kernels.knn.api import KnnEntropy, knn_entropy

__all__ = ["KnnEntropy", "knn_entropy"]
