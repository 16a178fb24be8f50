"""Activation-aware fits: minimize ``||X (W - W_hat)||_F`` from ``C = X^T X`` only.

A layer ``y = x W`` (``W`` the ``(in, out)`` kernel matrix; a convolution's
``(kh kw cin, cout)`` with ``X`` its im2col patches) sees inputs ``X`` (one
row per sample or patch). Its output error on them is

    ||X (W - W_hat)||_F^2 = tr((W - W_hat)^T C (W - W_hat)) = ||R (W - W_hat)||_F^2

for any ``R`` with ``R^T R = C``, e.g. the transposed Cholesky factor. So a
fit that minimizes the plain Frobenius error of ``R W`` (SVD) or carries
``R`` as a fixed leftmost factor (palm4MSA) minimizes the error on the data.
``C`` is damped as GPTQ does (Frantar et al. 2023, section 4: add a small
fraction of its mean diagonal) so that it is positive definite.

- Whitened SVD (SVD-LLM, Wang et al. 2024, section 3.1; ASVD): the rank-r
  optimum is ``W_hat = R^{-1} [R W]_r``.
- Input-norm-weighted pruning scores ``|W_ij| ||x_i||`` (Wanda, Sun et al.
  2024), ``||x_i||^2 = C_ii``: the diagonal of the same error.
"""

import numpy as np
import scipy.linalg

__all__ = [
    "DAMPING",
    "damped_covariance",
    "input_norm_scores",
    "whitened_svd",
    "whitening_factor",
    "weighted_relative_error",
]

#: GPTQ's damping: ``C + DAMPING * mean(diag(C)) I``.
DAMPING = 0.01


def damped_covariance(covariance, damping=DAMPING):
    """``C + damping * mean(diag(C)) I`` (``I`` alone for an all-zero ``C``), float64.

    Raises ValueError if ``covariance`` is not a square, symmetric matrix of
    finite values or ``damping`` is not positive.
    """
    covariance = np.asarray(covariance, dtype=np.float64)
    if covariance.ndim != 2 or covariance.shape[0] != covariance.shape[1]:
        raise ValueError(f"`covariance` must be a square matrix, got shape {covariance.shape}.")
    if not np.all(np.isfinite(covariance)):
        raise ValueError("`covariance` holds NaN or Inf values.")
    if not np.allclose(covariance, covariance.T, rtol=1e-6, atol=1e-12 * np.abs(covariance).max()):
        raise ValueError("`covariance` must be symmetric (X^T X).")
    if not damping > 0:
        raise ValueError(f"`damping` must be > 0, got {damping!r}.")
    mean_diagonal = float(np.mean(np.diag(covariance)))
    shift = damping * mean_diagonal if mean_diagonal > 0 else 1.0
    return covariance + shift * np.eye(covariance.shape[0])


def whitening_factor(covariance):
    """Upper-triangular ``R`` with ``R^T R = covariance`` (a positive definite matrix).

    Raises ValueError if the matrix is not positive definite (damp it first
    with ``damped_covariance``).
    """
    try:
        return scipy.linalg.cholesky(np.asarray(covariance, dtype=np.float64), lower=False)
    except np.linalg.LinAlgError as error:
        raise ValueError(
            "`covariance` is not positive definite; damp it with damped_covariance first."
        ) from error


def whitened_svd(matrix, factor, rank):
    """Rank-``rank`` ``W ~ E D`` minimizing ``||R (W - E D)||_F`` (SVD-LLM's truncation).

    With ``R W = U S V^T``: ``E = R^{-1} U_r S_r`` ``(in, r)`` and ``D = V_r^T``
    ``(r, out)``. ``factor`` is ``R`` (``whitening_factor``), upper triangular.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    u, s, vt = np.linalg.svd(factor @ matrix, full_matrices=False)
    encoder = scipy.linalg.solve_triangular(factor, u[:, :rank] * s[:rank], lower=False)
    return encoder, vt[:rank]


def input_norm_scores(matrix, covariance):
    """Pruning scores ``|W_ij| ||x_i||`` with ``||x_i|| = sqrt(C_ii)``."""
    norms = np.sqrt(np.maximum(np.diag(np.asarray(covariance, dtype=np.float64)), 0.0))
    return np.abs(np.asarray(matrix, dtype=np.float64)) * norms[:, None]


def weighted_relative_error(matrix, approximation, factor=None):
    """``||R (W - W_hat)||_F / ||R W||_F`` (plain relative error when ``factor`` is None)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    difference = matrix - np.asarray(approximation, dtype=np.float64)
    if factor is not None:
        matrix, difference = factor @ matrix, factor @ difference
    norm = np.linalg.norm(matrix)
    return float(np.linalg.norm(difference) / norm) if norm > 0 else 0.0
