"""method="psm-reinit" and method="psm-random" (PSM paper, Table 1)."""

import numpy as np
import pytest

import keras_psm
from keras_psm.backend import keras
from keras_psm.factorize.palm4msa import factor_shapes
from keras_psm.initializers import random_supports, sparse_factor_init
from keras_psm.methods.psm import PSMConfig
from keras_psm.methods.psm_variants import fit_psm_random, fit_psm_reinit
from keras_psm.ops import convert_to_numpy as to_numpy

OPTIONS = dict(n_factors=2, sparsity=3, max_iter=30, seed=0)
LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")


@pytest.fixture(scope="module")
def psm_and_reinit(trained_lenet):
    psm, _ = keras_psm.compress(trained_lenet, "psm", verbose=0, **OPTIONS)
    reinit, report = keras_psm.compress(trained_lenet, "psm-reinit", verbose=0, **OPTIONS)
    return psm, reinit, report


def test_reinit_keeps_palm4msa_supports_exactly(psm_and_reinit):
    psm, reinit, _ = psm_and_reinit
    for name in LAYERS:
        for psm_mask, reinit_mask in zip(psm.get_layer(name).masks, reinit.get_layer(name).masks):
            np.testing.assert_array_equal(to_numpy(psm_mask), to_numpy(reinit_mask))


def test_reinit_weights_are_fresh_sparse_he_and_xavier(psm_and_reinit, trained_lenet):
    psm, reinit, report = psm_and_reinit
    for name in LAYERS:
        layer = reinit.get_layer(name)
        supports = [to_numpy(mask) > 0 for mask in layer.masks]
        expected = sparse_factor_init(supports, np.random.default_rng(OPTIONS["seed"]))
        for factor, reference in zip(layer.factors, expected):
            np.testing.assert_allclose(to_numpy(factor), reference, rtol=1e-6, atol=1e-7)
        assert not np.allclose(to_numpy(layer.factors[0]),
                               to_numpy(psm.get_layer(name).factors[0]))
        np.testing.assert_array_equal(to_numpy(layer.bias),
                                      to_numpy(trained_lenet.get_layer(name).bias))
    # The re-initialised product no longer approximates the trained kernels.
    assert min(row.relative_error for row in report.compressed) > 0.9


def test_reinit_fit_reports_the_error_of_its_own_factors(trained_lenet):
    kernel = trained_lenet.get_layer("fc2").get_weights()[0]
    fit = fit_psm_reinit(kernel, PSMConfig(**OPTIONS))
    product = fit.factors[0] @ fit.factors[1]
    assert fit.relative_error == pytest.approx(
        np.linalg.norm(kernel - product) / np.linalg.norm(kernel))


@pytest.mark.parametrize("n_factors,sparsity,rank", [(2, 3, None), (3, 5, None), (3, 2, 7)])
def test_random_supports_have_the_requested_row_and_column_counts(n_factors, sparsity, rank):
    kernel = np.random.default_rng(0).standard_normal((40, 24))
    config = PSMConfig(n_factors=n_factors, sparsity=sparsity, rank=rank, seed=1)
    fit = fit_psm_random(kernel, config)
    assert [s.shape for s in fit.supports] == factor_shapes((40, 24), n_factors, rank)
    for support in fit.supports:
        rows, columns = support.shape
        assert support.sum(axis=1).min() >= min(sparsity, columns)
        assert support.sum(axis=0).min() >= min(sparsity, rows)
        # splincol: the union of K per row and K per column, at most 2K per line on average.
        assert support.sum() <= sparsity * (rows + columns)
    rng = np.random.default_rng(1)
    supports = random_supports(factor_shapes((40, 24), n_factors, rank), sparsity, rng)
    expected = sparse_factor_init(supports, rng)
    for factor, reference, support, reference_support in zip(
            fit.factors, expected, fit.supports, supports):
        np.testing.assert_array_equal(support, reference_support)
        np.testing.assert_array_equal(factor, reference)
        assert not np.any(factor[~support])
    # The support does not depend on the kernel's values.
    other = fit_psm_random(kernel[::-1] * 3.0, config)
    for a, b in zip(fit.supports, other.supports):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_random_variant_builds_sparse_factor_layers_that_train_and_round_trip(
        trained_lenet, mnist_small, tmp_path):
    (x, y), (x_test, y_test) = mnist_small
    psm, _ = keras_psm.compress(trained_lenet, "psm", verbose=0, **OPTIONS)
    model, report = keras_psm.compress(trained_lenet, "psm-random", verbose=0, **OPTIONS)
    assert sorted(row.name for row in report.compressed) == sorted(LAYERS)
    differs = [not np.array_equal(to_numpy(m), to_numpy(p))
               for name in LAYERS
               for m, p in zip(model.get_layer(name).masks, psm.get_layer(name).masks)]
    assert all(differs)
    masks = [to_numpy(m).copy() for name in LAYERS for m in model.get_layer(name).masks]
    model.compile(keras.optimizers.RMSprop(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    loss_before, accuracy_before = model.evaluate(x_test, y_test, verbose=0)
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    loss_after, accuracy_after = model.evaluate(x_test, y_test, verbose=0)
    assert loss_after < loss_before and accuracy_after > accuracy_before + 0.1
    after = [to_numpy(m) for name in LAYERS for m in model.get_layer(name).masks]
    for before, now in zip(masks, after):
        np.testing.assert_array_equal(before, now)
    path = str(tmp_path / "psm_random.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    # Same weights; oneDNN may pick other kernels per graph: float32 rounding, below 1e-5.
    np.testing.assert_allclose(loaded.predict(x_test[:8], verbose=0),
                               model.predict(x_test[:8], verbose=0), rtol=1e-5, atol=1e-6)


def test_variants_are_registered_with_psm_options():
    for name in ("psm-reinit", "psm-random"):
        method = keras_psm.get_method(name)
        assert method.config_class is PSMConfig
        assert set(method.presets) == {"small", "large"}
    with pytest.raises(TypeError, match="psm-random.*no option"):
        keras_psm.get_method("psm-random").make_config(target_sparsity=0.5)
