"""Balanced factor scales (``keras_psm.factorize.balance``) and PSM's ``balance`` option."""

import numpy as np
import pytest

import keras_psm
from keras_psm.factorize.balance import balance_norms
from keras_psm.methods.psm import PSMConfig
from keras_psm.ops import convert_to_numpy as to_numpy

LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


def _norms(factors):
    return np.array([np.linalg.norm(np.asarray(factor)) for factor in factors])


def _sparse_factors(rng, shapes, densities, scales):
    supports = [rng.random(shape) < density for shape, density in zip(shapes, densities)]
    factors = [scale * rng.standard_normal(shape) * support
               for shape, scale, support in zip(shapes, scales, supports)]
    return factors, supports


def test_balance_norms_keep_the_product_and_give_one_norm():
    rng = np.random.default_rng(0)
    # palm4MSA's output: lambda (here 37) in S_1, the others at unit norm; unequal supports.
    factors, supports = _sparse_factors(rng, [(30, 20), (20, 20), (20, 12)], [0.5, 0.2, 0.7],
                                        [37.0, 0.05, 0.3])
    balanced = balance_norms(factors)
    # float64 NumPy on both sides: only rounding of the rescaling (a few ulps) differs.
    np.testing.assert_allclose(balanced[0] @ balanced[1] @ balanced[2],
                               factors[0] @ factors[1] @ factors[2], rtol=1e-12, atol=1e-12)
    norms = _norms(balanced)
    np.testing.assert_allclose(norms, np.prod(_norms(factors)) ** (1 / 3), rtol=1e-12)
    before = _norms(factors)
    assert before.max() / before.min() > 100  # the case is far from balanced
    for old, new, support in zip(factors, balanced, supports):
        assert np.all(np.sign(new) == np.sign(old))  # positive scales: supports and signs kept
        assert not np.any(new[~support])


def test_balance_norms_leave_a_zero_product_and_a_single_factor_alone():
    rng = np.random.default_rng(1)
    factors, _ = _sparse_factors(rng, [(6, 4), (4, 5)], [0.5, 0.5], [3.0, 1.0])
    zero = [factors[0], np.zeros((4, 5))]
    for case in (zero, factors[:1]):
        for kept, original in zip(balance_norms(case), case):
            np.testing.assert_array_equal(kept, original)


@pytest.fixture(scope="module")
def balanced_and_folded(trained_lenet):
    options = dict(n_factors=2, sparsity=3, max_iter=30, seed=0, verbose=0)
    balanced, _ = keras_psm.compress(trained_lenet, "psm", **options)  # the default
    folded, _ = keras_psm.compress(trained_lenet, "psm", balance=False, **options)
    return balanced, folded


def test_balance_rescales_the_factors_of_every_layer_without_changing_its_kernel(
        balanced_and_folded):
    balanced, folded = balanced_and_folded
    spread = []
    for name in LAYERS:
        layer, reference = balanced.get_layer(name), folded.get_layer(name)
        kernel, expected = to_numpy(layer.kernel), to_numpy(reference.kernel)
        # float32 factors multiplied in float32: rescaling moves the product by a few
        # float32 ulps of its largest entries.
        np.testing.assert_allclose(kernel, expected, rtol=1e-5,
                                   atol=1e-5 * np.abs(expected).max())
        norms = _norms([to_numpy(factor) for factor in layer.factors])
        np.testing.assert_allclose(norms, norms[0], rtol=1e-5)  # float32 storage of the values
        lambda_in_first = _norms([to_numpy(factor) for factor in reference.factors])
        spread.append(lambda_in_first.max() / lambda_in_first.min())
    assert max(spread) > 2  # palm4MSA's own scales are unequal: balancing changed them


def test_balance_must_be_a_bool():
    with pytest.raises(TypeError, match="PSMConfig.*`balance` must be True or False"):
        PSMConfig(balance="yes")
