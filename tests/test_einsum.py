"""EinsumDense and MultiHeadAttention projections, compressed as their kernel matrices."""

import numpy as np
import pytest

import keras_psm
from conftest import check_exports_to_tflite
from keras_psm.backend import keras
from keras_psm.layers import CompressedEinsumDense, CompressedMultiHeadAttention
from keras_psm.ops import convert_to_numpy as to_numpy

METHODS = keras_psm.available_methods()


def einsum_model(bias_axes="de", activation="relu"):
    """(batch, 6, 16) -> EinsumDense "abc,cde->abde" with kernel (16, 2, 8) -> head."""
    inputs = keras.Input((6, 16))
    x = keras.layers.EinsumDense("abc,cde->abde", output_shape=(6, 2, 8), bias_axes=bias_axes,
                                 activation=activation, name="einsum")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def attention_model(dropout=0.0):
    """(batch, 6, 16) -> causal self-attention (2 heads of 8) -> residual -> head."""
    inputs = keras.Input((6, 16))
    x = keras.layers.MultiHeadAttention(2, 8, dropout=dropout, name="mha")(
        inputs, inputs, use_causal_mask=True)
    x = keras.layers.Add()([inputs, x])
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs)


def samples(n=4, seed=1):
    return np.random.default_rng(seed).normal(size=(n, 6, 16)).astype("float32")


def plain_einsum(layer, equation="abc,cde->abde"):
    """A plain EinsumDense holding ``layer``'s ``kernel`` and ``bias``."""
    kernel = to_numpy(layer.kernel)
    reference = keras.layers.EinsumDense(
        equation, output_shape=(6,) + kernel.shape[1:], bias_axes="de",
        activation=layer.layer.activation)
    reference.build((None, 6, kernel.shape[0]))
    reference.set_weights([kernel, to_numpy(layer.bias)])
    return reference


@pytest.mark.parametrize("method", METHODS)
def test_compressed_einsum_equals_a_plain_einsum_holding_its_kernel(method):
    model = einsum_model()
    options = get_presets(method)
    compressed, report = keras_psm.compress(model, method, layers=["einsum"], verbose=0,
                                            **options)
    layer = compressed.get_layer("einsum")
    assert isinstance(layer, CompressedEinsumDense)
    assert to_numpy(layer.kernel).shape == (16, 2, 8)
    x = samples()
    outputs = to_numpy(keras.Model(compressed.input, layer.output)(x))
    expected = to_numpy(plain_einsum(layer)(x))
    # Two float32 evaluations of the same product, in different association orders.
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    row = report.compressed[0]
    assert row.name == "einsum" and row.layer_type == "EinsumDense"
    assert row.params_after == layer.count_nonzero_params()


def get_presets(method):
    """The method's "large" preset: small kernels cannot meet every "small" budget."""
    return dict(keras_psm.get_method(method).presets["large"])


def test_bias_over_some_output_axes_is_broadcast():
    model = einsum_model(bias_axes="e", activation=None)
    compressed, _ = keras_psm.compress(model, "svd", rank_ratio=1.0, layers=["einsum"],
                                       verbose=0)
    x = samples()
    original = to_numpy(keras.Model(model.input, model.get_layer("einsum").output)(x))
    restored = to_numpy(keras.Model(compressed.input, compressed.get_layer("einsum").output)(x))
    # A full-rank SVD reproduces the kernel up to float32 rounding.
    np.testing.assert_allclose(restored, original, rtol=1e-4, atol=1e-4)


def test_einsum_outside_matrix_form_is_kept_and_reported():
    inputs = keras.Input((4, 6))
    x = keras.layers.EinsumDense("abc,bd->acd", output_shape=(6, 5), name="mix_tokens")(inputs)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    compressed, report = keras_psm.compress(model, "svd", verbose=0)
    skipped = {row.name: row.note for row in report.skipped}
    assert "abc,bd->acd" in skipped["mix_tokens"]
    assert type(compressed.get_layer("mix_tokens")) is keras.layers.EinsumDense


def test_attention_projections_are_compressed_and_behaviour_is_kept():
    model = attention_model(dropout=0.2)
    compressed, report = keras_psm.compress(model, "psm", n_factors=2, sparsity=4,
                                            layers=lambda layer: layer.name != "head",
                                            verbose=0)
    assert {row.name for row in report.compressed} == {
        "mha/query", "mha/key", "mha/value", "mha/attention_output"}
    layer = compressed.get_layer("mha")
    assert isinstance(layer, CompressedMultiHeadAttention)
    assert layer.get_config()["dropout"] == 0.2

    # The reference: a plain MultiHeadAttention whose EinsumDense projections
    # hold the compressed projections' kernels and biases.
    config = {key: value for key, value in layer.get_config().items() if key not in (
        "projections", "name", "query_shape", "key_shape", "value_shape")}
    reference = keras.layers.MultiHeadAttention(**config)
    x, mask = samples(), np.random.default_rng(2).random((4, 6, 6)) > 0.3
    reference(x, x)
    for attribute in ("_query_dense", "_key_dense", "_value_dense", "_output_dense"):
        projection = getattr(layer, attribute)
        getattr(reference, attribute).set_weights(
            [to_numpy(projection.kernel), to_numpy(projection.bias)])
    for kwargs in (dict(use_causal_mask=True), dict(attention_mask=mask)):
        outputs, scores = layer(x, x, return_attention_scores=True, **kwargs)
        expected, expected_scores = reference(x, x, return_attention_scores=True, **kwargs)
        # float32, the projections' factors applied in another order than one kernel.
        np.testing.assert_allclose(to_numpy(outputs), to_numpy(expected), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(to_numpy(scores), to_numpy(expected_scores), rtol=1e-4,
                                   atol=1e-5)
    _, scores = layer(x, x, return_attention_scores=True, use_causal_mask=True)
    assert np.all(np.triu(to_numpy(scores)[0, 0], k=1) == 0.0)  # softmax of masked logits
    inference = to_numpy(layer(x, x, training=False))
    assert not np.allclose(to_numpy(layer(x, x, training=True)), inference)  # dropout active


def test_kept_projections_keep_their_weights():
    model = attention_model()
    compressed, report = keras_psm.compress(model, "svd", rank_ratio=0.5, layers=["mha/value"],
                                            verbose=0)
    original, layer = model.get_layer("mha"), compressed.get_layer("mha")
    assert isinstance(layer._value_dense, CompressedEinsumDense)
    for attribute in ("_query_dense", "_key_dense", "_output_dense"):
        assert type(getattr(layer, attribute)) is keras.layers.EinsumDense
        for a, b in zip(getattr(layer, attribute).get_weights(),
                        getattr(original, attribute).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert [row.name for row in report.compressed] == ["mha/value"]


@pytest.mark.slow
def test_attention_model_round_trips_through_keras_file(tmp_path):
    compressed, _ = keras_psm.compress(attention_model(), "psm", n_factors=2, sparsity=4,
                                       verbose=0)
    path = tmp_path / "attention.keras"
    compressed.save(str(path))
    reloaded = keras.models.load_model(str(path))
    assert isinstance(reloaded.get_layer("mha"), CompressedMultiHeadAttention)
    x = samples()
    # Same weights; oneDNN may pick other kernels per graph: float32 rounding, below 1e-5.
    np.testing.assert_allclose(to_numpy(reloaded(x)), to_numpy(compressed(x)), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.tensorflow
def test_einsum_and_attention_export_to_tflite(method, tmp_path):
    inputs = keras.Input((6, 16))
    x = keras.layers.MultiHeadAttention(2, 8, name="mha")(inputs, inputs, use_causal_mask=True)
    x = keras.layers.EinsumDense("abc,cde->abde", output_shape=(6, 2, 8), bias_axes="de",
                                 name="einsum")(x)
    outputs = keras.layers.Dense(3, name="head")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    compressed, report = keras_psm.compress(model, method, verbose=0, **get_presets(method))
    assert len(report.compressed) == 6
    x = samples()
    check_exports_to_tflite(compressed, x, tmp_path / "model.tflite")
