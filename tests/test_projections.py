"""Projections onto sparse unit-norm matrices (keras_psm.factorize.projections)."""

import numpy as np
import pytest

from keras_psm.factorize import projections, threads
from keras_psm.factorize.projections import (
    sp,
    sp_support,
    splincol,
    splincol_blocks,
    splincol_blocks_support,
    splincol_support,
    support_projection,
    top_k_mask,
    transposed_copy,
)


@pytest.fixture
def gaussian():
    return np.random.default_rng(0).standard_normal((40, 60))


def brute_force_column_top_k(matrix, k):
    """The top-k nonzero magnitudes of every column, by full stable sorts (among equal
    magnitudes, the first ones)."""
    magnitude = np.abs(matrix)
    support = np.zeros(matrix.shape, dtype=bool)
    for column, values in enumerate(magnitude.T):
        support[np.argsort(-values, kind="stable")[:k], column] = True
    return support & (magnitude > 0)


def brute_force_splincol_support(matrix, k):
    """Union of the row-wise and column-wise top-k nonzero magnitudes, by full stable sorts."""
    return brute_force_column_top_k(matrix.T, k).T | brute_force_column_top_k(matrix, k)


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_splincol_support_is_union_of_row_and_column_top_k(gaussian, k):
    np.testing.assert_array_equal(splincol_support(gaussian, k),
                                  brute_force_splincol_support(gaussian, k))


def brute_force_block_support(matrix, k, block):
    """Blocks of ``block`` rows in one column: row-wise and column-wise top-k
    of the block energies by full sorts, expanded to their entries."""
    n_blocks = -(-matrix.shape[0] // block)
    energy = np.array([[np.sum(matrix[b * block:(b + 1) * block, j] ** 2)
                        for j in range(matrix.shape[1])] for b in range(n_blocks)])
    blocks = brute_force_splincol_support(energy, k)
    support = np.zeros(matrix.shape, dtype=bool)
    for b, j in zip(*np.nonzero(blocks)):
        support[b * block:(b + 1) * block, j] = True
    return support


@pytest.mark.parametrize("shape", [(40, 60), (42, 30)])  # 42: a last block of 2 rows
@pytest.mark.parametrize("k", [1, 3, 8])
def test_splincol_blocks_keeps_whole_blocks_of_the_top_energies(shape, k):
    matrix = np.random.default_rng(1).standard_normal(shape)
    support = splincol_blocks_support(matrix, k, block=4)
    np.testing.assert_array_equal(support, brute_force_block_support(matrix, k, 4))
    n_blocks = -(-shape[0] // 4)
    padded = np.zeros((4 * n_blocks, shape[1]), dtype=bool)
    padded[:shape[0]] = support
    blocks = padded.reshape(n_blocks, 4, shape[1])
    kept = blocks.any(axis=1)
    # Whole blocks (the short last one whole too), at least min(k, count)
    # per column and per group of 4 rows, at most the union of both.
    assert np.array_equal(blocks[:-1].all(axis=1), kept[:-1])
    assert np.all(kept.sum(axis=0) >= min(k, n_blocks))
    assert np.all(kept.sum(axis=1) >= min(k, shape[1]))
    assert kept.sum() <= k * (n_blocks + shape[1])
    projected = splincol_blocks(matrix, k, block=4)
    np.testing.assert_array_equal(projected != 0, support)
    np.testing.assert_allclose(np.linalg.norm(projected), 1.0, rtol=1e-12)
    np.testing.assert_allclose(projected[support] * np.linalg.norm(matrix[support]),
                               matrix[support], rtol=1e-12)


def test_splincol_blocks_of_one_row_is_splincol(gaussian):
    np.testing.assert_array_equal(splincol_blocks_support(gaussian, 5, block=1),
                                  splincol_support(gaussian, 5))
    with pytest.raises(ValueError, match="block"):
        splincol_blocks(gaussian, 5, block=0)


@pytest.mark.parametrize("k", [1, 5, 12])
def test_splincol_nonzeros_per_row_and_column_and_unit_norm(gaussian, k):
    projected = splincol(gaussian, k)
    nonzero = projected != 0
    assert nonzero.sum(axis=1).min() >= k
    assert nonzero.sum(axis=0).min() >= k
    assert nonzero.sum(axis=1).mean() <= 2 * k
    assert nonzero.sum(axis=0).mean() <= 2 * k
    assert np.linalg.norm(projected) == pytest.approx(1.0)
    kept = splincol_support(gaussian, k)
    np.testing.assert_array_equal(nonzero, kept)
    np.testing.assert_allclose(projected[kept], gaussian[kept] / np.linalg.norm(gaussian[kept]))


def test_splincol_keeps_exactly_k_per_line_despite_ties():
    signs = np.sign(np.random.default_rng(1).standard_normal((16, 16)))
    for axis in (0, 1):
        assert set(top_k_mask(np.abs(signs), 3, axis=axis).sum(axis=axis)) == {3}
    per_row = splincol_support(signs, 2).sum(axis=1)
    assert per_row.min() >= 2 and per_row.mean() <= 4


def test_splincol_with_k_at_least_the_size_keeps_all_nonzeros(gaussian):
    gaussian[0, 0] = 0.0
    expected = gaussian != 0
    np.testing.assert_array_equal(splincol_support(gaussian, 100), expected)


def test_sp_keeps_exactly_the_k_largest(gaussian):
    projected = sp(gaussian, 25)
    assert np.count_nonzero(projected) == 25
    threshold = np.sort(np.abs(gaussian).ravel())[-25]
    np.testing.assert_array_equal(projected != 0, np.abs(gaussian) >= threshold)
    np.testing.assert_array_equal(sp_support(gaussian, 25), projected != 0)
    assert np.linalg.norm(projected) == pytest.approx(1.0)


def test_sp_never_keeps_zeros():
    matrix = np.zeros((4, 5))
    matrix[1, 2] = -3.0
    assert np.count_nonzero(sp_support(matrix, 6)) == 1
    np.testing.assert_array_equal(sp(matrix, 6), np.where(matrix != 0, -1.0, 0.0))


def test_all_zero_matrix_projects_to_zeros():
    zeros = np.zeros((3, 4))
    assert not sp(zeros, 2).any()
    assert not splincol(zeros, 2).any()


def test_support_projection_restricts_and_normalizes(gaussian):
    support = np.random.default_rng(2).random(gaussian.shape) < 0.2
    projected = support_projection(gaussian, support)
    assert not projected[~support].any()
    np.testing.assert_allclose(projected[support],
                               gaussian[support] / np.linalg.norm(gaussian[support]))


def test_transposed_copy_matches_numpy():
    array = np.arange(37 * 21, dtype=np.float64).reshape(37, 21)
    copy = transposed_copy(array)
    assert copy.flags.c_contiguous
    np.testing.assert_array_equal(copy, array.T)
    mask = array % 3 == 0
    np.testing.assert_array_equal(transposed_copy(mask), mask.T)


@pytest.mark.parametrize("function", [splincol, splincol_support, sp, sp_support])
@pytest.mark.parametrize("k", [0, -1, 2.5, True, "3"])
def test_bad_k_raises_value_error(gaussian, function, k):
    with pytest.raises(ValueError, match="`k` must be an integer >= 1"):
        function(gaussian, k)


def test_non_2d_matrix_raises_value_error():
    with pytest.raises(ValueError, match="`matrix` must be 2-D"):
        splincol(np.ones(5), 1)


def test_support_shape_mismatch_raises_value_error(gaussian):
    with pytest.raises(ValueError, match="`support` must have the shape"):
        support_projection(gaussian, np.ones((2, 2), dtype=bool))


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("strip_entries", [7, 64, 2 ** 20])
def test_splincol_support_in_strips_over_threads_is_the_same_support(monkeypatch, dtype,
                                                                     strip_entries, in_place):
    # Strips of a few rows or columns, several threads, a float32 candidate and tied
    # magnitudes (rounded entries) must give the one-piece support exactly, whether the
    # column strips find their top-k in place or in a transposed copy.
    monkeypatch.setattr(projections, "STRIP_ENTRIES", strip_entries)
    monkeypatch.setattr(projections, "IN_PLACE_MIN_COLUMNS", 1 if in_place else 10 ** 9)
    monkeypatch.setattr(threads, "CORES", 3)
    matrix = np.round(np.random.default_rng(2).standard_normal((45, 33)), 1).astype(dtype)
    for k in (1, 4):
        np.testing.assert_array_equal(splincol_support(matrix, k),
                                      brute_force_splincol_support(matrix, k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_column_top_k_from_group_maxima_is_the_column_top_k(monkeypatch, dtype):
    # Groups of 4 rows, 3 threads, strips of a few rows; rounded entries tie across groups,
    # the largest entries of column 1 lie in the 3 rows after the last whole group, column
    # 2 has fewer than k nonzeros and column 3 none: the support must be the brute force's.
    monkeypatch.setattr(projections, "GROUPS_MIN_ENTRIES", 1)
    monkeypatch.setattr(projections, "GROUP_ROWS", 4)
    monkeypatch.setattr(projections, "STRIP_ENTRIES", 40)
    monkeypatch.setattr(threads, "CORES", 3)
    matrix = np.round(np.random.default_rng(3).standard_normal((203, 40)), 1).astype(dtype)
    matrix[-3:, 1] = [5.0, -6.0, 5.0]
    matrix[:, 2] = 0.0
    matrix[[10, 150], 2] = [1.0, -2.0]
    matrix[:, 3] = 0.0
    for k in (1, 3):
        assert projections.column_top_k_positions(matrix, k) is not None
        np.testing.assert_array_equal(splincol_support(matrix, k),
                                      brute_force_splincol_support(matrix, k))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_k_of_long_columns_from_group_maxima_is_the_column_top_k(monkeypatch, dtype):
    # Groups of 3 rows (columns of at least 3 * 8 * k rows take them); rounded entries tie,
    # the largest of column 1 lie in the 2 rows after the last whole group, column 2 has
    # fewer than k nonzeros and column 3 none.
    monkeypatch.setattr(projections, "GROUP_ROWS", 3)
    matrix = np.round(np.random.default_rng(5).standard_normal((101, 30)), 1).astype(dtype)
    matrix[-2:, 1] = [7.0, -7.0]
    matrix[:, 2] = 0.0
    matrix[[4, 90], 2] = [1.0, 2.0]
    matrix[:, 3] = 0.0
    for k in (1, 2, 4):
        np.testing.assert_array_equal(top_k_mask(np.abs(matrix), k, axis=0),
                                      brute_force_column_top_k(matrix, k))


def test_column_top_k_of_few_distinct_values_falls_back_to_strips(monkeypatch):
    # Signs tie everywhere: every group reaches the bound, so the strips are used.
    monkeypatch.setattr(projections, "GROUPS_MIN_ENTRIES", 1)
    monkeypatch.setattr(projections, "GROUP_ROWS", 4)
    signs = np.sign(np.random.default_rng(4).standard_normal((96, 5)))
    assert projections.column_top_k_positions(signs, 2) is None
    np.testing.assert_array_equal(splincol_support(signs, 2),
                                  brute_force_splincol_support(signs, 2))


def test_transposed_copy_writes_into_out(monkeypatch):
    monkeypatch.setattr(projections, "STRIP_ENTRIES", 16)  # many pieces, several threads
    monkeypatch.setattr(threads, "CORES", 3)
    matrix = np.arange(35 * 20, dtype=np.float32).reshape(35, 20)
    out = np.zeros((20, 35), dtype=np.float32)
    assert transposed_copy(matrix, out=out) is out
    np.testing.assert_array_equal(out, matrix.T)
