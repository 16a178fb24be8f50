"""Tensor decompositions of kernels for the PSM paper's baselines (section 3.1).

- Tucker-2 of a Conv2D kernel on its channel modes (Kim et al., 2016,
  "Compression of deep convolutional neural networks for fast and low power
  mobile applications"), with ranks from empirical variational Bayesian
  matrix factorization (EVBMF) of the two mode unfoldings, as they do.
- Tensor-train matrices (Novikov et al., 2015, "Tensorizing neural
  networks"): a (prod i_k, prod j_k) matrix whose entry
  ``W[(i_1..i_M), (j_1..j_M)] = G_1[:, i_1, j_1, :] ... G_M[:, i_M, j_M, :]``
  is stored as M cores G_k of shape (r_{k-1}, i_k, j_k, r_k), r_0 = r_M = 1.

The decompositions themselves are tensorly's (``partial_tucker``,
``tensor_train_matrix``); EVBMF is written here from Nakajima et al.
(2013, "Global analytic solution of fully-observed variational Bayesian
matrix factorization", JMLR 14) and its noise-variance estimate from
Nakajima et al. (2015, "Condition for perfect dimensionality recovery by
variational Bayesian PCA", JMLR 16).
"""

import collections
import math

import numpy as np
import scipy.optimize
import tensorly as tl
from tensorly.decomposition import partial_tucker, tensor_train_matrix

from keras_psm.validation import check_finite_array, check_int

__all__ = [
    "EVBMF",
    "Tucker2",
    "balanced_factors",
    "dimension_factors",
    "evbmf",
    "tt_matrix",
    "tt_ranks",
    "tucker2",
    "vbmf_tucker_ranks",
]

EVBMF = collections.namedtuple("EVBMF", ["rank", "noise_variance", "threshold"])
EVBMF.__doc__ = """Result of ``evbmf``: estimated rank, noise variance sigma^2 and the
singular-value threshold above which a component is kept."""

Tucker2 = collections.namedtuple("Tucker2", ["core", "input_factor", "output_factor"])
Tucker2.__doc__ = """Tucker-2 of a (kh, kw, cin, cout) kernel:
``kernel ~ core x_3 input_factor x_4 output_factor``, i.e.
``K[a, b, c, o] = sum_{s, t} core[a, b, s, t] input_factor[c, s] output_factor[o, t]``,
core (kh, kw, r1, r2), input_factor (cin, r1), output_factor (cout, r2)."""


def _evb_tau_threshold(alpha):
    """tau_: the positive root of log(tau + 1) + alpha log(tau / alpha + 1) = tau.

    At x_ = (1 + tau_)(1 + alpha / tau_) the free energy of a kept component
    equals that of a discarded one (Nakajima et al. 2015; tau_ is sqrt(alpha)
    times their kappa; for alpha = 1 it is 2.5129).
    """
    def gap(tau):
        return math.log1p(tau) + alpha * math.log1p(tau / alpha) - tau

    return scipy.optimize.brentq(gap, 1e-12, 10.0, xtol=1e-14)


def evbmf(matrix):
    """Empirical variational Bayesian matrix factorization: the rank it keeps.

    For an (L, M) matrix with L <= M (transposed otherwise), singular values
    gamma_h and alpha = L / M, EVBMF keeps the components with
    ``gamma_h > sqrt(M sigma^2 x_)``, x_ = (1 + tau_)(1 + alpha / tau_)
    (Nakajima et al. 2013). The noise variance sigma^2 minimizes

        sum_h psi0(x_h) + sum_{h: x_h > x_} psi1(x_h),   x_h = gamma_h^2 / (M sigma^2),
        psi0(x) = x - log x,
        psi1(x) = log(tau(x) + 1) + alpha log(tau(x) / alpha + 1) - tau(x),
        tau(x) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2,

    over [sigma_low^2, sigma_high^2] (Nakajima et al. 2015):
    sigma_high^2 = sum gamma^2 / (L M) and, with H = ceil(L / (1 + alpha)) - 1,
    sigma_low^2 = max(gamma_{H+1}^2 / (M x_), sum_{h > H} gamma_h^2 / (M (L - H))).
    The objective is not convex: a log-spaced grid brackets the minimum, a
    bounded scalar search refines it.
    """
    matrix = check_finite_array(matrix, "matrix", where="evbmf")
    if matrix.ndim != 2:
        raise ValueError(f"evbmf: `matrix` must be 2-D, got shape {matrix.shape}.")
    if matrix.shape[0] > matrix.shape[1]:
        matrix = matrix.T
    n_rows, n_cols = matrix.shape
    gamma = np.linalg.svd(matrix, compute_uv=False)
    if not np.any(gamma > 0):
        return EVBMF(0, 0.0, 0.0)
    alpha = n_rows / n_cols
    tau_ = _evb_tau_threshold(alpha)
    x_ = (1 + tau_) * (1 + alpha / tau_)

    def objective(sigma2):
        x = gamma ** 2 / (n_cols * sigma2)
        kept = x[x > x_]
        tau = 0.5 * (kept - 1 - alpha + np.sqrt((kept - 1 - alpha) ** 2 - 4 * alpha))
        psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
        return np.sum(x - np.log(x)) + np.sum(psi1)

    upper = np.sum(gamma ** 2) / (n_rows * n_cols)
    h_bar = math.ceil(n_rows / (1 + alpha)) - 1
    lower = max(gamma[h_bar] ** 2 / (n_cols * x_),
                np.sum(gamma[h_bar:] ** 2) / (n_cols * (n_rows - h_bar)))
    lower = max(lower, upper * 1e-12, np.finfo(float).tiny)
    if lower >= upper:
        sigma2 = upper
    else:
        grid = np.geomspace(lower, upper, 200)
        values = [objective(s) for s in grid]
        best = int(np.argmin(values))
        bracket = (grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)])
        result = scipy.optimize.minimize_scalar(objective, bounds=bracket, method="bounded")
        sigma2 = result.x if result.fun <= values[best] else grid[best]
    threshold = math.sqrt(n_cols * sigma2 * x_)
    return EVBMF(int(np.sum(gamma > threshold)), float(sigma2), threshold)


def vbmf_tucker_ranks(kernel):
    """(r1, r2) for Tucker-2: EVBMF ranks of the cin and cout mode unfoldings.

    Kim et al. (2016) unfold the kernel along its input and its output
    channel mode and keep the rank EVBMF finds in each (at least 1).
    """
    kernel = check_finite_array(kernel, "kernel", where="vbmf_tucker_ranks")
    if kernel.ndim != 4:
        raise ValueError(
            f"vbmf_tucker_ranks: `kernel` must be (kh, kw, cin, cout), got shape {kernel.shape}."
        )
    ranks = [max(1, evbmf(tl.unfold(kernel, mode)).rank) for mode in (2, 3)]
    return tuple(ranks)


def tucker2(kernel, ranks, n_iter_max=100, tol=1e-4):
    """Tucker-2 of a Conv2D kernel on its channel modes (tensorly's HOOI).

    Returns ``Tucker2(core, input_factor, output_factor)``; the network
    applies them as a 1 x 1 convolution cin -> r1, the kh x kw convolution
    r1 -> r2 with the core, and a 1 x 1 convolution r2 -> cout.
    """
    where = "tucker2"
    kernel = check_finite_array(kernel, "kernel", where=where)
    if kernel.ndim != 4:
        raise ValueError(f"{where}: `kernel` must be (kh, kw, cin, cout), got {kernel.shape}.")
    r1 = check_int(ranks[0], "ranks[0]", minimum=1, maximum=kernel.shape[2], where=where)
    r2 = check_int(ranks[1], "ranks[1]", minimum=1, maximum=kernel.shape[3], where=where)
    (core, (input_factor, output_factor)), _ = partial_tucker(
        kernel, rank=[r1, r2], modes=[2, 3], init="svd", n_iter_max=n_iter_max, tol=tol,
    )
    return Tucker2(np.asarray(core), np.asarray(input_factor), np.asarray(output_factor))


def _prime_factors(n):
    primes, p = [], 2
    while p * p <= n:
        while n % p == 0:
            primes.append(p)
            n //= p
        p += 1
    return primes + ([n] if n > 1 else [])


def balanced_factors(n, n_factors):
    """n as a product of ``n_factors`` integers (1s allowed), as equal as greedy gets.

    Prime factors, largest first, go to the currently smallest factor;
    the result is sorted in decreasing order.
    """
    n = check_int(n, "n", minimum=1, where="balanced_factors")
    n_factors = check_int(n_factors, "n_factors", minimum=1, where="balanced_factors")
    factors = [1] * n_factors
    for prime in sorted(_prime_factors(n), reverse=True):
        factors[int(np.argmin(factors))] *= prime
    return tuple(sorted(factors, reverse=True))


def dimension_factors(n, n_factors):
    """Factors for a dimension of size n: ``balanced_factors`` of the smallest n' >= n
    whose largest factor is at most twice n'^(1 / n_factors).

    A size without such a factorization (a large prime, or 84 = 7 * 3 * 2 * 2
    for 4 factors) is padded: the layers zero-pad that dimension to n'
    (TT: 84 -> 90 = 5 * 3 * 3 * 2, 10 -> 12 = 3 * 2 * 2 * 1). Powers of two
    always qualify, so the padding is less than 2x.
    """
    n = check_int(n, "n", minimum=1, where="dimension_factors")
    n_factors = check_int(n_factors, "n_factors", minimum=1, where="dimension_factors")
    padded = n
    while True:
        factors = balanced_factors(padded, n_factors)
        if factors[0] <= 2 * padded ** (1.0 / n_factors) + 1e-9:
            return factors
        padded += 1


def tt_ranks(row_factors, col_factors, max_rank):
    """TT ranks (1, r_1, ..., r_{M-1}, 1): r_k = min(max_rank, the sizes on either side).

    The k-th unfolding of the tensorized matrix has (i_1 j_1 ... i_k j_k)
    rows and (i_{k+1} j_{k+1} ... i_M j_M) columns, which bound its rank.
    """
    modes = [int(i) * int(j) for i, j in zip(row_factors, col_factors)]
    ranks = [1]
    for k in range(1, len(modes)):
        ranks.append(min(int(max_rank), math.prod(modes[:k]), math.prod(modes[k:])))
    return tuple(ranks + [1])


def tt_matrix(matrix, row_factors, col_factors, max_rank):
    """TT-matrix cores of ``matrix`` (rows = prod ``row_factors``, cols = prod ``col_factors``).

    tensorly's TT-SVD (``tensor_train_matrix``) on the matrix reshaped to
    (i_1, ..., i_M, j_1, ..., j_M), with ranks ``tt_ranks``. Returns the
    list of M cores, core k of shape (r_{k-1}, i_k, j_k, r_k).
    """
    where = "tt_matrix"
    matrix = check_finite_array(matrix, "matrix", where=where)
    row_factors, col_factors = tuple(row_factors), tuple(col_factors)
    if len(row_factors) != len(col_factors):
        raise ValueError(
            f"{where}: `row_factors` {row_factors} and `col_factors` {col_factors} must "
            "have the same length (one pair per core)."
        )
    if matrix.shape != (math.prod(row_factors), math.prod(col_factors)):
        raise ValueError(
            f"{where}: a matrix of shape {matrix.shape} does not match row factors "
            f"{row_factors} and column factors {col_factors}; pad it first."
        )
    max_rank = check_int(max_rank, "max_rank", minimum=1, where=where)
    tensor = matrix.reshape(row_factors + col_factors)
    ranks = tt_ranks(row_factors, col_factors, max_rank)
    cores = tensor_train_matrix(tensor, rank=list(ranks)).factors
    return [np.asarray(core) for core in cores]
