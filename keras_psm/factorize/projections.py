"""Projections onto sets of sparse, unit-norm matrices (PSM paper, A.4).

palm4MSA alternates a gradient step on one factor with a projection of that
factor onto its constraint set ``E``. Every set here is "a given sparsity
pattern, intersected with the unit Frobenius sphere"; the scale of the whole
product is carried by palm4MSA's scalar ``lambda``.

Each projection picks a support and rescales the entries it keeps:

    P(M) = M * 1[support] / ||M * 1[support]||_F          (zeros if M * 1[support] == 0)

For ``sp`` (the ``k`` largest entries) and for a fixed support this is the
exact Euclidean projection onto the set. ``splincol`` is, as in FAuST, the
union of the row-wise and column-wise top-``k`` supports: a cheap heuristic
rather than an exact projection.

Kept supports never contain an entry whose value is exactly zero, so the
support returned by ``*_support`` is always the nonzero pattern of the
projected matrix. Among equal magnitudes, the first ones (lowest index along
the row or column; in row-major order for ``sp``) are kept.
"""

import numbers

import numpy as np

from keras_psm.factorize.threads import map_on_cores

__all__ = ["sp", "sp_support", "splincol", "splincol_blocks", "splincol_blocks_support",
           "splincol_support", "support_projection"]

SMALLEST_POSITIVE = np.nextafter(0.0, 1.0)  # x >= SMALLEST_POSITIVE  <=>  x > 0

# Entries per strip of splincol_support: 4 MB of float32, a few strips fit in cache.
STRIP_ENTRIES = 2 ** 20

# Column strips of splincol_support at least this wide find their top-k in place
# (``top_k_mask(..., axis=0)``); narrower ones (those of tall matrices) as the rows of a
# transposed copy, whose mask is transposed back. The column pass over float32 Gaussian
# matrices, in place against transposed, on 2 cores: 4096 x 25088 (strips of 256
# columns) 0.63x the time, 8192 x 1024 (128) 0.75x, 4096 x 4096 (256) 0.62x, but
# 25088 x 4096 (41) 1.34x.
IN_PLACE_MIN_COLUMNS = 64

# Long columns find their top-k among the groups of GROUP_ROWS rows whose maximum reaches
# a lower bound: those of a large tall matrix (at least twice as many rows as columns,
# GROUPS_MIN_ENTRIES entries and GROUP_ROWS * 4k rows) all at once
# (``column_top_k_positions``), other columns of GROUP_ROWS * 8k rows or more strip by
# strip (``_kth_largest_of_long_columns``).
# All at once against the strips of transposed copies or in place (before their groups),
# splincol_support with K = 14, Gaussian float32 / float64, 2 cores:
# 25088 x 4096 0.55 / 0.54 the time, 8192 x 4096 0.81 / 0.75, 8192 x 1024 0.73 / 0.72,
# 4608 x 1024 0.87 / 0.77; but 4096 x 4096 1.09 / 1.05, 4096 x 25088 1.29 / 1.09, and
# 0.8 to 1.2 below 2^22 entries.
GROUP_ROWS = 32
GROUPS_MIN_ENTRIES = 2 ** 22
MAX_CANDIDATE_GROUPS = 8


def splincol(matrix, k):
    """Keep the ``k`` largest magnitudes of every row and of every column.

    The support is the union of the row-wise and the column-wise top-``k``
    supports (Le Magoarou & Gribonval 2016, the 'splincol' constraint used by
    the PSM paper, Section 3.1):

        support = top_k(|M[i, :]|) for each row i  U  top_k(|M[:, j]|) for each column j
        splincol(M, k) = M * 1[support] / ||M * 1[support]||_F

    Each row and each column keeps at least ``min(k, its length)`` nonzeros
    (when ``M`` has that many) and, since the union of two sets of ``k`` per
    line is taken, at most ``2k`` per row and per column on average.
    """
    matrix = _as_matrix(matrix)
    return _keep_unit_norm(matrix, splincol_support(matrix, k))


def splincol_support(matrix, k):
    """Boolean support of ``splincol(matrix, k)``: row-wise U column-wise top-``k``.

    A float32 matrix stays float32. The top-``k`` of the rows, then of the
    columns, are found in strips of about ``STRIP_ENTRIES`` entries, spread
    over the CPU cores: the scratch memory is a few MB per core whatever the
    size of the matrix, and each strip's lines are contiguous and stay in
    cache. The columns of a large tall matrix are instead chosen among
    candidates (``column_top_k_positions``).
    """
    matrix = _as_matrix(matrix, keep_float32=True)
    k = _check_k(k)
    n_rows, n_columns = matrix.shape
    support = np.empty(matrix.shape, dtype=bool)
    rows = max(1, STRIP_ENTRIES // n_columns)
    columns = max(1, STRIP_ENTRIES // n_rows)

    def rows_strip(start):
        strip = slice(start, start + rows)
        support[strip] = top_k_mask(np.abs(matrix[strip]), k, axis=1)

    def columns_strip(start):
        strip = slice(start, start + columns)
        if columns >= IN_PLACE_MIN_COLUMNS:
            support[:, strip] |= top_k_mask(np.abs(matrix[:, strip]), k, axis=0)
        else:
            lines = np.abs(matrix[:, strip]).T.copy()  # the columns as contiguous rows
            support[:, strip] |= top_k_mask(lines, k, axis=1).T

    map_on_cores(rows_strip, range(0, n_rows, rows))
    tall = (matrix.size >= GROUPS_MIN_ENTRIES and n_rows >= 2 * n_columns
            and n_rows >= GROUP_ROWS * 4 * k)
    positions = column_top_k_positions(matrix, k) if tall else None
    if positions is None:
        map_on_cores(columns_strip, range(0, n_columns, columns))
    else:
        support.ravel()[positions] = True
    return support


def column_top_k_positions(matrix, k):
    """Flat (row-major) positions of the ``k`` largest nonzero magnitudes of every column,
    found among few candidates.

    The rows are cut into groups of ``GROUP_ROWS``. The maxima of a column's groups are
    entries of the column, so the ``k``-th largest maximum ``b_j`` is at most the column's
    ``k``-th largest magnitude: the top ``k`` lie in the groups whose maximum is at least
    ``b_j`` (and the rows after the last whole group). Those are about ``k`` groups per
    column, so the exact top ``k`` is chosen among about ``k * GROUP_ROWS`` candidates
    instead of the whole column: one pass over the matrix (the maxima) replaces a
    transposed copy and a partition of every column. Ties keep the lowest rows, as
    ``top_k_mask`` does. None when more than ``1 / MAX_CANDIDATE_GROUPS`` of the groups
    are candidates (a matrix of few distinct values, whose ties reach the bound).
    """
    n_rows, n_columns = matrix.shape
    n_groups = n_rows // GROUP_ROWS
    grouped = n_groups * GROUP_ROWS
    maxima = np.empty((n_groups, n_columns), dtype=matrix.dtype)
    rows = GROUP_ROWS * max(1, STRIP_ENTRIES // (GROUP_ROWS * n_columns))

    def strip_maxima(start):
        stop = min(start + rows, grouped)
        magnitude = np.abs(matrix[start:stop]).reshape(-1, GROUP_ROWS, n_columns)
        np.max(magnitude, axis=1, out=maxima[start // GROUP_ROWS:stop // GROUP_ROWS])

    map_on_cores(strip_maxima, range(0, grouped, rows))
    bound = np.maximum(_kth_largest(maxima, k, axis=0), np.finfo(matrix.dtype).smallest_subnormal)

    reaching = maxima >= bound
    if MAX_CANDIDATE_GROUPS * np.count_nonzero(reaching) > reaching.size:
        return None
    groups, columns = np.nonzero(reaching)
    candidate_rows = (groups * GROUP_ROWS)[:, None] + np.arange(GROUP_ROWS)
    tail_rows, tail_columns = np.nonzero(np.abs(matrix[grouped:]) >= bound)
    candidate_rows = np.concatenate([candidate_rows.ravel(), tail_rows + grouped])
    columns = np.concatenate([np.repeat(columns, GROUP_ROWS), tail_columns])
    magnitude = np.abs(matrix[candidate_rows, columns])
    reaching = magnitude >= bound[columns]
    candidate_rows, columns, magnitude = (candidate_rows[reaching], columns[reaching],
                                          magnitude[reaching])

    # Columns with more than k candidates keep their k largest, lowest rows first.
    crowded = np.bincount(columns, minlength=n_columns)[columns] > k
    order = np.lexsort((candidate_rows[crowded], -magnitude[crowded], columns[crowded]))
    crowded_columns = columns[crowded][order]
    rank = np.arange(crowded_columns.size) - np.searchsorted(crowded_columns, crowded_columns)
    kept_rows = np.concatenate([candidate_rows[~crowded],
                                candidate_rows[crowded][order][rank < k]])
    kept_columns = np.concatenate([columns[~crowded], crowded_columns[rank < k]])
    return kept_rows * n_columns + kept_columns


def splincol_blocks(matrix, k, block=4):
    """splincol over blocks of ``block`` consecutive rows of one column.

    The (in, out) matrix is cut into blocks ``M[b*block:(b+1)*block, j]``
    (the last one shorter when ``block`` does not divide ``in``); a block's
    weight is its energy ``||block||_2^2``. The blocks kept are the splincol
    support of the (ceil(in / block), out) matrix of energies, and a kept
    block keeps its nonzero entries:

        support = splincol_support(E, k) expanded to rows,  E[b, j] = ||M[b-th block, j]||^2
        splincol_blocks(M, k) = M * 1[support] / ||M * 1[support]||_F

    So every column keeps at least ``k`` blocks and every group of
    ``block`` rows at least ``k`` blocks. With ``block=4`` the support is
    made of the 1x4 blocks along the input axis that LiteRT's sparse fully
    connected kernel runs on (``keras_psm.litert_cost``); ``block=1`` is
    ``splincol``.
    """
    matrix = _as_matrix(matrix)
    return _keep_unit_norm(matrix, splincol_blocks_support(matrix, k, block))


def splincol_blocks_support(matrix, k, block=4):
    """Boolean support of ``splincol_blocks(matrix, k, block)``."""
    matrix = _as_matrix(matrix)
    block = _check_k(block, "block")
    if block == 1:
        return splincol_support(matrix, k)
    n_rows, n_cols = matrix.shape
    n_blocks = -(-n_rows // block)
    energy = np.zeros((n_blocks * block, n_cols))
    energy[:n_rows] = np.square(matrix)
    energy = energy.reshape(n_blocks, block, n_cols).sum(axis=1)
    kept = splincol_support(energy, k)
    return np.repeat(kept, block, axis=0)[:n_rows] & (matrix != 0)


def sp(matrix, k):
    """Keep the ``k`` largest magnitudes of the whole matrix, unit Frobenius norm.

        sp(M, k) = M * 1[top_k(|M|)] / ||M * 1[top_k(|M|)]||_F

    This is magnitude ("hard") pruning: PSM with a single factor.
    """
    matrix = _as_matrix(matrix)
    return _keep_unit_norm(matrix, sp_support(matrix, k))


def sp_support(matrix, k):
    """Boolean support of ``sp(matrix, k)``: the ``k`` largest magnitudes (nonzero ones)."""
    matrix = _as_matrix(matrix)
    k = _check_k(k)
    magnitude = np.abs(matrix).reshape(1, -1)
    return top_k_mask(magnitude, k, axis=1).reshape(matrix.shape)


def support_projection(matrix, support):
    """Projection onto a fixed support: ``M * 1[support] / ||M * 1[support]||_F``.

    Used to fit factors whose sparsity pattern is chosen beforehand
    (butterfly supports, re-used palm4MSA supports).
    """
    matrix = _as_matrix(matrix)
    support = np.asarray(support)
    if support.shape != matrix.shape:
        raise ValueError(
            f"`support` must have the shape of `matrix` {matrix.shape}, got {support.shape}."
        )
    return _keep_unit_norm(matrix, support.astype(bool, copy=False))


def top_k_mask(magnitude, k, axis):
    """Boolean mask of the ``k`` largest entries of each row (``axis=1``) or column (``axis=0``).

    ``magnitude`` is a nonnegative 2-D array. Every line keeps its ``k``
    largest nonzero entries (all of them if it has fewer): those > the
    line's k-th largest value (``_kth_largest``), then as many entries equal
    to it as there is room for, first ones first.
    """
    length = magnitude.shape[axis]
    if k >= length:
        return magnitude > 0
    # A zero k-th largest value means fewer than k nonzeros: keep every nonzero. The
    # threshold keeps the array's dtype: a float64 one would convert a float32 array to
    # compare with it.
    kth_largest = _kth_largest(magnitude, k, axis)
    smallest = (np.nextafter(kth_largest.dtype.type(0), kth_largest.dtype.type(1))
                if np.issubdtype(kth_largest.dtype, np.floating) else SMALLEST_POSITIVE)
    kth_largest = np.maximum(kth_largest, smallest)
    mask = magnitude >= np.expand_dims(kth_largest, axis)
    tied = np.flatnonzero(np.count_nonzero(mask, axis=axis) > k)
    if tied.size:
        lines, mask_lines = (magnitude, mask) if axis == 1 else (magnitude.T, mask.T)
        tied_lines = lines[tied]
        threshold = kth_largest[tied, None]
        above = tied_lines > threshold
        at = tied_lines == threshold
        room = k - np.count_nonzero(above, axis=1)
        rank_among_equal = np.cumsum(at, axis=1, dtype=np.int32)
        mask_lines[tied] = above | (at & (rank_among_equal <= room[:, None]))
    return mask


def _kth_largest(magnitude, k, axis):
    """The ``k``-th largest entry of each row (``axis=1``) or column (``axis=0``) of a
    nonnegative 2-D array, ``k`` < the line length: from a partitioned (or sorted) scratch
    copy whose lines are contiguous, or, for columns of ``GROUP_ROWS * 8 * k`` entries or
    more, from their candidates (``_kth_largest_of_long_columns``)."""
    length = magnitude.shape[axis]
    if axis == 0 and length >= GROUP_ROWS * 8 * k:
        return _kth_largest_of_long_columns(magnitude, k)
    scratch = magnitude.copy() if axis == 1 else transposed_copy(magnitude)
    if 2 * np.count_nonzero(magnitude) < magnitude.size:
        scratch.sort(axis=1)  # np.partition gets several times slower on many equal zeros
    else:
        scratch.partition(length - k, axis=1)
    return scratch[:, length - k]


def _kth_largest_of_long_columns(magnitude, k):
    """The ``k``-th largest entry of each column, among the entries of the groups of
    ``GROUP_ROWS`` rows whose maximum is at least the ``k``-th largest group maximum (the
    bound of ``column_top_k_positions``) and of the rows after the last whole group.

    Each column's candidates (about ``k * GROUP_ROWS``) go in a row of a zero-padded
    array, which is partitioned: the padding is at most every candidate, so the
    ``k``-th largest is exact. splincol_support with K = 14 (float32, 2 cores) took 0.76
    the time of transposed copies and their partitions on 4096 x 25088, 0.77 on 4096 x
    4096 and 0.78 on 4608 x 512, the same support.
    """
    n_rows, n_columns = magnitude.shape
    n_groups = n_rows // GROUP_ROWS
    grouped = n_groups * GROUP_ROWS
    maxima = magnitude[:grouped].reshape(n_groups, GROUP_ROWS, n_columns).max(axis=1)
    bound = _kth_largest(maxima, k, axis=0)
    columns, groups = np.nonzero(maxima.T >= bound[:, None])  # column by column
    counts = np.bincount(columns, minlength=n_columns)
    slots = np.arange(columns.size) - np.repeat(np.cumsum(counts) - counts, counts)
    candidates = np.zeros((n_columns, counts.max(), GROUP_ROWS), dtype=magnitude.dtype)
    rows = (groups * GROUP_ROWS)[:, None] + np.arange(GROUP_ROWS)
    candidates[columns, slots] = magnitude[rows, columns[:, None]]
    candidates = np.concatenate([candidates.reshape(n_columns, -1), magnitude[grouped:].T],
                                axis=1)
    length = candidates.shape[1]
    candidates.partition(length - k, axis=1)
    return candidates[:, length - k]


def transposed_copy(array, out=None):
    """C-contiguous copy of ``array.T`` (into ``out`` when given), copied in strips of 8 rows.

    A plain ``np.ascontiguousarray(array.T)`` reads with a stride of a whole
    row, which thrashes the cache when rows are a power of two long (every
    read maps to the same cache set); a strip of rows that fills one 64-byte
    cache line per output row (8 rows of float64) is 3-5 times faster.
    """
    strip = max(1, 64 // array.itemsize)
    result = np.empty(array.shape[::-1], dtype=array.dtype) if out is None else out
    rows = max(strip, strip * (STRIP_ENTRIES // max(1, strip * array.shape[1])))

    def copy_rows(first):  # a few MB of rows, strip by strip
        for start in range(first, min(first + rows, array.shape[0]), strip):
            result[:, start:start + strip] = array[start:start + strip].T

    map_on_cores(copy_rows, range(0, array.shape[0], rows))
    return result


def _keep_unit_norm(matrix, support):
    """``matrix`` restricted to ``support``, scaled to unit Frobenius norm (or all zeros)."""
    kept = np.where(support, matrix, 0.0)
    norm = np.linalg.norm(kept)
    return kept / norm if norm > 0 else kept


def _as_matrix(matrix, keep_float32=False):
    """``matrix`` as a 2-D float64 array (float32 stays float32 with ``keep_float32``)."""
    matrix = np.asarray(matrix)
    if not (keep_float32 and matrix.dtype == np.float32):
        matrix = matrix.astype(np.float64, copy=False)
    if matrix.ndim != 2:
        raise ValueError(f"`matrix` must be 2-D, got an array of shape {matrix.shape}.")
    return matrix


def _check_k(k, name="k"):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {k!r}.")
    return int(k)
