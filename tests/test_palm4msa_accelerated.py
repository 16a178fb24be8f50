"""palm4MSA on the Keras backend's device (keras_psm.palm4msa_accelerated) against the
NumPy path."""

import numpy as np
import pytest

from keras_psm.backend import LEGACY_KERAS
from keras_psm.factorize.palm4msa import palm4msa

pytestmark = pytest.mark.skipif(LEGACY_KERAS, reason="tf_keras has no keras.ops; the "
                                "accelerated palm4MSA runs on Keras 3 backends only")


@pytest.mark.parametrize("shape, n_factors, sparsity, order", [
    ((40, 56), 2, 4, "right_to_left"), ((40, 56), 2, 4, "left_to_right"),
    ((120, 80), 3, 6, "right_to_left"), ((120, 80), 3, 6, "left_to_right"),
    ((64, 24), 3, 3, "auto"),
])
def test_matches_the_numpy_path(shape, n_factors, sparsity, order):
    from keras_psm.palm4msa_accelerated import palm4msa_on_device

    matrix = np.random.default_rng(1).standard_normal(shape)
    options = dict(max_iter=6, tol=0, random_state=0, update_order=order)
    expected = palm4msa(matrix, n_factors, sparsity, dtype="float32", **options)
    result = palm4msa_on_device(matrix, n_factors, sparsity, **options)
    # Both run in float32 (products summed in other orders): ~1e-6 relative per iteration.
    np.testing.assert_allclose(result.errors, expected.errors, rtol=1e-4)
    for factor, support, reference, reference_support in zip(
            result.factors, result.supports, expected.factors, expected.supports):
        assert factor.dtype == np.float64
        np.testing.assert_array_equal(support, reference_support)
        np.testing.assert_allclose(factor, reference, atol=1e-3 * np.abs(reference).max())
    assert result.relative_error == pytest.approx(
        np.linalg.norm(matrix - result.product) / np.linalg.norm(matrix), abs=1e-5)


def test_tol_stops_early_as_the_numpy_path():
    from keras_psm.palm4msa_accelerated import palm4msa_on_device

    matrix = np.random.default_rng(2).standard_normal((48, 64))
    expected = palm4msa(matrix, 2, 6, tol=1e-3, random_state=0, dtype="float32")
    result = palm4msa_on_device(matrix, 2, 6, tol=1e-3, random_state=0)
    assert len(result.errors) < 300
    # The last relative change is near 1e-3 on both: float32 may stop one iteration apart.
    assert abs(len(result.errors) - len(expected.errors)) <= 1
    assert result.relative_error == pytest.approx(expected.relative_error, abs=1e-3)


def test_bad_arguments_raise_value_error():
    from keras_psm.palm4msa_accelerated import palm4msa_on_device

    matrix = np.ones((8, 6))
    with pytest.raises(ValueError, match="`sparsity` must be an integer >= 1"):
        palm4msa_on_device(matrix, 2, 0)
    with pytest.raises(ValueError, match="`update_order` must be one of"):
        palm4msa_on_device(matrix, 2, 2, update_order="sideways")
    with pytest.raises(ValueError, match="non-empty 2-D"):
        palm4msa_on_device(np.ones(5), 2, 2)


def test_psm_config_device_auto_fits_on_the_device():
    from keras_psm.methods.psm import PSMConfig, fit_psm
    from keras_psm.palm4msa_accelerated import palm4msa_on_device

    kernel = np.random.default_rng(4).standard_normal((3, 3, 4, 8))
    config = PSMConfig(n_factors=2, sparsity=3, max_iter=5, device="auto")
    result = fit_psm(kernel, config)
    expected = palm4msa_on_device(kernel.reshape(36, 8), 2, 3, max_iter=5, tol=1e-6, random_state=0)
    np.testing.assert_array_equal(result.errors, expected.errors)  # same computation twice


@pytest.mark.parametrize("kwargs, match", [
    (dict(device="gpu"), "`device` must be one of 'cpu', 'auto'"),
    (dict(device="auto", block=4), "`device='auto'` fits plain palm4MSA with block=1"),
])
def test_psm_config_rejects_bad_device_options(kwargs, match):
    from keras_psm.methods.psm import PSMConfig

    with pytest.raises(ValueError, match=match):
        PSMConfig(**kwargs)
