"""calibration_data=: fits that minimize ||X (W - W_hat)||_F from each layer's input covariance."""

import numpy as np
import pytest
import scipy
import tensorflow as tf

import keras_psm
from keras_psm.backend import keras
from keras_psm.calibration import layer_covariances
from keras_psm.factorize.calibrated import (
    DAMPING,
    damped_covariance,
    whitened_svd,
    whitening_factor,
)
from keras_psm.factorize.palm4msa import palm4msa
from keras_psm.methods import HardPruningConfig, PSMConfig, SVDConfig
from keras_psm.methods.lowrank import fit_svd
from keras_psm.methods.pruning import fit_hard_pruning
from keras_psm.methods.psm import fit_psm
from keras_psm.ops import convert_to_numpy as to_numpy


def correlated_inputs(n=2000, d=32, seed=0):
    """Correlated inputs whose features range from strong to weak."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing * np.geomspace(10.0, 0.01, d)


def product(fitted):
    if hasattr(fitted, "product"):
        return fitted.product
    return fitted.encoder @ fitted.decoder


@pytest.mark.parametrize("fit, config", [
    (fit_psm, PSMConfig(n_factors=2, sparsity=3, max_iter=200)),
    (fit_svd, SVDConfig(rank_ratio=0.25)),
    (fit_hard_pruning, HardPruningConfig(target_sparsity=0.8)),
])
def test_calibrated_fit_has_lower_error_on_the_inputs(fit, config):
    x = correlated_inputs()
    kernel = np.random.default_rng(1).standard_normal((32, 24))
    covariance = damped_covariance(x.T @ x / len(x))
    plain = product(fit(kernel, config))
    calibrated = product(fit(kernel, config, covariance))
    plain_error = np.linalg.norm(x @ (kernel - plain))
    calibrated_error = np.linalg.norm(x @ (kernel - calibrated))
    # A clear margin, not rounding: the plain fit spreads its error over all
    # input directions, the calibrated one keeps it out of the strong ones.
    assert calibrated_error < 0.8 * plain_error, (calibrated_error, plain_error)


ORDERS = ("auto", "both", "right_to_left", "left_to_right")


def test_psm_update_order_reaches_palm4msa():
    kernel = np.random.default_rng(3).standard_normal((32, 24))
    fits = {order: fit_psm(kernel, PSMConfig(n_factors=2, sparsity=3, max_iter=30,
                                             update_order=order))
            for order in ORDERS}
    for order in ORDERS:  # the same computation twice
        expected = palm4msa(kernel, 2, 3, max_iter=30, random_state=0, update_order=order)
        np.testing.assert_array_equal(fits[order].errors, expected.errors)
    # "both" keeps the order that ends lower; the power iterations' random start
    # vectors move the errors by ~1e-6 relative, far below 1e-4.
    assert fits["both"].relative_error <= min(fits[order].relative_error
                                              for order in ORDERS[2:]) + 1e-4


@pytest.mark.parametrize("order", ORDERS)
def test_calibrated_psm_takes_every_update_order(order):
    x = correlated_inputs()
    kernel = np.random.default_rng(3).standard_normal((32, 24))
    covariance = damped_covariance(x.T @ x / len(x))
    config = PSMConfig(n_factors=2, sparsity=3, max_iter=30, update_order=order)
    factor = whitening_factor(covariance)
    plain = fit_psm(kernel, config)
    calibrated = fit_psm(kernel, config, covariance)
    # The calibrated stage starts from the plain fit (and runs right to left, as
    # palm4msa does with `left`); its steps never raise the error on the inputs.
    plain_error = np.linalg.norm(factor @ (kernel - plain.product))
    calibrated_error = np.linalg.norm(factor @ (kernel - calibrated.product))
    assert calibrated_error <= plain_error * (1 + 1e-9)


@pytest.mark.parametrize("options, match", [
    (dict(update_order="r2l"), "PSMConfig: `update_order` must be one of 'auto', 'both'"),
    (dict(update_order="both", hierarchical=True),
     "`update_order` applies to plain palm4MSA; got update_order='both' with hierarchical"),
])
def test_psm_config_rejects_bad_update_orders(options, match):
    with pytest.raises(ValueError, match=match):
        PSMConfig(**options)


def test_whitened_svd_is_the_optimal_rank_r_fit_on_the_inputs():
    x = correlated_inputs(n=500, d=12)
    kernel = np.random.default_rng(2).standard_normal((12, 9))
    factor = whitening_factor(x.T @ x)
    encoder, decoder = whitened_svd(kernel, factor, 3)
    # Eckart-Young on X W: the best rank-3 approximation of the outputs.
    u, s, vt = np.linalg.svd(x @ kernel, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(x @ encoder @ decoder, best, atol=1e-8 * np.abs(best).max())


@pytest.mark.parametrize("warm", [False, True])
def test_whitened_inputs_give_plain_palm4msa(warm):
    kernel = np.random.default_rng(3).standard_normal((30, 20))
    init = palm4msa(kernel, 3, 3, max_iter=5).factors if warm else None
    # A fixed left factor runs right to left, so the plain fit takes that order too.
    plain = palm4msa(kernel, 3, 3, max_iter=50, random_state=0, update_order="right_to_left",
                     init=init)
    whitened = palm4msa(kernel, 3, 3, max_iter=50, random_state=0,
                        left=whitening_factor(damped_covariance(np.eye(30))), init=init)
    for a, b in zip(plain.supports, whitened.supports):
        np.testing.assert_array_equal(a, b)
    # R = sqrt(1 + DAMPING) I only rescales the problem; the power-iteration
    # estimates of the step size stop at a relative change of 1e-6.
    np.testing.assert_allclose(whitened.product, plain.product, atol=1e-6)
    np.testing.assert_allclose(whitened.errors, plain.errors, rtol=1e-6)


def test_calibrated_psm_starts_from_the_plain_fit():
    x = correlated_inputs()
    kernel = np.random.default_rng(7).standard_normal((32, 24))
    config = PSMConfig(n_factors=2, sparsity=3, max_iter=40)
    factor = whitening_factor(damped_covariance(x.T @ x / len(x)))
    plain = fit_psm(kernel, config)
    calibrated = fit_psm(kernel, config, factor.T @ factor)
    reference = palm4msa(kernel, 2, 3, max_iter=40, random_state=config.seed, left=factor,
                         init=plain.factors)
    np.testing.assert_allclose(calibrated.product, reference.product, atol=1e-9)
    # palm4MSA steps never raise the error: the calibrated fit is at least as
    # good on the data as the plain fit it starts from (1e-9: rounding).
    errors = [np.linalg.norm(factor @ (kernel - fit.product)) for fit in (plain, calibrated)]
    assert errors[1] <= errors[0] * (1 + 1e-9), errors


def test_left_factor_shape_is_checked():
    with pytest.raises(ValueError, match=r"`left` must be a \(6, 6\) matrix"):
        palm4msa(np.ones((6, 4)), 2, 2, left=np.eye(5))


def test_whitened_inputs_through_compress():
    # Inputs with X^T X / n = I and a bias-free layer: the calibrated fit is the
    # plain fit continued by plain right-to-left palm4MSA steps (the order palm4msa
    # takes with `left`) from its own result. The inputs are +-1 columns of a Hadamard
    # matrix: X^T X sums integers, so it is n I exactly in float32 whatever the
    # summation order of the CPU's kernels.
    n, d = 256, 16
    x = scipy.linalg.hadamard(n)[:, 1:d + 1].astype("float32")
    keras.utils.set_random_seed(4)
    inputs = keras.Input((d,))
    model = keras.Model(inputs, keras.layers.Dense(12, use_bias=False, name="fc")(inputs))
    calibrated, _ = keras_psm.compress(model, "psm", n_factors=2, sparsity=3, max_iter=50,
                                       calibration_data=x, verbose=0)
    kernel = model.get_layer("fc").get_weights()[0]
    plain = palm4msa(kernel, 2, 3, max_iter=50, random_state=0)
    continued = palm4msa(kernel, 2, 3, max_iter=50, random_state=0, init=plain.factors,
                         update_order="right_to_left")
    # The layer's float32 factors against the float64 reference (at most 1.4e-6 apart
    # over 40 kernel seeds).
    np.testing.assert_allclose(to_numpy(calibrated.get_layer("fc").kernel), continued.product,
                               atol=1e-4)


def conv_model(use_bias):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((9, 9, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=use_bias,
                            name="conv")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x))


def test_conv_covariance_is_that_of_im2col_patches():
    model = conv_model(use_bias=False)
    x = np.random.default_rng(5).random((40, 9, 9, 2)).astype("float32")
    conv = model.get_layer("conv")
    covariances, means = layer_covariances(model, {"conv": conv}, x)
    assert means == {}
    damped = covariances["conv"]
    # Undo the damping: C + s I with s = DAMPING mean(diag C).
    shift = DAMPING / (1 + DAMPING) * np.mean(np.diag(damped))
    covariance = damped - shift * np.eye(len(damped))
    kernel = conv.get_weights()[0].reshape(-1, 4).astype(np.float64)
    outputs = to_numpy(conv(x)).astype(np.float64).reshape(-1, 4)
    # W^T (X^T X / n) W = Y^T Y / n for the conv outputs Y = X W (float32 outputs).
    np.testing.assert_allclose(kernel.T @ covariance @ kernel, outputs.T @ outputs / len(outputs),
                               rtol=1e-4, atol=1e-5)


def test_bias_correction_keeps_the_mean_output():
    model = conv_model(use_bias=True)
    x = np.random.default_rng(6).random((64, 9, 9, 2)).astype("float32")
    compressed, _ = keras_psm.compress(model, "svd", rank_ratio=0.25, calibration_data=x,
                                       verbose=0)
    features = keras.Model(model.inputs, model.get_layer("fc").input)(x)
    original = to_numpy(model.get_layer("fc")(features)).mean(axis=0)
    approximated = to_numpy(compressed.get_layer("fc")(features)).mean(axis=0)
    # The corrected bias absorbs mu^T (W - W_hat) exactly; float32 outputs.
    np.testing.assert_allclose(approximated, original, atol=1e-4)


@pytest.mark.tensorflow
def test_dataset_nested_and_multi_input_data_give_the_same_covariances():
    model = conv_model(use_bias=True)
    x = np.random.default_rng(7).random((50, 9, 9, 2)).astype("float32")
    layers = {"conv": model.get_layer("conv"), "fc": model.get_layer("fc")}
    reference, _ = layer_covariances(model, layers, x)
    for data in (tf.data.Dataset.from_tensor_slices(x),
                 tf.data.Dataset.from_tensor_slices(x).batch(8), [x]):
        covariances, _ = layer_covariances(model, layers, data)
        for name in layers:
            # float32 TF activations move by ulps with the batch size (oneDNN picks kernels
            # per shape and CPU); centring cancels them into small entries, so the bound is
            # on the scale of C: measured 1e-8 max|C| (4-ulp worst case 5e-7), bound 1e-5.
            np.testing.assert_allclose(covariances[name], reference[name], rtol=1e-5,
                                       atol=1e-5 * np.abs(reference[name]).max())
    inputs = keras.Input((9, 9, 2))
    outer = keras.Model(inputs, keras.layers.Dense(3, name="head")(model(inputs)))
    nested, _ = layer_covariances(outer, layers, x)
    for name in layers:
        # As above: the nested model's float32 activations, bound on the scale of C.
        np.testing.assert_allclose(nested[name], reference[name], rtol=1e-5,
                                   atol=1e-5 * np.abs(reference[name]).max())


def two_input_model():
    a, b = keras.Input((4,), name="left"), keras.Input((3, 2), name="right")
    x = keras.layers.Concatenate()([a, keras.layers.Flatten()(b)])
    return keras.Model([a, b], keras.layers.Dense(5, name="fc")(x))


@pytest.mark.parametrize("data, message", [
    (np.zeros((10, 5, 5, 2)), r"input '.*' of model .* must have shape \(n, 9, 9, 2\)"),
    (np.zeros((10, 9, 9)), r"must have shape \(n, 9, 9, 2\), got \(10, 9, 9\)"),
    ([np.zeros((10, 9, 9, 2))] * 2, "holds 2 arrays, but the model has 1 input"),
])
def test_wrong_calibration_data(data, message):
    with pytest.raises(ValueError, match=message):
        keras_psm.compress(conv_model(True), "svd", calibration_data=data, verbose=0)


def test_wrong_calibration_data_names_the_input():
    model = two_input_model()
    good, bad = np.zeros((8, 4), "float32"), np.zeros((8, 3, 3), "float32")
    with pytest.raises(ValueError, match="input 'right'"):
        keras_psm.compress(model, "svd", calibration_data=[good, bad], verbose=0)
    with pytest.raises(ValueError, match="model has 2 inputs"):
        keras_psm.compress(model, "svd", calibration_data=good, verbose=0)
    with pytest.raises(TypeError, match="calibration_data"):
        keras_psm.compress(model, "svd", calibration_data="data.npz", verbose=0)
    covariances, _ = layer_covariances(model, {"fc": model.get_layer("fc")},
                                       {"left": good, "right": np.ones((8, 3, 2), "float32")})
    assert covariances["fc"].shape == (10, 10)


def test_methods_that_do_not_calibrate_say_so():
    x = np.zeros((8, 9, 9, 2), "float32")
    with pytest.raises(ValueError, match="'tt' does not fit to calibration data"):
        keras_psm.compress(conv_model(True), "tt", calibration_data=x, verbose=0)
    with pytest.raises(ValueError, match="hierarchical"):
        keras_psm.compress(conv_model(True), "psm", hierarchical=True, calibration_data=x,
                           verbose=0)


@pytest.mark.slow
def test_calibration_raises_accuracy_before_fine_tuning(trained_lenet, mnist_small):
    (x, _), (x_test, y_test) = mnist_small
    accuracies = []
    for data in (None, x[:256]):
        model, _ = keras_psm.compress(trained_lenet, "psm", n_factors=2, sparsity=4, max_iter=50,
                                      calibration_data=data, verbose=0)
        predictions = np.argmax(model.predict(x_test, verbose=0), axis=-1)
        accuracies.append(np.mean(predictions == y_test))
    assert accuracies[1] > accuracies[0] + 0.1, accuracies  # about 0.13 -> 0.40
