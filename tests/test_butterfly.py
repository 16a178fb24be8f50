"""Butterfly supports, the exact hierarchical butterfly fit and method="butterfly"."""

import json
import os
import subprocess
import sys
from functools import reduce
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sps
from scipy.linalg import hadamard

import keras_psm
from keras_psm.backend import keras
from keras_psm.factorize.butterfly import (
    butterfly_factorize,
    butterfly_size,
    butterfly_supports,
    fit_fixed_supports,
    padded_butterfly_supports,
    two_factor_fixed_support,
)
from keras_psm.factorize.palm4msa import palm4msa
from keras_psm.layers import SparseFactorDense
from keras_psm.ops import convert_to_numpy as to_numpy


def dense(matrices):
    """Factors or supports (``scipy.sparse`` or dense) as dense arrays."""
    return [matrix.toarray() if sps.issparse(matrix) else matrix for matrix in matrices]


def relative_error(matrix, factors):
    return np.linalg.norm(matrix - reduce(np.matmul, dense(factors))) / np.linalg.norm(matrix)


def random_butterfly(size, n_factors=None, seed=0):
    rng = np.random.default_rng(seed)
    return reduce(np.matmul, [rng.standard_normal(s.shape) * s
                              for s in dense(butterfly_supports(size, n_factors))])


def test_radix_two_supports_follow_the_definition():
    size = 16
    supports = dense(butterfly_supports(size))
    assert len(supports) == 4
    rows, columns = np.indices((size, size))
    for level, support in enumerate(supports, start=1):
        # S_l = I_{2^(l-1)} kron 1_{2x2} kron I_{N/2^l}: i, j differ at most in bit N/2^l.
        expected = np.isin(rows ^ columns, [0, size >> level])
        np.testing.assert_array_equal(support, expected)
        assert np.all(support.sum(axis=0) == 2) and np.all(support.sum(axis=1) == 2)
    full = reduce(lambda a, b: (a.astype(int) @ b.astype(int)) > 0, supports)
    assert full.all()


@pytest.mark.parametrize("n_factors,expected_per_row", [(2, [4, 4]), (3, [4, 2, 2]), (1, [16])])
def test_fewer_factors_merge_consecutive_supports(n_factors, expected_per_row):
    radix_two = dense(butterfly_supports(16))
    merged = dense(butterfly_supports(16, n_factors))
    assert [int(s.sum(axis=1)[0]) for s in merged] == expected_per_row
    groups = np.array_split(np.arange(4), n_factors)
    for support, group in zip(merged, groups):
        product = reduce(lambda a, b: (a.astype(int) @ b.astype(int)) > 0,
                         [radix_two[i] for i in group])
        np.testing.assert_array_equal(support, product)


@pytest.mark.parametrize("size", [8, 32, 64])
@pytest.mark.parametrize("n_factors", [None, 2, 3])
def test_hadamard_is_recovered_exactly(size, n_factors):
    matrix = hadamard(size).astype(float)
    fit = butterfly_factorize(matrix, n_factors)
    assert fit.relative_error < 1e-13
    assert relative_error(matrix, fit.factors) < 1e-13
    for factor, support, expected in zip(fit.factors, fit.supports,
                                         butterfly_supports(size, n_factors)):
        # Sparse factors store exactly their support, like the support itself.
        assert sps.issparse(factor) and sps.issparse(support)
        np.testing.assert_array_equal(factor.indptr, support.indptr)
        np.testing.assert_array_equal(factor.indices, support.indices)
        np.testing.assert_array_equal(support.toarray(), expected.toarray())


def test_random_butterfly_products_are_recovered_exactly():
    for n_factors in (None, 2, 4):
        matrix = random_butterfly(32, n_factors, seed=3)
        assert butterfly_factorize(matrix, n_factors).relative_error < 1e-12
    # Also a radix-2 product fitted with merged supports (a coarser model).
    assert butterfly_factorize(random_butterfly(32, seed=4), 2).relative_error < 1e-12


def test_two_factor_step_is_optimal_against_palm4msa_on_the_same_supports():
    matrix = np.random.default_rng(0).standard_normal((16, 16))
    left_support, right_support = dense(butterfly_supports(16, 2))
    left, right = dense(two_factor_fixed_support(matrix, left_support, right_support))
    assert not np.any(left[~left_support]) and not np.any(right[~right_support])
    exact = relative_error(matrix, [left, right])
    palm = palm4msa(matrix, 2, None, supports=[left_support, right_support], max_iter=300,
                    tol=0.0, random_state=0)
    assert exact <= palm.relative_error + 1e-12
    # Each 4 x 4 block rank-one approximation error adds up to the total.
    assert 0.5 < exact < 1.0


def test_overlapping_supports_are_rejected():
    # Rectangles {0, 1} x {0, 1} and {1, 2} x {1, 2} share the entry (1, 1).
    left = np.array([[1, 0], [1, 1], [0, 1]], dtype=bool)
    with pytest.raises(ValueError, match="overlap"):
        two_factor_fixed_support(np.eye(3), left, left.T)
    # Identical rectangles form one class: a rank-two fit, which is exact here.
    ones = np.ones((4, 2), dtype=bool)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((4, 2)) @ rng.standard_normal((2, 4))
    assert relative_error(matrix, two_factor_fixed_support(matrix, ones, ones.T)) < 1e-12


def test_rectangular_matrices_are_padded_and_cropped():
    assert butterfly_size((100, 20)) == 128 and butterfly_size((3, 2)) == 4
    matrix = np.random.default_rng(1).standard_normal((100, 20))
    fit = butterfly_factorize(matrix)
    shapes = [f.shape for f in fit.factors]
    assert shapes == [(100, 128)] + [(128, 128)] * 5 + [(128, 20)]
    np.testing.assert_array_equal(fit.supports[0].toarray(),
                                  butterfly_supports(128)[0].toarray()[:100])
    for support, expected in zip(fit.supports, padded_butterfly_supports((100, 20))):
        np.testing.assert_array_equal(support.toarray(), expected.toarray())
    padded = np.zeros((128, 128))
    padded[:100, :20] = matrix
    square = fit_fixed_supports(padded, dense(butterfly_supports(128)))
    # Same fit from the dense padded matrix; float64 products of 7 factors: 1e-12.
    np.testing.assert_allclose(reduce(np.matmul, dense(fit.factors)),
                               reduce(np.matmul, dense(square))[:100, :20], atol=1e-12)
    np.testing.assert_allclose(fit.product, reduce(np.matmul, dense(fit.factors)), atol=1e-12)
    assert abs(fit.relative_error - relative_error(matrix, fit.factors)) < 1e-12


# Peak memory of fitting a (5184, 256) kernel, the Dense(256) after a Flatten of
# 5184 inputs: N = 8192 and 13 radix-2 factors. In a fresh interpreter, after
# the imports, ru_maxrss (KiB on Linux) is read before and after the fit.
BIG_FIT_SCRIPT = """
import json, resource
import numpy as np
from keras_psm.factorize.butterfly import butterfly_factorize
matrix = np.random.default_rng(0).standard_normal((5184, 256))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fit = butterfly_factorize(matrix)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
error = np.linalg.norm(matrix - fit.product) / np.linalg.norm(matrix)
print(json.dumps(dict(before=before, after=after, error=error, stored=fit.relative_error,
                      shapes=[f.shape for f in fit.factors], nnz=[f.nnz for f in fit.factors])))
"""


@pytest.mark.slow
def test_fit_of_a_5184_by_256_kernel_stays_small_in_memory():
    root = Path(__file__).resolve().parents[1]
    # One BLAS thread: this measures memory, and thousands of small SVDs stall on
    # BLAS threads when the machine's other cores are busy.
    environment = dict(os.environ, PYTHONPATH=str(root), OPENBLAS_NUM_THREADS="1",
                       OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    output = subprocess.run([sys.executable, "-c", BIG_FIT_SCRIPT], cwd=root, env=environment,
                            capture_output=True, text=True, check=True).stdout
    figures = json.loads(output.strip().splitlines()[-1])
    assert figures["shapes"] == [[5184, 8192]] + [[8192, 8192]] * 11 + [[8192, 256]]
    # Two nonzeros per row of each radix-2 factor, cropped rows / columns excepted.
    assert figures["nnz"] == [2 * 5184] + [2 * 8192] * 11 + [2 * 256]
    # Measured: the fit adds under 200 MB to the peak. One dense float64 8192 x 8192
    # factor alone takes 512 MB; the 13 factors and masks of a dense fit, over 14 GB.
    growth_mib = (figures["after"] - figures["before"]) / 1024
    assert growth_mib < 512
    # The stored error is that of the returned factors (float64 rounding).
    assert figures["stored"] == pytest.approx(figures["error"], rel=1e-9)


def test_bad_sizes_and_factor_counts_are_rejected():
    with pytest.raises(ValueError, match="power of two"):
        butterfly_supports(12)
    with pytest.raises(ValueError, match="between 1 and log2"):
        butterfly_supports(16, 5)
    with pytest.raises(ValueError, match="finite"):
        butterfly_factorize(np.full((4, 4), np.nan))


def test_matches_pyfaust_butterfly():
    fact = pytest.importorskip("pyfaust.fact")
    walsh_hadamard = hadamard(8).astype(float)
    faust = fact.butterfly(walsh_hadamard, type="bbtree")
    assert np.linalg.norm(faust.toarray() - walsh_hadamard) / np.linalg.norm(walsh_hadamard) \
        < 1e-14
    assert butterfly_factorize(walsh_hadamard).relative_error < 1e-14
    for size, seed in ((16, 0), (32, 3)):
        matrix = np.random.default_rng(seed).standard_normal((size, size))
        faust = fact.butterfly(matrix, type="bbtree")
        reference = np.linalg.norm(faust.toarray() - matrix) / np.linalg.norm(matrix)
        assert butterfly_factorize(matrix).relative_error == pytest.approx(reference, rel=1e-8)


def test_butterfly_method_builds_exact_layers_on_butterfly_supports(tmp_path):
    inputs = keras.Input((16,))
    hidden = keras.layers.Dense(16, use_bias=False, name="walsh")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax", name="head")(hidden)
    model = keras.Model(inputs, outputs)
    model.get_layer("walsh").set_weights([hadamard(16).astype("float32")])
    compressed, report = keras_psm.compress(model, "butterfly", verbose=0)
    rows = {row.name: row for row in report.compressed}
    assert rows["walsh"].relative_error < 1e-6
    walsh, head = compressed.get_layer("walsh"), compressed.get_layer("head")
    assert isinstance(walsh, SparseFactorDense) and walsh.n_factors == 4
    for mask, support in zip(walsh.masks, dense(butterfly_supports(16))):
        np.testing.assert_array_equal(to_numpy(mask) > 0, support)
    assert [tuple(m.shape) for m in head.masks] == [(16, 16)] * 3 + [(16, 10)]
    assert rows["head"].params_after == sum(int(to_numpy(m).sum()) for m in head.masks) + 10
    kernel = model.get_layer("head").get_weights()[0]
    assert rows["head"].relative_error == pytest.approx(
        np.linalg.norm(kernel - to_numpy(head.kernel)) / np.linalg.norm(kernel), abs=1e-5)
    np.testing.assert_allclose(to_numpy(walsh.kernel), hadamard(16), atol=1e-5)
    x = np.random.default_rng(0).standard_normal((4, 16)).astype("float32")
    path = str(tmp_path / "butterfly.keras")
    compressed.save(path)
    # Same weights, possibly different kernels (oneDNN and the CPU's instruction set choose
    # them per graph): float32 rounding of sums of a few hundred terms, far below 1e-5.
    reloaded = keras.models.load_model(path)
    np.testing.assert_allclose(to_numpy(reloaded(x)), to_numpy(compressed(x)),
                               rtol=1e-5, atol=1e-6)


def test_butterfly_method_validates_its_options(trained_lenet):
    with pytest.raises(ValueError, match=r"layer 'fc3'.*ButterflyConfig.*n_factors.*log2\(128\)"):
        keras_psm.compress(trained_lenet, "butterfly", layers=["fc3"], n_factors=8, verbose=0)
    with pytest.raises(ValueError, match="ButterflyConfig.*n_factors"):
        keras_psm.ButterflyConfig(n_factors=0)
    _, report = keras_psm.compress(trained_lenet, "butterfly", layers=["fc2"], n_factors=2,
                                   verbose=0)
    # log2(128) = 7 radix-2 factors merged as 4 + 3: 16, then 8 nonzeros per row and column.
    assert report.compressed[0].params_after == 120 * 16 + 84 * 8 + 84
