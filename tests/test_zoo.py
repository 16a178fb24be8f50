"""Architectures people use, end to end: compress -> one fit step -> .keras
round trip -> TFLite checked by LiteRT.

keras.applications models are built with ``weights=None`` at 32x32 with 10
classes; palm4MSA runs a few iterations only, since what is checked is that
every layer is handled, not the quality of the fit.
"""

import numpy as np
import pytest

import keras_psm
from conftest import check_exports_to_tflite
from keras_psm.backend import keras

pytestmark = pytest.mark.slow

#: A few palm4MSA iterations: the zoo checks the graph, not the fit.
ZOO_PSM = dict(n_factors=2, sparsity=2, max_iter=2)


def transformer_encoder(tokens=12, vocabulary=50, width=32, heads=2, classes=4):
    """One pre-norm encoder block with causal self-attention, residual
    connections and a Dense feed-forward on (batch, tokens, features)."""
    inputs = keras.Input((tokens,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, width, name="embedding")(inputs)
    h = keras.layers.LayerNormalization(name="norm_1")(x)
    h = keras.layers.MultiHeadAttention(heads, width // heads, dropout=0.1,
                                        name="attention")(h, h, use_causal_mask=True)
    x = x + h  # an operation node under Keras 3, a TFOpLambda under tf_keras
    h = keras.layers.LayerNormalization(name="norm_2")(x)
    h = keras.layers.Dense(2 * width, activation="gelu", name="ffn_in")(h)
    h = keras.layers.Dense(width, name="ffn_out")(h)
    x = x + h  # an operation node under Keras 3, a TFOpLambda under tf_keras
    x = keras.layers.GlobalAveragePooling1D()(x)
    outputs = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name="encoder")


def conv1d_net(steps=32, channels=3, classes=4):
    """A small 1-D CNN: causal dilated, strided and 'same' convolutions."""
    inputs = keras.Input((steps, channels))
    x = keras.layers.Conv1D(16, 3, padding="causal", dilation_rate=2, activation="relu",
                            name="causal")(inputs)
    x = keras.layers.Conv1D(24, 5, strides=2, padding="same", activation="relu",
                            name="strided")(x)
    x = keras.layers.SeparableConv1D(24, 3, name="separable_1d")(x)
    x = keras.layers.Conv1D(32, 3, name="valid")(x)
    x = keras.layers.GlobalMaxPooling1D()(x)
    outputs = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name="conv1d_net")


def application(name):
    build = getattr(keras.applications, name)
    return build(weights=None, input_shape=(32, 32, 3), classes=10)


def _samples(model, n, seed=0):
    rng = np.random.default_rng(seed)
    spec = model.inputs[0]
    shape = (n,) + tuple(spec.shape[1:])
    if "int" in str(spec.dtype):
        return rng.integers(0, 50, size=shape).astype("int32")
    return rng.normal(size=shape).astype("float32")


#: Layer types in the zoo whose weights are no matrix applied per position.
WITHOUT_MATRIX_KERNEL = {"BatchNormalization", "LayerNormalization", "Normalization",
                         "DepthwiseConv2D", "Embedding"}

ZOO = {
    "ResNet50": lambda: application("ResNet50"),
    "MobileNetV2": lambda: application("MobileNetV2"),
    "EfficientNetB0": lambda: application("EfficientNetB0"),
    "DenseNet121": lambda: application("DenseNet121"),
    "transformer_encoder": transformer_encoder,
    "conv1d_net": conv1d_net,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_compresses_trains_round_trips_and_exports(name, tmp_path):
    model = ZOO[name]()
    x = _samples(model, 4)
    y = np.arange(4) % model.outputs[0].shape[-1]
    compressed, report = keras_psm.compress(model, "psm", verbose=0, **ZOO_PSM)
    assert report.compressed
    # Every kernel that is a matrix applied per position is compressed.
    assert {row.layer_type for row in report.skipped} <= WITHOUT_MATRIX_KERNEL
    compressed.compile(keras.optimizers.SGD(1e-3),
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       jit_compile=False)  # XLA would compile for longer than the step runs
    history = compressed.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])

    path = tmp_path / f"{name}.keras"
    compressed.save(str(path))
    reloaded = keras.models.load_model(str(path))
    # The reloaded model holds the same weights and runs the same ops.
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), compressed.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)

    # One candidate file (no sparse encoding, tested elsewhere) keeps the zoo short.
    check_exports_to_tflite(compressed, x[:2], tmp_path / f"{name}.tflite", sparse=False)
