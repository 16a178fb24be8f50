"""Any functional graph survives compress: operations that are not layers,
shared layers and nested models."""

import numpy as np

import keras_psm
from keras_psm.backend import LEGACY_KERAS, keras, tf
from keras_psm.layers import KroneckerDense, KroneckerPatternDense, keep_selected_patterns
from keras_psm.model_layers import clone_replacing, is_operation
from keras_psm.ops import convert_to_numpy as to_numpy


def tanh(x):
    """An operation node: ``keras.ops.tanh`` (Keras 3) or a TFOpLambda of ``tf.tanh`` (tf_keras)."""
    return tf.tanh(x) if LEGACY_KERAS else keras.ops.tanh(x)


def graph_with_operations():
    """Residuals written ``x + y``, a ``tanh`` operation and a ``* 0.5``."""
    inputs = keras.Input((10,))
    x = keras.layers.Dense(10, name="first")(inputs)
    x = x + inputs
    x = tanh(x) * 0.5
    y = keras.layers.Dense(10, name="second")(x)
    outputs = keras.layers.Dense(3, name="head")(x + y)
    return keras.Model(inputs, outputs)


def samples(n=5, width=10, seed=0):
    return np.random.default_rng(seed).normal(size=(n, width)).astype("float32")


def operation_types(model):
    """Type names of the graph's nodes that are operations (Keras 3) or TFOpLambda (tf_keras)."""
    nodes = model.operations if hasattr(model, "operations") else model.layers
    return sorted(type(node).__name__ for node in nodes
                  if is_operation(node) or type(node).__name__ == "TFOpLambda")


def test_operations_survive_and_unselected_layers_give_the_same_outputs():
    model = graph_with_operations()
    config_before = model.get_config()
    compressed, report = keras_psm.compress(model, "psm", n_factors=2, sparsity=4,
                                            layers=["head"], verbose=0)
    assert [row.name for row in report.compressed] == ["head"]
    assert operation_types(compressed) == operation_types(model)
    assert operation_types(model)  # the graph does hold operation nodes
    x = samples()
    for name in ("first", "second"):
        expected = to_numpy(keras.Model(model.input, model.get_layer(name).output)(x))
        actual = to_numpy(keras.Model(compressed.input, compressed.get_layer(name).output)(x))
        # The same weights through the same ops in another graph: float32 rounding, below 1e-5.
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
    head_input = to_numpy(keras.Model(compressed.input, compressed.get_layer("head").input)(x))
    expected_input = to_numpy(keras.Model(model.input, model.get_layer("head").input)(x))
    # The operations after the layers are carried over as well (float32 rounding, as above).
    np.testing.assert_allclose(head_input, expected_input, rtol=1e-5, atol=1e-6)
    assert model.get_config() == config_before


def test_shared_layers_stay_shared():
    inputs = keras.Input((10,))
    shared = keras.layers.Dense(10, name="shared")
    kept = keras.layers.Dense(10, name="kept")
    a, b = shared(inputs), shared(kept(inputs))
    b = kept(b)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()([a, b]))
    model = keras.Model(inputs, outputs)
    compressed, report = keras_psm.compress(model, "svd", rank_ratio=1.0,
                                            layers=["shared", "head"], verbose=0)
    names = [layer.name for layer in compressed.layers]
    assert names.count("shared") == 1 and names.count("kept") == 1
    assert sorted(row.name for row in report.compressed) == ["head", "shared"]
    x = samples()
    # A full-rank SVD reproduces each kernel up to float32 rounding.
    np.testing.assert_allclose(to_numpy(compressed(x)), to_numpy(model(x)), rtol=1e-4,
                               atol=1e-4)


def test_nested_models_and_a_layer_shared_with_them():
    shared = keras.layers.Dense(10, name="shared")
    block_inputs = keras.Input((10,))
    block_outputs = shared(keras.layers.Dense(10, name="inner")(block_inputs))
    block = keras.Model(block_inputs, block_outputs, name="block")
    inputs = keras.Input((10,))
    x = block(inputs)
    x = shared(x) + x
    outputs = keras.layers.Dense(2, name="head")(x)
    model = keras.Model(inputs, outputs)
    compressed, report = keras_psm.compress(model, "svd", rank_ratio=1.0, verbose=0)
    assert sorted(row.name for row in report.compressed) == ["head", "inner", "shared"]
    outer_shared = compressed.get_layer("shared")
    assert compressed.get_layer("block").get_layer("shared") is outer_shared
    x = samples()
    # A full-rank SVD reproduces each kernel up to float32 rounding.
    np.testing.assert_allclose(to_numpy(compressed(x)), to_numpy(model(x)), rtol=1e-4,
                               atol=1e-4)


def test_clone_replacing_copies_untouched_layers_with_their_weights():
    model = graph_with_operations()
    clone = clone_replacing(model, lambda layer: None)
    assert clone is not model
    for old, new in zip(model.layers, clone.layers):
        assert old is not new or is_operation(old)
        for a, b in zip(old.get_weights(), new.get_weights()):
            np.testing.assert_array_equal(a, b)
    x = samples()
    # Same weights, same ops in another graph: float32 rounding, below 1e-5.
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(model(x)), rtol=1e-5, atol=1e-6)


def test_keep_selected_patterns_descends_into_nested_models():
    block = keras.Sequential([
        keras.Input((16,)),
        KroneckerPatternDense(8, [(2, 2), (4, 2)], rank=1, name="patterns"),
    ], name="block")
    inputs = keras.Input((16,))
    outputs = keras.layers.Dense(2, name="head")(block(inputs))
    model = keras.Model(inputs, outputs)
    selected = keep_selected_patterns(model)
    assert isinstance(selected.get_layer("block").get_layer("patterns"), KroneckerDense)
    for a, b in zip(selected.get_layer("head").get_weights(),
                    model.get_layer("head").get_weights()):
        np.testing.assert_array_equal(a, b)
