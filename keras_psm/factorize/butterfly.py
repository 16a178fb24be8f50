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

Supports and factors are ``scipy.sparse.csr_array``s: a factor with ``2^g``
nonzeros per row takes ``O(N 2^g)`` memory, and the padded matrix is never
formed densely, so a ``(5184, 256)`` kernel (``N = 8192``, 13 factors) is
fitted in a few hundred MB instead of the 13 dense ``8192 x 8192`` arrays
(7 GB) of a dense implementation. Blocks of the padding, which are zero,
are skipped.

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

    Returns boolean ``scipy.sparse.csr_array``s (sorted indices).
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
    rows, the last its first ``out`` columns (one factor: both). Boolean
    ``scipy.sparse.csr_array``s.
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
    Classes whose block of ``matrix`` is zero get zero entries, without an SVD.

    Args:
        matrix: ``(m, n)`` array or ``scipy.sparse`` matrix.
        left_support, right_support: boolean ``(m, r)`` and ``(r, n)``,
            dense or ``scipy.sparse``.

    Returns:
        ``(X, Y)``: float64 ``scipy.sparse.csr_array``s whose stored
        entries are exactly ``left_support`` and ``right_support`` (entries
        the fit leaves at zero are stored as zeros).

    Raises:
        ValueError: if rectangles of different classes overlap (the supports
            are not of this solvable kind).
    """
    matrix = _sparse_matrix(matrix)
    left = _sparse_support(left_support).astype(np.float64).tocsc()
    right = _sparse_support(right_support).astype(np.float64)
    if left.shape[0] != matrix.shape[0] or right.shape[1] != matrix.shape[1] \
            or left.shape[1] != right.shape[0]:
        raise ValueError(
            f"supports of shapes {left.shape} and {right.shape} do not "
            f"multiply to a matrix of shape {matrix.shape}."
        )
    left.data[:] = 0.0
    right.data[:] = 0.0
    groups = _rectangle_classes(left, right)
    _check_disjoint(groups, *matrix.shape)
    row_used = np.diff(matrix.indptr) > 0
    column_used = np.bincount(matrix.indices, minlength=matrix.shape[1]) > 0
    for rows, columns, indices in groups:
        # Blocks without a nonzero row or column of the matrix (e.g. padding) stay zero.
        used = row_used[rows].any(axis=1) & column_used[columns].any(axis=1)
        rows, columns, indices = rows[used], columns[used], indices[used]
        if not rows.size:
            continue
        blocks = _entries(matrix, rows[:, :, None].astype(np.int64) * matrix.shape[1]
                          + columns[:, None, :])
        u, s, vt = np.linalg.svd(blocks, full_matrices=False)
        rank = min(s.shape[1], indices.shape[1])
        scale = np.sqrt(s[:, None, :rank])
        offsets = np.arange(rows.shape[1])[None, :, None]
        left.data[left.indptr[indices[:, None, :rank]] + offsets] = u[:, :, :rank] * scale
        offsets = np.arange(columns.shape[1])[None, None, :]
        right.data[right.indptr[indices[:, :rank, None]] + offsets] = (
            vt[:, :rank, :] * np.swapaxes(scale, 1, 2))
    return left.tocsr(), right


def fit_fixed_supports(matrix, supports):
    """Factors ``F_1 .. F_Q`` on ``supports`` with ``F_1 @ ... @ F_Q ~ matrix``.

    Le et al. (2022), hierarchical algorithm on a balanced binary tree:
    ``matrix ~ X Y`` with ``X`` on the product of the first ``ceil(Q / 2)``
    supports and ``Y`` on that of the others (``two_factor_fixed_support``),
    then the same on ``X`` and on ``Y`` until single factors remain.

    Args:
        matrix: array or ``scipy.sparse`` matrix.
        supports: boolean arrays or ``scipy.sparse`` matrices.

    Returns:
        float64 ``scipy.sparse.csr_array``s whose stored entries are exactly
        the supports.
    """
    supports = [_sparse_support(s) for s in supports]
    matrix = _sparse_matrix(matrix)
    if len(supports) == 1:
        return [_values_on(matrix, supports[0])]
    half = (len(supports) + 1) // 2
    left, right = two_factor_fixed_support(
        matrix, _boolean_product(supports[:half]), _boolean_product(supports[half:]))
    return fit_fixed_supports(left, supports[:half]) + fit_fixed_supports(right, supports[half:])


def butterfly_factorize(matrix, n_factors=None):
    """Butterfly factorization of an ``(in, out)`` matrix, as a ``Factorization``.

    The matrix is zero-padded to ``N x N`` (``N = butterfly_size``; the
    padding is stored sparsely), fitted on ``butterfly_supports(N,
    n_factors)`` by ``fit_fixed_supports``, and the first/last factors are
    cropped back to ``in`` rows / ``out`` columns. ``errors`` holds the one
    relative error ``||W - F_1 ... F_Q||_F / ||W||_F``.

    The ``factors`` are float64 ``scipy.sparse.csr_array``s whose stored
    entries (sorted, row-major) are exactly the ``supports``, boolean
    ``csr_array``s: ``factor.tocoo()`` gives the support's coordinates and
    the values there.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or not np.all(np.isfinite(matrix)):
        raise ValueError(
            f"`matrix` must be a 2-D array of finite values, got shape {matrix.shape}.")
    n_in, n_out = matrix.shape
    size = butterfly_size(matrix.shape)
    rows, columns = np.nonzero(matrix)
    padded = sps.csr_array((matrix[rows, columns], (rows, columns)), shape=(size, size))
    supports = butterfly_supports(size, n_factors)
    factors = fit_fixed_supports(padded, supports)
    factors[0], supports[0] = factors[0][:n_in], supports[0][:n_in]
    factors[-1], supports[-1] = factors[-1][:, :n_out], supports[-1][:, :n_out]
    product = factors[-1].toarray()
    for factor in reversed(factors[:-1]):
        product = factor @ product
    norm = np.linalg.norm(matrix)
    error = np.linalg.norm(matrix - product) / norm if norm > 0 else 0.0
    return Factorization(factors=factors, supports=supports, errors=np.array([error]))


def _merged_support(size, start, n_merged):
    """``I_{2^start} kron 1_{2^g x 2^g} kron I_{size / 2^(start+g)}`` as a sparse boolean."""
    block = 1 << n_merged
    outer = 1 << start
    inner = size // (outer * block)
    ones = np.ones((block, block), dtype=bool)
    support = sps.kron(sps.kron(sps.eye_array(outer, dtype=bool), ones),
                       sps.eye_array(inner, dtype=bool), format="csr")
    return _canonical(sps.csr_array(support))


def _boolean_product(supports):
    """Support of a product of matrices on ``supports`` (no cancellation assumed)."""
    product = reduce(lambda a, b: a @ b, [s.astype(np.float64) for s in supports])
    return _canonical(product.astype(bool))


def _rectangle_classes(left, right):
    """The classes of indices ``k`` with the same rectangle ``R_k x C_k``, stacked.

    ``left`` is CSC, ``right`` CSR, both with sorted indices, so ``R_k`` and
    ``C_k`` are the index slices of column / row ``k``. Classes of the same
    ``(|R|, |C|, |P|)`` come as one group ``(rows, columns, indices)`` of
    arrays ``(n, |R|)``, ``(n, |C|)`` and ``(n, |P|)``, ``indices`` increasing.
    """
    row_counts, column_counts = np.diff(left.indptr), np.diff(right.indptr)
    present = np.flatnonzero((row_counts > 0) & (column_counts > 0))
    groups = []
    for n_rows, n_columns in set(zip(row_counts[present], column_counts[present])):
        ks = present[(row_counts[present] == n_rows) & (column_counts[present] == n_columns)]
        rows = left.indices[left.indptr[ks][:, None] + np.arange(n_rows)]
        columns = right.indices[right.indptr[ks][:, None] + np.arange(n_columns)]
        _, first, inverse, sizes = np.unique(np.hstack([rows, columns]), axis=0,
                                             return_index=True, return_inverse=True,
                                             return_counts=True)
        members = ks[np.argsort(inverse.reshape(-1), kind="stable")]
        starts = np.cumsum(sizes) - sizes
        for size in np.unique(sizes):
            classes = np.flatnonzero(sizes == size)
            groups.append((rows[first[classes]], columns[first[classes]],
                           members[starts[classes][:, None] + np.arange(size)]))
    return groups


def _check_disjoint(groups, n_rows, n_columns):
    """Raise ``ValueError`` if two rectangles share an entry.

    Two rectangles overlap when they share a row and a column: for every
    row, the column sets of the rectangles holding it must be disjoint.
    Rows held by the same rectangles are checked once.
    """
    sizes = [len(rows) for rows, _, _ in groups]
    class_ids = np.concatenate([np.repeat(np.arange(size) + sum(sizes[:g]), rows.shape[1])
                                for g, (size, (rows, _, _)) in enumerate(zip(sizes, groups))])
    row_ids = np.concatenate([rows.ravel() for rows, _, _ in groups])
    column_lists = np.concatenate([columns.ravel() for _, columns, _ in groups])
    column_lengths = np.concatenate([np.full(len(columns), columns.shape[1])
                                     for _, columns, _ in groups])
    column_starts = np.cumsum(column_lengths) - column_lengths
    order = np.lexsort((class_ids, row_ids))
    class_ids = class_ids[order]
    per_row = np.bincount(row_ids, minlength=n_rows)
    row_starts = np.cumsum(per_row) - per_row
    for count in np.unique(per_row[per_row > 1]):
        lists = class_ids[row_starts[per_row == count][:, None] + np.arange(count)]
        shared = np.unique(lists, axis=0).ravel()
        lengths = column_lengths[shared]
        positions = (np.repeat(column_starts[shared] - np.cumsum(lengths) + lengths, lengths)
                     + np.arange(lengths.sum()))
        owners = np.repeat(np.repeat(np.arange(shared.size // count), count), lengths)
        keys = owners * n_columns + column_lists[positions]
        if np.unique(keys).size < keys.size:
            raise ValueError(
                "the two supports are not solvable by blockwise SVDs: the rectangles of "
                "different columns of the left support overlap (butterfly supports never do)."
            )


def _entries(matrix, keys):
    """Entries of a canonical CSR ``matrix`` at row-major flat positions ``keys`` (any shape)."""
    stored = _flat_keys(matrix)
    positions = np.minimum(np.searchsorted(stored, keys), max(stored.size - 1, 0))
    values = np.zeros(keys.shape)
    if stored.size:
        found = stored[positions] == keys
        values[found] = matrix.data[positions[found]]
    return values


def _flat_keys(matrix):
    """Row-major flat positions ``row * n_columns + column`` of a canonical CSR array."""
    rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int64), np.diff(matrix.indptr))
    return rows * matrix.shape[1] + matrix.indices


def _values_on(matrix, support):
    """A float64 CSR array with the structure of ``support`` and ``matrix``'s values there."""
    support = _canonical(sps.csr_array(support))
    values = _entries(_canonical(matrix), _flat_keys(support))
    return sps.csr_array((values, support.indices.copy(), support.indptr.copy()),
                         shape=support.shape)


def _sparse_matrix(matrix):
    """``matrix`` as a float64 CSR array with sorted indices."""
    return _canonical(sps.csr_array(matrix, dtype=np.float64))


def _sparse_support(support):
    """A boolean support as a CSR array with sorted indices and no stored False."""
    support = sps.csr_array(support, dtype=bool)
    support.eliminate_zeros()
    return _canonical(support)


def _canonical(matrix):
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


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
