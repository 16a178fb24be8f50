"""Sparse-factor layers hold O(nnz): values and indices in memory, in .keras files, in fit."""

import os

import numpy as np
import pytest

import keras_psm
from keras_psm.backend import LEGACY_KERAS, keras
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
from keras_psm.pruning import IterativePruning, hard_pruning, strip
from keras_psm.ops import convert_to_numpy as to_numpy


def psm_model(prunable=False):
    inputs = keras.Input((12, 12, 3))
    x = SparseFactorConv2D(16, 3, n_factors=2, sparsity=3, seed=1, activation="relu",
                           prunable=prunable)(inputs)
    x = keras.layers.Flatten()(x)
    outputs = SparseFactorDense(10, n_factors=3, sparsity=4, seed=2, prunable=prunable)(x)
    return keras.Model(inputs, outputs)


def sparse_layers(model):
    return [layer for layer in model.layers
            if isinstance(layer, (SparseFactorDense, SparseFactorConv2D))]


@pytest.mark.parametrize("prunable", [False, True])
def test_variables_hold_nonzeros_indices_and_keep_masks_only(prunable):
    for layer in sparse_layers(psm_model(prunable)):
        nnz = sum(layer.nonzeros)
        assert nnz == sum(int(np.count_nonzero(to_numpy(m))) for m in layer.masks)
        bias = int(layer.bias.shape[0])
        assert sum(int(np.prod(v.shape)) for v in layer.trainable_weights) == nnz + bias
        stored = sum(int(np.prod(v.shape)) for v in layer.weights)
        assert stored == (3 if prunable else 2) * nnz + bias
        assert layer.count_nonzero_params() == nnz + bias


def test_outputs_match_plain_layers_holding_the_kernel():
    model = psm_model()
    conv, dense = sparse_layers(model)
    plain_conv = keras.layers.Conv2D(16, 3, activation="relu")
    plain_dense = keras.layers.Dense(10)
    x = np.random.default_rng(0).standard_normal((4, 12, 12, 3)).astype("float32")
    plain_conv.build(x.shape)
    plain_conv.set_weights([to_numpy(conv.kernel), to_numpy(conv.bias)])
    hidden = keras.layers.Flatten()(plain_conv(x))
    plain_dense.build(hidden.shape)
    plain_dense.set_weights([to_numpy(dense.kernel), to_numpy(dense.bias)])
    # float32 sums of a few hundred terms in another association order.
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(plain_dense(hidden)), rtol=1e-4,
                               atol=1e-4)


def test_keras_file_stores_values_and_indices_only(tmp_path):
    inputs = keras.Input((1024,))
    outputs = SparseFactorDense(1024, n_factors=2, sparsity=4, seed=0)(inputs)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "psm.keras")
    model.save(path)
    layer = model.layers[-1]
    nnz = sum(layer.nonzeros)
    dense_mask_layout = 2 * 2 * 1024 * 1024 * 4   # two (1024, 1024) float32 weights and masks
    size = os.path.getsize(path)
    # 8 bytes per nonzero (value + int32 index); 64 KB covers the bias, config and zip headers.
    assert size <= 8 * nnz + 64 * 1024
    assert size < dense_mask_layout / 50
    reloaded = keras.models.load_model(path)
    x = np.random.default_rng(0).standard_normal((3, 1024)).astype("float32")
    # Same weights; oneDNN may pick other kernels per graph: float32 rounding, below 1e-5.
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(reloaded(x)), rtol=1e-5,
                               atol=1e-6)
    for a, b in zip(model.weights, reloaded.weights):  # stored values: bit for bit
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.slow
def test_iterative_pruning_and_pruning_at_init_keep_entries_removed_during_fit(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 10, 128)
    model = psm_model(prunable=True)
    before = [layer.count_nonzero_params() for layer in sparse_layers(model)]
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=3, verbose=0,
              callbacks=[IterativePruning(0.9, begin_step=0, end_step=6, frequency=2)])
    for layer, count in zip(sparse_layers(model), before):
        assert layer.count_nonzero_params() < count
        for factor, mask in zip(layer.factors, layer.masks):
            assert np.all(to_numpy(factor)[to_numpy(mask) == 0] == 0)
    path = str(tmp_path / "pruned.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    # Same weights; oneDNN may pick other kernels per graph: float32 rounding, below 1e-5.
    np.testing.assert_allclose(to_numpy(model(x[:2])), to_numpy(reloaded(x[:2])), rtol=1e-5,
                               atol=1e-6)

    pruned = keras_psm.prune_at_init(psm_model(), 0.5, "magnitude")
    counts = [sum(layer.nonzeros) for layer in sparse_layers(pruned)]
    pruned.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    pruned.fit(x, y, batch_size=32, epochs=2, verbose=0)
    for layer, count in zip(sparse_layers(pruned), counts):
        assert sum(layer.nonzeros) == count == sum(int(v.shape[0]) for v in layer.values)
        assert int(np.count_nonzero(np.concatenate([to_numpy(m).ravel() for m in layer.masks]))) \
            == count


@pytest.mark.slow
@pytest.mark.skipif(not LEGACY_KERAS, reason="tfmot supports tf_keras only "
                                              "(TF_USE_LEGACY_KERAS=1)")
def test_tfmot_prune_low_magnitude_trains_sparse_factor_layers():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 12, 12, 3)).astype("float32")
    y = rng.integers(0, 10, 128)
    model = psm_model()
    pruned, callbacks = hard_pruning(model, 0.5)
    pruned.compile("adam", "sparse_categorical_crossentropy")
    history = pruned.fit(x, y, batch_size=32, epochs=2, verbose=0, callbacks=callbacks)
    assert np.isfinite(history.history["loss"][-1])
    for layer in sparse_layers(strip(pruned)):
        for values, count in zip(layer.values, layer.nonzeros):
            assert np.count_nonzero(to_numpy(values)) <= count - count // 2


def test_sparse_product_trains_under_mixed_float16():
    rng = np.random.default_rng(0)
    factor = (rng.standard_normal((400, 300)) * (rng.random((400, 300)) < 0.005)).astype("float32")
    x = rng.standard_normal((3, 400)).astype("float32")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = SparseFactorDense.from_factors([factor])
        outputs = layer(x)
        assert layer._is_sparse(0) and to_numpy(outputs).dtype == np.float16
        # float16 keeps 11 significant bits: outputs of size ~3 round to ~2e-3.
        np.testing.assert_allclose(to_numpy(outputs).astype("float32"), x @ factor, atol=2e-2)
        model = keras.Sequential([keras.Input((400,)), layer])
        model.compile("sgd", "mse")
        history = model.fit(x, np.zeros((3, 300), "float32"), epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
    finally:
        keras.mixed_precision.set_global_policy("float32")
