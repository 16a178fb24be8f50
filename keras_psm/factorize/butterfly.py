"""Butterfly supports and the exact hierarchical butterfly factorization.

A butterfly matrix of size ``N = 2^L`` is a product of ``L`` factors whose
supports are fixed (Dao et al. 2019; the butterfly seed's Definitions 1-3):

    S_l = I_{2^(l-1)} kron 1_{2x2} kron I_{N / 2^l},   l = 1 .. L,

so entry ``(i, j)`` of ``S_l`` is allowed when ``i`` and ``j`` differ at most
in the bit of weight ``N / 2^l``: two nonzeros per row and column. The
product ``S_a ... S_b`` of consecutive supports is again of that form,

    I_{2^(a-1)} kron 1_{2^(b-a+1) x 2^(b-a+1)} kron I_{N / 2^b},

which gives products with fewer, denser factors. In Keras orientation the
``(in, out)`` kernel is ``F_1 @ F_2 @ ... @ F_Q`` with ``F_1`` on ``S_1``.

Fitting a matrix on such fixed supports is done with the hierarchical
algorithm of Le, Zheng, Riccietti & Gribonval (2022, "Fast learning of fast
transforms, with guarantees"): split the factors in two halves, solve the
two-factor problem ``min ||M - X Y||_F`` with ``X``, ``Y`` on the merged
supports of the halves *exactly* by truncated SVDs of independent blocks,
and recurse on ``X`` and ``Y``. A matrix that is a butterfly product (e.g. a
Walsh-Hadamard matrix) is recovered up to rounding; palm4MSA on the same
supports is not guaranteed to get there.

Rectangular or non-power-of-two ``(in, out)`` matrices are zero-padded to
``N x N`` with ``N`` the next power of two of ``max(in, out)``; the first
factor keeps its first ``in`` rows and the last factor its first ``out``
columns, so the factor shapes are ``(in, N), (N, N), ..., (N, out)``.

Pure NumPy and SciPy.
"""

import numbers
from functools import reduce

import numpy as np
import scipy.sparse as sps

from keras_psm.factorize.palm4msa import Factorization

__all__ = [
    "butterfly_factorize",
    "butterfly_size",
    "butterfly_supports",
    "fit_fixed_supports",
    "padded_butterfly_supports",
    "two_factor_fixed_support",
]


def butterfly_size(shape):
    """``N``: the smallest power of two >= every dimension of ``shape`` (and >= 2)."""
    largest = max(int(d) for d in shape)
    return max(2, 1 << (largest - 1).bit_length())


def butterfly_supports(size, n_factors=None):
    """Boolean ``(size, size)`` supports of a butterfly product, ``F_1`` first.

    With ``L = log2(size)``, ``n_factors=None`` (or ``L``) gives the ``L``
    radix-2 butterfly supports, two nonzeros per row and column. A smaller
    ``n_factors = Q`` merges consecutive supports into ``Q`` groups of
    ``ceil(L/Q)`` or ``floor(L/Q)`` factors (the larger groups first); a
    group of ``g`` factors has ``2^g`` nonzeros per row and column.
    """
    levels = _log2(size)
    n_factors = levels if n_factors is None else _check_n_factors(n_factors, levels, size)
    supports, start = [], 0
    for group in np.array_split(np.arange(levels), n_factors):
        supports.append(_merged_support(size, start, len(group)))
        start += len(group)
    return supports


def padded_butterfly_supports(shape, n_factors=None):
    """Supports for an ``(in, out)`` matrix: square butterflies of size ``N``, cropped.

    ``N = butterfly_size(shape)``; the first support keeps its first ``in``
    rows, the last its first ``out`` columns (one factor: both).
    """
    n_in, n_out = (int(d) for d in shape)
    supports = butterfly_supports(butterfly_size(shape), n_factors)
    supports[0] = supports[0][:n_in]
    supports[-1] = supports[-1][:, :n_out]
    return supports


def two_factor_fixed_support(matrix, left_support, right_support):
    """Best ``X @ Y ~ matrix`` with ``supp(X) <= left_support``, ``supp(Y) <= right_support``.

    Le et al. (2022), two-factor fixed-support problem. Column ``k`` of
    ``X`` and row ``k`` of ``Y`` can only build the rank-one block on the
    rectangle ``R_k x C_k`` (rows allowed in ``X[:, k]``, columns allowed in
    ``Y[k, :]``). Indices ``k`` with the same rectangle form a class ``P``;
    when the rectangles of different classes are disjoint (true for
    butterfly supports), the problem splits into one truncated SVD per class:

        matrix[R_P, C_P] ~ sum_{i < |P|} s_i u_i v_i^T,
        X[R_P, k_i] = sqrt(s_i) u_i,   Y[k_i, C_P] = sqrt(s_i) v_i,

    which is optimal; entries outside every rectangle cannot be reached.

    Raises:
        ValueError: if rectangles of different classes overlap (the supports
            are not of this solvable kind).
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    left_support = np.asarray(left_support, dtype=bool)
    right_support = np.asarray(right_support, dtype=bool)
    if left_support.shape[0] != matrix.shape[0] or right_support.shape[1] != matrix.shape[1] \
            or left_support.shape[1] != right_support.shape[0]:
        raise ValueError(
            f"supports of shapes {left_support.shape} and {right_support.shape} do not "
            f"multiply to a matrix of shape {matrix.shape}."
        )
    classes = {}
    for k in range(left_support.shape[1]):
        rows = np.flatnonzero(left_support[:, k])
        columns = np.flatnonzero(right_support[k])
        if rows.size and columns.size:
            key = (rows.tobytes(), columns.tobytes())
            classes.setdefault(key, (rows, columns, []))[2].append(k)
    covered = np.zeros(matrix.shape, dtype=bool)
    for rows, columns, _ in classes.values():
        if covered[np.ix_(rows, columns)].any():
            raise ValueError(
                "the two supports are not solvable by blockwise SVDs: the rectangles of "
                "different columns of the left support overlap (butterfly supports never do)."
            )
        covered[np.ix_(rows, columns)] = True
    left = np.zeros(left_support.shape)
    right = np.zeros(right_support.shape)
    for rows, columns, indices in classes.values():
        u, s, vt = np.linalg.svd(matrix[np.ix_(rows, columns)], full_matrices=False)
        for i, k in enumerate(indices[: s.size]):
            scale = np.sqrt(s[i])
            left[rows, k] = u[:, i] * scale
            right[k, columns] = vt[i] * scale
    return left, right


def fit_fixed_supports(matrix, supports):
    """Factors ``F_1 .. F_Q`` on ``supports`` with ``F_1 @ ... @ F_Q ~ matrix``.

    Le et al. (2022), hierarchical algorithm on a balanced binary tree:
    ``matrix ~ X Y`` with ``X`` on the product of the first ``ceil(Q / 2)``
    supports and ``Y`` on that of the others (``two_factor_fixed_support``),
    then the same on ``X`` and on ``Y`` until single factors remain.
    """
    supports = [np.asarray(s, dtype=bool) for s in supports]
    if len(supports) == 1:
        return [np.where(supports[0], matrix, 0.0)]
    half = (len(supports) + 1) // 2
    left, right = two_factor_fixed_support(
        matrix, _boolean_product(supports[:half]), _boolean_product(supports[half:]))
    return fit_fixed_supports(left, supports[:half]) + fit_fixed_supports(right, supports[half:])


def butterfly_factorize(matrix, n_factors=None):
    """Butterfly factorization of an ``(in, out)`` matrix, as a ``Factorization``.

    The matrix is zero-padded to ``N x N`` (``N = butterfly_size``), fitted
    on ``butterfly_supports(N, n_factors)`` by ``fit_fixed_supports``, and
    the first/last factors are cropped back to ``in`` rows / ``out`` columns.
    ``errors`` holds the one relative error ``||W - F_1 ... F_Q||_F / ||W||_F``.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or not np.all(np.isfinite(matrix)):
        raise ValueError(
            f"`matrix` must be a 2-D array of finite values, got shape {matrix.shape}.")
    n_in, n_out = matrix.shape
    size = butterfly_size(matrix.shape)
    padded = np.zeros((size, size))
    padded[:n_in, :n_out] = matrix
    supports = butterfly_supports(size, n_factors)
    factors = fit_fixed_supports(padded, supports)
    factors[0], supports[0] = factors[0][:n_in], supports[0][:n_in]
    factors[-1], supports[-1] = factors[-1][:, :n_out], supports[-1][:, :n_out]
    product = reduce(lambda a, b: a @ b, [sps.csr_matrix(f) for f in factors]).toarray()
    norm = np.linalg.norm(matrix)
    error = np.linalg.norm(matrix - product) / norm if norm > 0 else 0.0
    return Factorization(factors=factors, supports=supports, errors=np.array([error]))


def _merged_support(size, start, n_merged):
    """``I_{2^start} kron 1_{2^g x 2^g} kron I_{size / 2^(start+g)}`` as booleans."""
    block = 1 << n_merged
    outer = 1 << start
    inner = size // (outer * block)
    support = np.kron(np.kron(np.eye(outer), np.ones((block, block))), np.eye(inner))
    return support.astype(bool)


def _boolean_product(supports):
    """Support of a product of matrices on ``supports`` (no cancellation assumed)."""
    product = reduce(lambda a, b: a @ b, [sps.csr_matrix(s, dtype=np.float64) for s in supports])
    return product.toarray() > 0


def _log2(size):
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 2 \
            or size & (size - 1):
        raise ValueError(f"`size` must be a power of two >= 2, got {size!r}.")
    return int(size).bit_length() - 1


def _check_n_factors(n_factors, levels, size):
    if isinstance(n_factors, bool) or not isinstance(n_factors, numbers.Integral) \
            or not 1 <= n_factors <= levels:
        raise ValueError(
            f"`n_factors` must be an integer between 1 and log2({size}) = {levels}, "
            f"got {n_factors!r}."
        )
    return int(n_factors)
