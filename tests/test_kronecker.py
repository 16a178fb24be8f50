"""keras_psm.factorize.kronecker against NumPy's np.kron and the block-wise sparsity paper."""

import numpy as np
import pytest

from keras_psm.factorize.kronecker import (
    block_mask,
    block_norms,
    dense_training_flops,
    divisors,
    fewest_params_block_shape,
    grid_shape,
    kronecker_param_count,
    kronecker_rank_bound,
    kronecker_sum,
    kronecker_training_flops,
    nearest_kronecker_sum,
    pad_to_blocks,
    padded_shape,
    rearrange,
)


def random_kronecker_sum(grid, block, rank, seed=0):
    rng = np.random.default_rng(seed)
    grid_factors = rng.standard_normal((rank,) + grid)
    blocks = rng.standard_normal((rank,) + block)
    return grid_factors, blocks, sum(np.kron(c, b) for c, b in zip(grid_factors, blocks))


def test_kronecker_sum_is_numpy_kron_and_rearrangement_makes_it_rank_r():
    grid_factors, blocks, matrix = random_kronecker_sum((3, 5), (4, 2), rank=2)
    np.testing.assert_allclose(kronecker_sum(grid_factors, blocks), matrix, atol=1e-12)
    rearranged = rearrange(matrix, (4, 2))
    assert rearranged.shape == (15, 8)
    assert np.linalg.matrix_rank(rearranged) == 2
    # One term: R(C (x) B) = vec(C) vec(B)^T, row-major.
    np.testing.assert_allclose(rearrange(np.kron(grid_factors[0], blocks[0]), (4, 2)),
                               np.outer(grid_factors[0].ravel(), blocks[0].ravel()))


def test_example_1_fewest_training_parameters():
    # Paper, Example 1: m = 2^3, n = 2^8 -> m1 n1 = 32 and 128 parameters instead of 2048.
    for shape in ((8, 256), (256, 8)):
        block = fewest_params_block_shape(shape)
        grid = grid_shape(shape, block)
        assert grid[0] * grid[1] == 32 == np.sqrt(0.5 * shape[0] * shape[1])
        assert kronecker_param_count(shape, block) == 128
    assert kronecker_param_count((8, 256), (2, 32)) == 2 * 4 * 8 + 2 * 32 == 128
    assert kronecker_param_count((8, 256), (1, 1)) > 2048  # no blocks: worse than dense
    # At rank r the optimum of (r + 1) g + r mn / g is g = sqrt(r mn / (r + 1)).
    block = fewest_params_block_shape((48, 64), rank=3)
    assert np.prod(grid_shape((48, 64), block)) == np.sqrt(3 * 48 * 64 / 4) == 48


def test_table_1_training_parameters():
    # Paper, Table 1 (784 x 10 kernel, rank 2): 5.89K, 2.96k and 0.80k training parameters.
    assert kronecker_param_count((784, 10), (2, 2), rank=2) == 5888
    assert kronecker_param_count((784, 10), (4, 2), rank=2) == 2956
    assert kronecker_param_count((784, 10), (16, 2), rank=2) == 799


def test_exact_reconstruction_at_the_kronecker_rank():
    _, _, matrix = random_kronecker_sum((6, 4), (3, 5), rank=3, seed=1)
    exact = nearest_kronecker_sum(matrix, (3, 5), rank=3)
    np.testing.assert_allclose(exact.product, matrix, atol=1e-10)
    assert exact.relative_error < 1e-12
    assert np.sum(exact.singular_values > 1e-9 * exact.singular_values[0]) == 3
    truncated = nearest_kronecker_sum(matrix, (3, 5), rank=2)
    expected = exact.singular_values[2] / np.linalg.norm(exact.singular_values)
    assert truncated.relative_error == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(np.linalg.norm(matrix - truncated.product) / np.linalg.norm(matrix),
                               expected, rtol=1e-10)
    # Any matrix is exact at min(g_rows g_cols, b_rows b_cols) terms.
    dense = np.random.default_rng(2).standard_normal((12, 10))
    bound = kronecker_rank_bound(dense.shape, (3, 2))
    assert bound == min(4 * 5, 3 * 2) == 6
    assert nearest_kronecker_sum(dense, (3, 2), rank=bound).relative_error < 1e-12


def test_nearest_single_product_beats_perturbed_ones():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((8, 6))
    best = nearest_kronecker_sum(matrix, (2, 3), rank=1)
    c, b = best.grid_factors[0], best.blocks[0]
    for _ in range(20):
        other = np.kron(c + 0.05 * rng.standard_normal(c.shape),
                        b + 0.05 * rng.standard_normal(b.shape))
        assert np.linalg.norm(matrix - other) >= np.linalg.norm(matrix - best.product)


def test_block_mask_keeps_the_largest_blocks_and_masked_fit_is_block_sparse():
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((12, 8)) * np.kron(rng.uniform(0.1, 3, (6, 2)), np.ones((2, 4)))
    norms = block_norms(matrix, (2, 4))
    np.testing.assert_allclose(norms[1, 0], np.linalg.norm(matrix[2:4, 0:4]))
    mask = block_mask(matrix, (2, 4), 0.5)
    assert mask.shape == (6, 2) and mask.sum() == 6
    assert norms[mask == 1].min() >= norms[mask == 0].max()
    assert block_mask(matrix, (2, 4), 0.0).all() and not block_mask(matrix, (2, 4), 1.0).any()

    fit = nearest_kronecker_sum(matrix, (2, 4), rank=2, mask=mask)
    product = fit.product
    for p, q in zip(*np.nonzero(mask == 0)):
        assert not product[2 * p:2 * p + 2, 4 * q:4 * q + 4].any()
    # The masked fit is the nearest rank-2 sum among those with these zero blocks.
    kept = matrix * np.kron(mask, np.ones((2, 4)))
    unmasked_fit = nearest_kronecker_sum(kept, (2, 4), rank=2)
    np.testing.assert_allclose(product, unmasked_fit.product, atol=1e-10)
    assert fit.relative_error == pytest.approx(
        np.linalg.norm(matrix - product) / np.linalg.norm(matrix))


def test_padding_and_shape_errors():
    assert padded_shape((13, 7), (4, 2)) == (16, 8)
    padded = pad_to_blocks(np.ones((13, 7)), (4, 2))
    assert padded.shape == (16, 8) and padded.sum() == 13 * 7
    assert kronecker_param_count((13, 7), (4, 2), rank=1) == 2 * 16 + 8
    with pytest.raises(ValueError, match=r"block shape \(4, 2\) does not tile .*\(13, 7\)"):
        rearrange(np.ones((13, 7)), (4, 2))
    with pytest.raises(ValueError, match="`rank` must be between 1 and 6"):
        nearest_kronecker_sum(np.ones((12, 10)), (3, 2), rank=7)
    with pytest.raises(ValueError, match="`mask` must have the grid shape"):
        nearest_kronecker_sum(np.ones((12, 10)), (3, 2), rank=1, mask=np.ones((3, 3)))
    with pytest.raises(ValueError, match="`block_sparsity` must be"):
        block_mask(np.ones((4, 4)), (2, 2), 1.5)
    with pytest.raises(ValueError, match="NaN or Inf"):
        nearest_kronecker_sum(np.full((4, 4), np.nan), (2, 2), rank=1)
    assert divisors(784) == [1, 2, 4, 7, 8, 14, 16, 28, 49, 56, 98, 112, 196, 392, 784]


def test_training_flops_follow_appendix_a1():
    n_in, n_out, block, r, big_n = 784, 10, (16, 2), 2, 64
    n, m = n_in, n_out
    n2, m2 = block
    n1, m1 = n // n2, m // m2
    # Eq. 16 plus the loss (3 N m - 1), and the step costs summed in eq. 25.
    forward = (r * (big_n * m1 * m2 * (2 * n1 - 1) + m1 * n1 + big_n * n1 * m2 * (2 * n2 - 1))
               + (r - 1) * big_n * m + 3 * big_n * m - 1)
    backward = (big_n * m + r * m1 * n1 * (2 * big_n * m2 - 1) + r * m1 * n1
                + (r - 1) * m1 * n1 + r * m1 * n1 + r * big_n * m2 * n1 * (2 * m1 - 1)
                + r * m2 * n2 * (2 * big_n * n1 - 1))
    assert kronecker_training_flops(n_in, n_out, block, r, big_n) == (forward, backward)
    # Eqs. 10 and 13 for the dense layer.
    assert dense_training_flops(n, m, big_n) == (
        big_n * m * (2 * n - 1) + 3 * big_n * m - 1, big_n * m + m * n * (2 * big_n - 1))
    # The leading order of Proposition 2: 2 N r n1 m2 (n2 + m1) forward.
    big_n = 4096
    forward, _ = kronecker_training_flops(1024, 1024, (16, 16), 4, big_n)
    assert forward == pytest.approx(2 * big_n * 4 * 64 * 16 * (16 + 64), rel=0.02)
    dense = sum(dense_training_flops(1024, 1024, big_n))
    assert sum(kronecker_training_flops(1024, 1024, (16, 16), 4, big_n)) < dense / 2
    assert sum(kronecker_training_flops(1024, 1024, (16, 16), 4, big_n, blocks_first=False)) \
        < dense / 2
