"""palm4MSA and its hierarchical variant (keras_psm.factorize.palm4msa)."""

from functools import reduce

import numpy as np
import pytest
import scipy.sparse as sps
from scipy.linalg import hadamard

from keras_psm.factorize.palm4msa import (
    Factorization,
    factor_shapes,
    hierarchical_palm4msa,
    palm4msa,
)
from keras_psm.factorize.projections import splincol

ORDERS = ("right_to_left", "left_to_right")


@pytest.fixture
def gaussian():
    return np.random.default_rng(0).standard_normal((48, 64))


def relative_error(matrix, product):
    return np.linalg.norm(matrix - product) / np.linalg.norm(matrix)


def reference_palm4msa(matrix, n_factors, k, n_iter, order="right_to_left"):
    """Algorithm 1 of the PSM supplement (A.4), dense and literal, with exact spectral norms.

    ``order``: the factors are updated from S_Q down to S_1 (Algorithm 1), or
    from S_1 up to S_Q (FAuST's default); the factor updated first starts at zero.
    """
    shapes = factor_shapes(matrix.shape, n_factors)
    updates = list(range(n_factors))
    if order == "right_to_left":
        updates.reverse()
    factors = [np.eye(*shape) for shape in shapes]
    factors[updates[0]] = np.zeros(shapes[updates[0]])
    scale, errors = 1.0, []
    for _ in range(n_iter):
        for q in updates:
            left = reduce(np.matmul, factors[:q], np.eye(matrix.shape[0]))
            right = reduce(np.matmul, factors[q + 1:], np.eye(shapes[q][1]))
            c = 1.001 * scale ** 2 * np.linalg.norm(left, 2) ** 2 * np.linalg.norm(right, 2) ** 2
            gradient = left.T @ (scale * left @ factors[q] @ right - matrix) @ right.T
            factors[q] = splincol(factors[q] - scale / c * gradient, k)
        product = reduce(np.matmul, factors)
        scale = np.sum(matrix * product) / np.sum(product * product)
        errors.append(relative_error(matrix, scale * product))
    return [scale * factors[0]] + factors[1:], errors


@pytest.mark.parametrize("n", [5, 6, 7])
def test_hierarchical_recovers_hadamard(n):
    matrix = hadamard(2 ** n).astype(np.float64)
    result = hierarchical_palm4msa(matrix, n, 2, random_state=0)
    assert relative_error(matrix, result.product) < 1e-6
    assert result.relative_error < 1e-6
    for factor in result.factors:
        assert factor.shape == matrix.shape
        assert set(np.count_nonzero(factor, axis=0)) == {2}
        assert set(np.count_nonzero(factor, axis=1)) == {2}


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n_factors", [2, 3, 4])
def test_matches_a_literal_dense_implementation_of_algorithm_1(n_factors, order):
    matrix = np.random.default_rng(5).standard_normal((20, 28))
    expected_factors, expected_errors = reference_palm4msa(matrix, n_factors, 3, n_iter=8,
                                                           order=order)
    result = palm4msa(matrix, n_factors, 3, max_iter=8, tol=0, random_state=0,
                      update_order=order)
    # Power iteration (stopped at a 1e-6 relative change) vs exact norms: tiny differences.
    np.testing.assert_allclose(result.errors, expected_errors, rtol=1e-4)
    for factor, expected in zip(result.factors, expected_factors):
        np.testing.assert_array_equal(factor != 0, expected != 0)
        np.testing.assert_allclose(factor, expected, atol=1e-3 * np.abs(expected).max())


def planted_decaying(shape, k, seed):
    """``A diag(i^-1) B``: a product of two splincol-``k`` factors with a decaying spectrum."""
    rng = np.random.default_rng(seed)
    rank = min(shape)
    left = splincol(rng.standard_normal((shape[0], rank)), k)
    right = splincol(rng.standard_normal((rank, shape[1])), k)
    return left @ np.diag(np.arange(1.0, rank + 1) ** -1) @ right


@pytest.mark.parametrize("shape, seed", [((96, 48), 1), ((64, 128), 1)])
def test_auto_order_is_as_good_as_the_better_start(shape, seed):
    matrix = planted_decaying(shape, 3, seed)
    errors = {order: palm4msa(matrix, 2, 3, max_iter=120, tol=0, random_state=0,
                              update_order=order).relative_error
              for order in ORDERS + ("auto",)}
    # On these matrices the start decides the local minimum: the two orders end
    # 0.04-0.05 apart (left to right wins on the first, right to left on the second).
    assert abs(errors["right_to_left"] - errors["left_to_right"]) > 0.03
    # "auto" continues the order ahead after its probe; it differs from that
    # order's own run only through the power iterations' random start vectors
    # (norms to 1e-6 relative), far below 1e-4.
    assert errors["auto"] <= min(errors[order] for order in ORDERS) + 1e-4


def power_law(shape, alpha, seed):
    """``U diag(i^-alpha) V^T`` with random orthonormal ``U`` and ``V``."""
    rng = np.random.default_rng(seed)
    rank = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], rank)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], rank)))
    return (u * np.arange(1, rank + 1) ** -alpha) @ v.T


def test_both_runs_the_two_orders_to_the_end_and_keeps_the_better():
    matrix = power_law((64, 128), 2.0, 3)
    results = {order: palm4msa(matrix, 2, 3, max_iter=60, tol=0, random_state=0,
                               update_order=order)
               for order in ORDERS + ("auto", "both")}
    errors = {order: result.errors for order, result in results.items()}
    # Right to left leads after auto's 10-iteration probe (0.240 against 0.263) and ends
    # behind (0.203 against 0.155): "auto" keeps the wrong order, "both" the right one.
    assert errors["right_to_left"][9] < errors["left_to_right"][9] - 0.01
    assert errors["left_to_right"][-1] < errors["right_to_left"][-1] - 0.03
    # Each continues an order's own run; only the power iterations' random start
    # vectors differ (norms to 1e-6 relative), far below 1e-4.
    np.testing.assert_allclose(errors["auto"], errors["right_to_left"], atol=1e-4)
    np.testing.assert_allclose(errors["both"], errors["left_to_right"], atol=1e-4)
    for factor, expected in zip(results["both"].factors, results["left_to_right"].factors):
        np.testing.assert_array_equal(factor != 0, expected != 0)


@pytest.mark.parametrize("order", ORDERS + ("auto", "both"))
def test_every_order_keeps_shapes_supports_and_lambda_folding(gaussian, order):
    result = palm4msa(gaussian, 3, 4, max_iter=20, tol=0, random_state=0, update_order=order)
    assert [f.shape for f in result.factors] == [(48, 48), (48, 48), (48, 64)]
    for factor, support in zip(result.factors, result.supports):
        np.testing.assert_array_equal(factor != 0, support)
    # Unit-norm factors after the first (lambda sits in S_1); 1e-12 is float64 rounding.
    for factor in result.factors[1:]:
        assert np.linalg.norm(factor) == pytest.approx(1.0, abs=1e-12)
    # The stored error is that of the returned factors, up to float64 rounding.
    assert result.relative_error == pytest.approx(relative_error(gaussian, result.product),
                                                  rel=1e-9)


def test_fixed_supports_in_left_to_right_order(gaussian):
    supports = palm4msa(gaussian, 2, 4, max_iter=5, random_state=0).supports
    result = palm4msa(gaussian, 2, None, supports=supports, max_iter=30,
                      update_order="left_to_right")
    for factor, support in zip(result.factors, supports):
        assert not factor[~support].any()


def test_error_history_decreases(gaussian):
    result = palm4msa(gaussian, 3, 6, max_iter=60, tol=0, random_state=0)
    assert len(result.errors) == 60
    assert result.errors[-1] < 0.7 * result.errors[0]
    assert result.errors[-1] < result.errors[30]
    # splincol is not an exact projection, so a step may raise the error a little.
    assert np.mean(np.diff(result.errors) <= 0) > 0.8


def test_tol_stops_early(gaussian):
    result = palm4msa(gaussian, 2, 8, max_iter=300, tol=1e-3, random_state=0)
    assert 1 < len(result.errors) < 300
    assert abs(result.errors[-2] - result.errors[-1]) <= 1e-3 * result.errors[-2]


@pytest.mark.parametrize(
    "shape, n_factors, rank, expected",
    [
        ((48, 64), 3, None, [(48, 48), (48, 48), (48, 64)]),
        ((64, 48), 2, None, [(64, 48), (48, 48)]),
        ((48, 64), 4, 20, [(48, 20), (20, 20), (20, 20), (20, 64)]),
        ((48, 64), 1, None, [(48, 64)]),
    ],
)
def test_factor_shapes_keras_orientation(shape, n_factors, rank, expected):
    matrix = np.random.default_rng(1).standard_normal(shape)
    assert factor_shapes(shape, n_factors, rank) == expected
    result = palm4msa(matrix, n_factors, 5, rank=rank, max_iter=5, random_state=0)
    assert [factor.shape for factor in result.factors] == expected
    assert [support.shape for support in result.supports] == expected
    assert all(factor.dtype == np.float64 for factor in result.factors)


def test_hierarchical_factor_shapes_rectangular(gaussian):
    result = hierarchical_palm4msa(gaussian, 3, 6, rank=32, max_iter=20, random_state=0)
    assert [f.shape for f in result.factors] == [(48, 32), (32, 32), (32, 64)]
    assert result.relative_error < 1.0


def test_lambda_is_folded_and_relative_error_matches(gaussian):
    result = palm4msa(gaussian, 3, 6, max_iter=30, random_state=0)
    product = result.factors[0] @ result.factors[1] @ result.factors[2]
    np.testing.assert_allclose(result.product, product, atol=1e-12)
    assert result.relative_error == pytest.approx(relative_error(gaussian, product), rel=1e-9)
    assert result.relative_error == pytest.approx(result.errors[-1])
    # The unit-norm convention applies inside the algorithm only: the scale
    # lives in the first factor, the others have unit Frobenius norm.
    assert np.linalg.norm(result.factors[0]) != pytest.approx(1.0)
    for factor in result.factors[1:]:
        assert np.linalg.norm(factor) == pytest.approx(1.0)


def test_supports_are_nonzero_patterns_and_satisfy_splincol(gaussian):
    k = 5
    result = palm4msa(gaussian, 3, k, max_iter=20, random_state=0)
    for factor, support in zip(result.factors, result.supports):
        assert support.dtype == bool
        np.testing.assert_array_equal(support, factor != 0)
        assert support.sum(axis=1).min() >= k and support.sum(axis=0).min() >= k
        assert support.sum(axis=1).mean() <= 2 * k


def test_per_factor_sparsity(gaussian):
    sparsity = [2, 4, 8]
    result = palm4msa(gaussian, 3, sparsity, max_iter=10, random_state=0)
    for k, support in zip(sparsity, result.supports):
        assert support.sum(axis=1).min() >= k and support.sum(axis=0).min() >= k
        assert support.sum(axis=1).mean() <= 2 * k
    counts = [support.sum() for support in result.supports]
    assert counts[0] < counts[1] < counts[2]


def test_fixed_supports_are_respected(gaussian):
    rng = np.random.default_rng(3)
    shapes = factor_shapes(gaussian.shape, 3)
    supports = [rng.random(shape) < 0.3 for shape in shapes]
    result = palm4msa(gaussian, 3, None, supports=supports, max_iter=40, random_state=0)
    for factor, support, given in zip(result.factors, result.supports, supports):
        assert not factor[~given].any()
        np.testing.assert_array_equal(support, given)
    assert result.errors[-1] < result.errors[0]


def test_single_factor_is_the_scaled_projection(gaussian):
    result = palm4msa(gaussian, 1, 4)
    projected = splincol(gaussian, 4)
    scale = np.sum(projected * gaussian)
    np.testing.assert_allclose(result.factors[0], scale * projected)
    assert result.relative_error == pytest.approx(relative_error(gaussian, scale * projected))


def test_zero_matrix_gives_zero_factors():
    result = palm4msa(np.zeros((6, 8)), 2, 2)
    assert all(not factor.any() for factor in result.factors)
    assert result.relative_error == 0.0


def test_more_factors_or_sparsity_fit_better(gaussian):
    sparse = palm4msa(gaussian, 2, 4, max_iter=100, random_state=0).relative_error
    denser = palm4msa(gaussian, 2, 16, max_iter=100, random_state=0).relative_error
    assert denser < sparse


def test_random_state_makes_results_reproducible(gaussian):
    first = palm4msa(gaussian, 3, 5, max_iter=15, random_state=7)
    second = palm4msa(gaussian, 3, 5, max_iter=15, random_state=7)
    for a, b in zip(first.factors, second.factors):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.errors, second.errors)
    third, fourth = (
        hierarchical_palm4msa(gaussian, 3, 5, max_iter=10, random_state=np.random.default_rng(7))
        for _ in range(2)
    )
    np.testing.assert_array_equal(third.product, fourth.product)


def test_returns_factorization_dataclass(gaussian):
    result = palm4msa(gaussian, 2, 4, max_iter=3)
    assert isinstance(result, Factorization)
    assert result.errors.dtype == np.float64 and result.errors.ndim == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_factors": 0}, "`n_factors` must be an integer >= 1"),
        ({"n_factors": 2.0}, "`n_factors` must be an integer >= 1"),
        ({"sparsity": 0}, "`sparsity` must be an integer >= 1"),
        ({"sparsity": [3, 3]}, r"`sparsity` must be an integer >= 1 or a sequence of 3"),
        ({"sparsity": "4"}, "`sparsity`"),
        ({"rank": 0}, "`rank` must be an integer >= 1"),
        ({"max_iter": 0}, "`max_iter` must be an integer >= 1"),
        ({"tol": -1e-3}, "`tol` must be a number >= 0"),
        ({"tol": float("nan")}, "`tol` must be a number >= 0"),
        ({"update_order": "r2l"},
         "`update_order` must be one of 'auto', 'both', 'right_to_left', 'left_to_right'"),
        ({"supports": [np.ones((48, 48), bool)]}, "`supports` must be a list of 3"),
        ({"supports": [np.ones((48, 48), bool)] * 3},
         r"`supports\[2\]` must have shape \(48, 64\)"),
        ({"supports": [np.ones((48, 48), bool), np.zeros((48, 48), bool),
                       np.ones((48, 64), bool)]}, r"`supports\[1\]` must have at least one True"),
        ({"init": [np.ones((48, 48))] * 2}, "`init` must be a list of 3"),
        ({"init": [np.ones((48, 48))] * 3}, r"`init\[2\]` must have shape \(48, 64\)"),
        ({"init": [np.ones((48, 48)), np.zeros((48, 48)), np.ones((48, 64))]},
         r"`init\[1\]` must hold finite values, not all zero"),
    ],
)
def test_bad_arguments_raise_value_error(gaussian, kwargs, match):
    arguments = {"matrix": gaussian, "n_factors": 3, "sparsity": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        palm4msa(**arguments)


@pytest.mark.parametrize(
    "matrix, match",
    [
        (np.ones(5), "`matrix` must be a non-empty 2-D array"),
        (np.ones((0, 4)), "`matrix` must be a non-empty 2-D array"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), "`matrix` holds NaN or Inf"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), "`matrix` holds NaN or Inf"),
    ],
)
@pytest.mark.parametrize("function", [palm4msa, hierarchical_palm4msa])
def test_bad_matrix_raises_value_error(function, matrix, match):
    with pytest.raises(ValueError, match=match):
        function(matrix, 2, 2)


@pytest.mark.parametrize("order", ["right_to_left", "left_to_right"])
def test_init_is_tried_besides_faust_start(gaussian, order):
    first = palm4msa(gaussian, 3, 4, max_iter=20, tol=0, update_order=order)
    continued = palm4msa(gaussian, 3, 4, max_iter=20, tol=0, update_order=order,
                         init=first.factors)
    # palm4MSA's projected steps with step size 1 / (1.001 L) never raise the
    # error; 1e-9 allows for rounding.
    assert continued.errors[0] <= first.errors[-1] * (1 + 1e-9)
    assert continued.errors[-1] < first.errors[-1]
    np.testing.assert_allclose(np.linalg.norm(gaussian - continued.product)
                               / np.linalg.norm(gaussian), continued.errors[-1], rtol=1e-9)


def test_init_only_continues_from_init_alone(gaussian):
    # a start fitted to another matrix: FAuST's start is ahead of it after the probe
    other = np.random.default_rng(9).standard_normal(gaussian.shape)
    start = palm4msa(other, 3, 4, max_iter=5, update_order="right_to_left").factors
    options = dict(max_iter=12, tol=0, update_order="right_to_left")
    alone = palm4msa(gaussian, 3, 4, init=start, init_only=True, **options)
    tried = palm4msa(gaussian, 3, 4, init=start, **options)
    faust = palm4msa(gaussian, 3, 4, **options)
    # one run from `start`: palm4MSA's steps never raise the error (1e-9: rounding)
    assert np.all(np.diff(alone.errors) <= 1e-9 * alone.errors[:-1])
    # without init_only the better start (FAuST's) continued; 1e-6 allows for the power
    # iterations' different start vectors
    np.testing.assert_allclose(tried.errors, faust.errors, rtol=1e-6)
    assert alone.errors[-1] > faust.errors[-1] + 0.05


def test_init_only_needs_init(gaussian):
    with pytest.raises(ValueError, match="`init_only=True` needs `init`"):
        palm4msa(gaussian, 2, 4, init_only=True)
    with pytest.raises(TypeError, match="`init_only` must be True or False"):
        palm4msa(gaussian, 2, 4, init=[np.eye(48), np.ones((48, 64))], init_only=1)


def test_rank_with_one_factor_raises_value_error(gaussian):
    with pytest.raises(ValueError, match="`rank` must be None when `n_factors` is 1"):
        palm4msa(gaussian, 1, 4, rank=8)


def test_bad_residual_sparsity_raises_value_error(gaussian):
    with pytest.raises(ValueError, match=r"`residual_sparsity` must be None, an integer >= 1 or a "
                                         r"sequence of 2 \(n_factors - 2\)"):
        hierarchical_palm4msa(gaussian, 4, 3, residual_sparsity=[8])
    with pytest.raises(ValueError, match="`residual_sparsity` must be an integer >= 1"):
        hierarchical_palm4msa(gaussian, 4, 3, residual_sparsity=0)


@pytest.mark.parametrize("left_chain", [False, True])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n_factors", [2, 3, 4])
def test_gram_form_gives_the_residual_forms_factors_and_errors(monkeypatch, n_factors, order,
                                                              left_chain):
    from keras_psm.factorize import palm4msa as module
    from keras_psm.factorize import palm4msa_gram, threads

    # Blocks and panels of a few rows and columns, as a large matrix has them: W^T in
    # blocks of 2 rows of W, dense matrices in column panels of 3 (on the calling thread:
    # tests/test_threads.py checks the threads).
    monkeypatch.setattr(palm4msa_gram, "BLOCK_ENTRIES", 60)
    monkeypatch.setattr(threads, "CORES", 1)
    monkeypatch.setattr(threads, "PANELS_MIN_BYTES", 0)
    monkeypatch.setattr(threads, "PANEL_BYTES", 0)
    monkeypatch.setattr(threads, "PANEL_MIN_COLUMNS", 3)
    # L^T L applied as the chain L^T (L .) or as the dense Gram matrix.
    monkeypatch.setattr(module, "_chain_is_cheaper", lambda *args: left_chain)
    # Wide (20 x 28): right to left takes the data terms from R W^T, left to right
    # (on W^T, tall) from L^T W.
    matrix = np.random.default_rng(5).standard_normal((20, 28))
    results = {}
    for gram_form in (False, True):
        monkeypatch.setattr(module, "_uses_gram_form", lambda *args, chosen=gram_form: chosen)
        results[gram_form] = palm4msa(matrix, n_factors, 3, max_iter=20, tol=0,
                                      random_state=0, update_order=order, dtype="float64")
    residual_form, gram_form = results[False], results[True]
    # Same float64 operations summed in another order: rounding-level differences only.
    np.testing.assert_allclose(gram_form.errors, residual_form.errors, rtol=1e-10)
    for factor, expected in zip(gram_form.factors, residual_form.factors):
        np.testing.assert_array_equal(factor != 0, expected != 0)
        np.testing.assert_allclose(factor, expected, atol=1e-10 * np.abs(expected).max())


def test_tall_matrices_take_the_gram_form_and_small_square_ones_the_residual_form():
    from keras_psm.factorize.palm4msa import _uses_gram_form

    fc6 = factor_shapes((25088, 4096), 3)
    assert all(_uses_gram_form((25088, 4096), shape, q, 3) for q, shape in enumerate(fc6))
    # Left to right runs on W^T: the data term of its last factor (4096 x 25088, no
    # right chain) is L^T W itself, counted once.
    fc6_transposed = [(columns, rows) for rows, columns in reversed(fc6)]
    assert all(_uses_gram_form((4096, 25088), shape, q, 3)
               for q, shape in enumerate(fc6_transposed))
    tall = factor_shapes((8192, 1024), 3)  # the memory test's matrix: 2^23 entries
    assert all(_uses_gram_form((8192, 1024), shape, q, 3) for q, shape in enumerate(tall))
    # The residual form is as fast or faster below 2^23 entries, ResNet50's kernels included.
    for small, n_factors in [((256, 256), 2), ((784, 256), 2), ((4608, 512), 3)]:
        shapes = factor_shapes(small, n_factors)
        assert not any(_uses_gram_form(small, shape, q, n_factors)
                       for q, shape in enumerate(shapes))


def test_gram_matrix_is_applied_as_the_chain_only_where_it_needs_far_fewer_multiply_adds():
    from keras_psm.factorize.palm4msa import _chain_is_cheaper

    def splincol_like(rows, columns, k):  # splincol K keeps about K entries per row
        indptr = np.arange(0, rows * k + 1, k)
        return sps.csr_matrix((np.ones(rows * k), np.arange(rows * k) % columns, indptr),
                              shape=(rows, columns))

    # fc6's left factors at K = 14: the chain was 0.67x (25,088 rows) and 0.09x (4,096
    # rows) the time of the 4096^3 GEMM; at K = 28 the 25,088-row chain was 1.17x.
    assert _chain_is_cheaper([splincol_like(25088, 4096, 14)], 4096)
    assert _chain_is_cheaper([splincol_like(4096, 4096, 28)], 4096)
    assert not _chain_is_cheaper([splincol_like(25088, 4096, 28)], 4096)


@pytest.mark.parametrize("order", ORDERS)
def test_float32_error_stays_close_to_float64(order):
    rng = np.random.default_rng(3)
    left, _ = np.linalg.qr(rng.standard_normal((300, 200)))
    right, _ = np.linalg.qr(rng.standard_normal((200, 200)))
    matrix = (left * np.arange(1.0, 201) ** -0.7) @ right.T  # trained-layer-like spectrum
    errors = {dtype: palm4msa(matrix, 3, 6, max_iter=40, tol=0, random_state=0,
                              update_order=order, dtype=dtype).relative_error
              for dtype in ("float32", "float64")}
    # float32 rounding may flip near-tied support entries; the bound is 0.005.
    assert abs(errors["float32"] - errors["float64"]) < 0.005


def test_default_precision_is_float32_from_the_threshold_on(monkeypatch, gaussian):
    from keras_psm.factorize import palm4msa as module

    runs = {dtype: palm4msa(gaussian, 3, 6, max_iter=5, tol=0, random_state=0,
                            dtype=dtype).errors for dtype in ("float32", "float64")}
    for threshold, expected in [(gaussian.size, "float32"), (gaussian.size + 1, "float64")]:
        monkeypatch.setattr(module, "FLOAT32_ENTRIES", threshold)
        errors = palm4msa(gaussian, 3, 6, max_iter=5, tol=0, random_state=0).errors
        np.testing.assert_array_equal(errors, runs[expected])


def test_float32_result_is_float64_and_reports_its_own_error(gaussian):
    result = palm4msa(gaussian, 3, 6, max_iter=20, random_state=0, dtype="float32")
    assert all(factor.dtype == np.float64 for factor in result.factors)
    # The trace formula in float32 products: agrees with the product's error to ~1e-5.
    assert result.relative_error == pytest.approx(relative_error(gaussian, result.product),
                                                  abs=1e-4)


def test_bad_dtype_raises_value_error(gaussian):
    with pytest.raises(ValueError, match="`dtype` must be None, 'float32' or 'float64'"):
        palm4msa(gaussian, 2, 4, dtype="float16")


def test_verbose_shows_iterations_and_error(gaussian, capsys):
    palm4msa(gaussian, 2, 4, max_iter=12, tol=0, random_state=0, verbose=True)
    shown = capsys.readouterr().err
    assert "palm4MSA (48, 64)" in shown and "/14 " in shown  # 2 probes of 2 + 10 iterations
    assert palm4msa(gaussian, 2, 4, max_iter=12, tol=0, random_state=0).errors.size == 12
    assert capsys.readouterr().err == ""
