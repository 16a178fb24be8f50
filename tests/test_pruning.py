"""Magnitude pruning: tfmot wrappers (tf_keras) and the native masked-layer version (both)."""

import os
import sys

import numpy as np
import pytest

import keras_psm
from keras_psm.backend import LEGACY_KERAS, keras
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
from keras_psm.ops import convert_to_numpy as to_numpy
from keras_psm.pruning import (
    IterativePruning,
    hard_pruning,
    is_pruning_step,
    iterative_pruning,
    kept_count,
    masked_factors,
    polynomial_sparsity,
    strip,
    top_k_mask,
)

legacy_only = pytest.mark.skipif(not LEGACY_KERAS, reason="tfmot needs TF_USE_LEGACY_KERAS=1")
keras3_only = pytest.mark.skipif(LEGACY_KERAS, reason="checks the error raised under Keras 3")

KERNEL_LAYERS = ("conv1", "conv2", "fc1", "fc2", "fc3")
# 1,000 digits in batches of 64: 16 steps per epoch; masks updated at steps 5..20.
SCHEDULE = dict(begin_step=0, end_step=20, frequency=5)
TARGET = 0.75


def kernel_counts(model):
    """Nonzero entries of each layer's effective kernel."""
    return {name: int(np.count_nonzero(to_numpy(model.get_layer(name).kernel)))
            for name in KERNEL_LAYERS}


def expected_counts(model, sparsity):
    return {name: kept_count(int(np.prod(model.get_layer(name).kernel.shape)), sparsity)
            for name in KERNEL_LAYERS}


def support_of(factor):
    """The dense 0/1 support of a ``masked_factors`` entry (pruned entries removed)."""
    return to_numpy(factor.layer.masks[factor.index])


def fine_tune(model, data, callbacks, epochs=2):
    (x, y), (x_test, y_test) = data
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    keras.utils.set_random_seed(0)
    model.fit(x, y, epochs=epochs, batch_size=64, callbacks=callbacks, verbose=0)
    return model.evaluate(x_test, y_test, verbose=0)[1]


def test_kept_count_rounds_like_tfmot_and_top_k_respects_the_support():
    assert kept_count(10, 0.25) == 8          # 7.5 rounds half to even
    assert kept_count(10, 0.35) == 6          # 6.5 rounds half to even
    assert kept_count(5, 0.99) == 1           # never below one
    assert kept_count(150, 0.0) == 150
    scores = np.array([[5.0, -1.0, 3.0], [4.0, 2.0, 0.0]])
    np.testing.assert_array_equal(top_k_mask(scores, 2),
                                  [[True, False, False], [True, False, False]])
    support = np.array([[False, True, True], [True, True, False]])
    np.testing.assert_array_equal(top_k_mask(scores, 2, support),
                                  [[False, False, True], [True, False, False]])
    assert top_k_mask(scores, 10, support).sum() == 4  # never more than the support


def test_polynomial_schedule_is_zhu_and_gupta():
    initial, final, begin, end = 0.1, 0.8, 10, 50
    for step in (10, 20, 35, 50):
        expected = final + (initial - final) * (1 - (step - begin) / (end - begin)) ** 3
        assert polynomial_sparsity(step, initial, final, begin, end) == pytest.approx(expected,
                                                                                    abs=1e-6)
    assert polynomial_sparsity(0, initial, final, begin, end) == pytest.approx(initial)
    assert polynomial_sparsity(99, initial, final, begin, end) == pytest.approx(final)
    assert [t for t in range(60) if is_pruning_step(t, begin, end, 10)] == [10, 20, 30, 40, 50]


def test_native_hard_pruning_gives_the_target_sparsity_at_once(trained_lenet):
    model, report = keras_psm.compress(trained_lenet, "hard-pruning", target_sparsity=TARGET,
                                       verbose=0)
    assert report.callbacks == []
    assert kernel_counts(model) == expected_counts(model, TARGET)
    for name in KERNEL_LAYERS:
        layer = model.get_layer(name)
        kernel = np.abs(to_numpy(trained_lenet.get_layer(name).kernel))
        assert isinstance(layer, (SparseFactorDense, SparseFactorConv2D)) and layer.n_factors == 1
        kept = to_numpy(layer.masks[0]).reshape(kernel.shape) > 0
        assert kernel[kept].min() >= kernel[~kept].max()   # the largest magnitudes
        # One factor times a 0/1 mask: multiplying by 1 or 0 is exact in float32.
        np.testing.assert_array_equal(to_numpy(layer.kernel),
                                      to_numpy(trained_lenet.get_layer(name).kernel) * kept)


@pytest.mark.slow
def test_native_hard_pruning_fine_tunes_at_constant_sparsity(trained_lenet, mnist_small):
    model, report = keras_psm.compress(trained_lenet, "hard-pruning", target_sparsity=TARGET,
                                       verbose=0)
    masks = [support_of(f).copy() for f in masked_factors(model)]
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    accuracy_before = model.evaluate(*mnist_small[1], verbose=0)[1]
    assert fine_tune(model, mnist_small, report.callbacks) > accuracy_before + 0.2
    for before, factor in zip(masks, masked_factors(model)):
        np.testing.assert_array_equal(before, support_of(factor))


@pytest.mark.slow
def test_native_iterative_pruning_reaches_the_target_after_fit(trained_lenet, mnist_small,
                                                               tmp_path):
    before = [w.copy() for w in trained_lenet.get_weights()]
    model, report = keras_psm.compress(trained_lenet, "iterative-pruning", verbose=0,
                                       target_sparsity=TARGET, **SCHEDULE)
    assert [type(c) for c in report.callbacks] == [IterativePruning]
    assert all(support_of(f).all() for f in masked_factors(model))   # full masks to start
    assert [row.relative_error for row in report.compressed] == [0.0] * 5
    fine_tune(model, mnist_small, report.callbacks)
    assert kernel_counts(model) == expected_counts(model, TARGET)
    for a, b in zip(before, trained_lenet.get_weights()):
        np.testing.assert_array_equal(a, b)
    path = str(tmp_path / "pruned.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = mnist_small[1][0][:8]
    # Same weights, possibly different kernels (oneDNN and the CPU's instruction set choose
    # them per graph): float32 rounding of sums of a few hundred terms, far below 1e-5.
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_native_masks_follow_the_schedule_step_by_step(trained_lenet, mnist_small):
    (x, y), _ = mnist_small
    model, report = keras_psm.compress(trained_lenet, "iterative-pruning", verbose=0,
                                       target_sparsity=0.9, initial_sparsity=0.2,
                                       begin_step=3, end_step=15, frequency=4)
    callback = report.callbacks[0]
    model.compile("adam", "sparse_categorical_crossentropy")
    size = int(np.prod(model.get_layer("fc1").kernel.shape))
    seen = []
    for batches in (2, 1, 4, 4, 4, 3):    # steps 2, 3, 7, 11, 15, 18
        model.fit(x[:32 * batches], y[:32 * batches], batch_size=32, epochs=1,
                  callbacks=[callback], verbose=0)
        seen.append(int(to_numpy(model.get_layer("fc1").masks[0]).sum()))
    expected = [size] + [kept_count(size, callback.sparsity_at(t)) for t in (3, 7, 11, 15, 15)]
    assert seen == expected
    assert callback.sparsity_at(3) == pytest.approx(0.2, abs=1e-6)
    assert callback.sparsity_at(15) == pytest.approx(0.9, abs=1e-6)


@pytest.mark.slow
def test_iterative_pruning_callback_can_prune_psm_factors(trained_lenet, mnist_small):
    psm, _ = keras_psm.compress(trained_lenet, "psm", layers=["fc1"], n_factors=2,
                                sparsity=4, max_iter=20, verbose=0)
    fitted = psm.get_layer("fc1")
    supports = [to_numpy(m).copy() for m in fitted.masks]
    prunable = SparseFactorDense.from_factors(
        [to_numpy(f) for f in fitted.factors], supports=[s > 0 for s in supports],
        bias=to_numpy(fitted.bias), activation="relu", prunable=True, name="fc1")
    model = keras.models.clone_model(
        psm, clone_function=lambda layer: prunable if layer.name == "fc1" else layer)
    callback = IterativePruning(0.95, begin_step=0, end_step=4, frequency=2, layers=["fc1"])
    fine_tune(model, mnist_small, [callback], epochs=1)
    for support, mask in zip(supports, model.get_layer("fc1").masks):
        kept = to_numpy(mask)
        assert kept.sum() == min(kept_count(kept.size, 0.95), support.sum())
        assert np.all(kept <= support)


def test_bad_pruning_options_are_rejected(trained_lenet):
    with pytest.raises(ValueError, match="HardPruningConfig.*target_sparsity.*< 1"):
        keras_psm.compress(trained_lenet, "hard-pruning", target_sparsity=1.0, verbose=0)
    with pytest.raises(ValueError, match="IterativePruningConfig.*end_step.*>= 11"):
        keras_psm.IterativePruningConfig(begin_step=10, end_step=10)
    with pytest.raises(ValueError, match="IterativePruning.*initial_sparsity.*<= 0.5"):
        IterativePruning(0.5, initial_sparsity=0.6)
    with pytest.raises(TypeError, match="frequency.*integer"):
        IterativePruning(0.5, frequency=2.5)
    plain = keras.models.clone_model(trained_lenet)
    plain.compile("adam", "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="no prunable layers.*iterative-pruning"):
        plain.fit(np.zeros((4, 28, 28, 1)), np.zeros(4), callbacks=[IterativePruning(0.5)],
                  verbose=0)


@keras3_only
def test_tfmot_wrappers_raise_the_documented_error_under_keras3(trained_lenet):
    tfmot_loaded = "tensorflow_model_optimization" in sys.modules
    flag = os.environ.get("TF_USE_LEGACY_KERAS")
    for call in (lambda: iterative_pruning(trained_lenet, 0.5),
                 lambda: hard_pruning(trained_lenet, 0.5),
                 lambda: strip(trained_lenet)):
        with pytest.raises(RuntimeError, match="TF_USE_LEGACY_KERAS=1.*native") as error:
            call()
        assert "method='iterative-pruning'" in str(error.value)
    assert ("tensorflow_model_optimization" in sys.modules) == tfmot_loaded
    assert os.environ.get("TF_USE_LEGACY_KERAS") == flag


@legacy_only
@pytest.mark.slow
def test_tfmot_iterative_pruning_reaches_the_target_after_fit(trained_lenet, mnist_small,
                                                              tmp_path):
    before = [w.copy() for w in trained_lenet.get_weights()]
    pruned, callbacks = iterative_pruning(trained_lenet, TARGET, **SCHEDULE)
    assert len(callbacks) == 1
    fine_tune(pruned, mnist_small, callbacks)
    stripped = strip(pruned)
    assert [type(stripped.get_layer(n)) for n in KERNEL_LAYERS] == \
        [keras.layers.Conv2D] * 2 + [keras.layers.Dense] * 3
    assert kernel_counts(stripped) == expected_counts(stripped, TARGET)
    for a, b in zip(before, trained_lenet.get_weights()):
        np.testing.assert_array_equal(a, b)
    path = str(tmp_path / "stripped.keras")
    stripped.save(path)
    assert kernel_counts(keras.models.load_model(path)) == kernel_counts(stripped)


@legacy_only
def test_tfmot_hard_pruning_gives_the_target_sparsity_at_once(trained_lenet):
    pruned, _ = hard_pruning(trained_lenet, TARGET)
    at_once = strip(pruned)
    assert kernel_counts(at_once) == expected_counts(at_once, TARGET)
    native, _ = keras_psm.compress(trained_lenet, "hard-pruning", target_sparsity=TARGET,
                                   verbose=0)
    for name in KERNEL_LAYERS:
        # Both keep the trained values on the same support (masking by 0/1 is exact).
        np.testing.assert_array_equal(to_numpy(at_once.get_layer(name).kernel),
                                      to_numpy(native.get_layer(name).kernel))


@legacy_only
@pytest.mark.slow
def test_tfmot_hard_pruning_keeps_its_masks_during_fit(trained_lenet, mnist_small):
    pruned, callbacks = hard_pruning(trained_lenet, TARGET)
    at_once = strip(pruned)
    kept = {n: to_numpy(at_once.get_layer(n).kernel) != 0 for n in KERNEL_LAYERS}
    fine_tune(pruned, mnist_small, callbacks)
    after = strip(pruned)
    for name in KERNEL_LAYERS:
        np.testing.assert_array_equal(to_numpy(after.get_layer(name).kernel) != 0, kept[name])


@legacy_only
@pytest.mark.slow
def test_native_and_tfmot_agree_on_sparsity_and_accuracy(trained_lenet, mnist_small):
    import tensorflow_model_optimization as tfmot

    schedule = tfmot.sparsity.keras.PolynomialDecay(0.1, 0.8, 10, 50, frequency=10)
    for step in range(0, 60, 3):
        should, sparsity = schedule(step)
        assert bool(should) == is_pruning_step(step, 10, 50, 10)
        # tfmot computes the schedule in float32 (rounding ~6e-8 relative); ours in float64.
        assert float(sparsity) == pytest.approx(polynomial_sparsity(step, 0.1, 0.8, 10, 50),
                                                rel=1e-6)

    pruned, callbacks = iterative_pruning(trained_lenet, TARGET, **SCHEDULE)
    tfmot_accuracy = fine_tune(pruned, mnist_small, callbacks)
    native, report = keras_psm.compress(trained_lenet, "iterative-pruning", verbose=0,
                                        target_sparsity=TARGET, **SCHEDULE)
    native_accuracy = fine_tune(native, mnist_small, report.callbacks)
    assert kernel_counts(native) == kernel_counts(strip(pruned))
    assert abs(native_accuracy - tfmot_accuracy) <= 0.01


@legacy_only
def test_tfmot_prunes_the_factors_of_sparse_factor_layers(trained_lenet, mnist_small):
    model, _ = keras_psm.compress(trained_lenet, "psm", layers=["fc1"], n_factors=2,
                                  sparsity=4, max_iter=20, verbose=0)
    nonzeros = [np.count_nonzero(to_numpy(w)) for w in model.get_layer("fc1").values]
    pruned, callbacks = hard_pruning(model, 0.99, layers=["fc1"])
    stripped = strip(pruned)
    layer = stripped.get_layer("fc1")
    assert isinstance(layer, SparseFactorDense)
    for weight, before in zip(layer.get_prunable_weights(), nonzeros):
        kept = kept_count(int(np.prod(weight.shape)), 0.99)
        assert kept < before
        assert np.count_nonzero(to_numpy(weight)) == kept
    assert type(stripped.get_layer("fc2")) is keras.layers.Dense
