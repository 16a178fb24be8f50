"""Conv1D (strides, padding incl. causal, dilation) and separable convolutions."""

import numpy as np
import pytest

import keras_psm
from conftest import check_exports_to_tflite
from keras_psm.backend import keras
from keras_psm.layers import CompressedConv1D, CompressedSeparableConv
from keras_psm.ops import convert_to_numpy as to_numpy

METHODS = keras_psm.available_methods()
CONV_METHODS = [m for m in METHODS if "conv2d" in keras_psm.get_method(m).layer_kinds]


def conv1d_model(padding="causal", strides=1, dilation_rate=2):
    inputs = keras.Input((20, 6))
    x = keras.layers.Conv1D(8, 3, padding=padding, strides=strides, dilation_rate=dilation_rate,
                            activation="relu", name="conv")(inputs)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def samples(shape=(3, 20, 6), seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def plain_conv1d(layer, original):
    """A plain Conv1D with ``original``'s options holding ``layer``'s kernel and bias."""
    reference = keras.layers.Conv1D.from_config(original.get_config())
    reference.build(original.input.shape)
    reference.set_weights([to_numpy(layer.kernel), to_numpy(layer.layer.bias)])
    return reference


def presets(method):
    """The method's "large" preset (small kernels cannot meet every "small"
    budget); ALDS removes 30%: rank 1 already stores 40% of these kernels."""
    options = dict(keras_psm.get_method(method).presets["large"])
    if method == "alds":
        options["target"] = 0.3
    return options


@pytest.mark.parametrize("padding, strides, dilation_rate", [
    ("causal", 1, 2), ("same", 2, 1), ("valid", 1, 3), ("causal", 2, 1), ("same", 1, 2),
])
def test_compressed_conv1d_equals_a_plain_conv1d_holding_its_kernel(padding, strides,
                                                                       dilation_rate):
    model = conv1d_model(padding, strides, dilation_rate)
    compressed, report = keras_psm.compress(model, "psm", n_factors=2, sparsity=3,
                                            layers=["conv"], verbose=0)
    layer = compressed.get_layer("conv")
    assert isinstance(layer, CompressedConv1D)
    assert to_numpy(layer.kernel).shape == (3, 6, 8)
    x = samples()
    outputs = to_numpy(keras.Model(compressed.input, layer.output)(x))
    expected = to_numpy(plain_conv1d(layer, model.get_layer("conv"))(x))
    assert outputs.shape[1:] == tuple(model.get_layer("conv").output.shape[1:])
    # float32: factors applied one after the other against one product kernel.
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    assert report.compressed[0].layer_type == "Conv1D"


@pytest.mark.parametrize("method", METHODS)
def test_every_method_replaces_conv1d_or_says_why_not(method):
    model = conv1d_model()
    compressed, report = keras_psm.compress(model, method, layers=None, verbose=0,
                                            **presets(method))
    if method not in CONV_METHODS:
        skipped = {row.name: row.note for row in report.skipped}
        assert "replaces Dense" in skipped["conv"]
        return
    layer = compressed.get_layer("conv")
    assert isinstance(layer, CompressedConv1D)
    x = samples()
    outputs = to_numpy(keras.Model(compressed.input, layer.output)(x))
    expected = to_numpy(plain_conv1d(layer, model.get_layer("conv"))(x))
    # float32 evaluations of the same kernel in different orders.
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("separable", ["SeparableConv1D", "SeparableConv2D"])
def test_separable_pointwise_kernel_is_compressed(separable):
    shape = (12, 5) if separable == "SeparableConv1D" else (9, 9, 5)
    inputs = keras.Input(shape)
    x = getattr(keras.layers, separable)(8, 3, depth_multiplier=2, strides=2, padding="same",
                                         activation="relu", name="separable")(inputs)
    model = keras.Model(inputs, x)
    model.set_weights([np.random.default_rng(0).normal(size=w.shape).astype("float32")
                       for w in model.get_weights()])
    compressed, report = keras_psm.compress(model, "psm", n_factors=2, sparsity=3, verbose=0)
    layer = compressed.get_layer("separable")
    assert isinstance(layer, CompressedSeparableConv)
    original = model.get_layer("separable")
    reference = type(original).from_config(original.get_config())
    reference.build(original.input.shape)
    reference.set_weights([to_numpy(original.depthwise_kernel), to_numpy(layer.kernel),
                           to_numpy(layer.layer.bias)])
    x = samples((2,) + shape)
    # float32 evaluations of the same kernels in different orders.
    np.testing.assert_allclose(to_numpy(compressed(x)), to_numpy(reference(x)), rtol=1e-4,
                               atol=1e-4)
    # The depthwise kernel is kept exactly.
    np.testing.assert_array_equal(layer.depthwise.get_weights()[0],
                                  to_numpy(original.depthwise_kernel))
    assert report.compressed[0].layer_type == separable


def test_depthwise_and_transposed_convolutions_are_kept_and_reported():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(inputs)
    x = keras.layers.Conv2DTranspose(4, 3, name="transpose")(x)
    model = keras.Model(inputs, x)
    _, report = keras_psm.compress(model, "psm", verbose=0)
    notes = {row.name: row.note for row in report.skipped}
    assert "one small filter per channel" in notes["depthwise"]
    assert "window of outputs" in notes["transpose"]


@pytest.mark.slow
@pytest.mark.parametrize("method", CONV_METHODS)
@pytest.mark.tensorflow
def test_conv1d_net_exports_to_tflite(method, tmp_path):
    inputs = keras.Input((20, 6))
    x = keras.layers.Conv1D(8, 3, padding="causal", dilation_rate=2, name="causal")(inputs)
    x = keras.layers.Conv1D(8, 3, strides=2, padding="same", name="strided")(x)
    x = keras.layers.SeparableConv1D(8, 3, name="separable")(x)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    compressed, report = keras_psm.compress(model, method, verbose=0, **presets(method))
    assert len(report.compressed) == 4
    x = samples()
    check_exports_to_tflite(compressed, x, tmp_path / "model.tflite")
