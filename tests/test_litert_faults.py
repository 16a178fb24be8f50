"""A converter fault that export routes around, and the model it was found on.

TensorFlow 2.21's converter stores a fully connected weight whose input size
is not a multiple of 4 in 1x4 blocks when it counts enough zeros, and leaves
the last ``in % 4`` inputs out of the encoding: LiteRT then computes
``x[:, :4 * (in // 4)] @ W[:4 * (in // 4)]`` (``keras_psm.litert_cost``).
"""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from keras_psm import demo, export, litert_cost
from keras_psm.backend import keras, tf
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense

# Every test here converts models to TFLite (seconds each).
pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent / "data"


def litert_matmul(weight, x):
    """LiteRT's ``x @ weight`` for a constant ``weight`` converted with TFLite's sparse encoding."""
    constant = tf.constant(weight)
    function = tf.function(lambda t: tf.matmul(t, constant), autograph=False,
                           input_signature=[tf.TensorSpec(x.shape, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()])
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
    interpreter = Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def weights_to_try(rng):
    """Random sparse weights with 5 to 8 inputs, and for 5 to 7 inputs one whose
    whole block is zero (the converter takes all its inputs for zeros)."""
    for n_in in (5, 6, 7, 8):
        for density in (0.1, 0.3, 0.5, 0.7, 0.9):
            yield (rng.standard_normal((n_in, 8)) * (rng.random((n_in, 8)) < density))
        if n_in % 4:
            tail_only = rng.standard_normal((n_in, 8))
            tail_only[:4] = 0.0
            yield tail_only


def test_converter_drops_the_inputs_past_the_last_whole_block():
    rng = np.random.default_rng(0)
    dropped = 0
    for weight in weights_to_try(rng):
        weight = weight.astype("float32")
        x = rng.standard_normal((4, weight.shape[0])).astype("float32")
        actual = litert_matmul(weight, x)
        whole = weight.shape[0] // 4 * 4
        # float32 sums of at most 8 products of standard normals: rounding ~1e-6.
        right = np.allclose(actual, x @ weight, atol=1e-4)
        assert right != litert_cost.drops_inputs(weight), weight
        if not right:
            dropped += 1
            np.testing.assert_allclose(actual, x[:, :whole] @ weight[:whole], atol=1e-4)
    # The fault shows here (if TensorFlow fixes it, drops_inputs can go).
    assert dropped >= 3


def lenet_psm_q2k4():
    """The LeNet-5 PSM (Q=2, K=4) on which the fault was reported, rebuilt from
    its factors, with its check inputs and Keras outputs."""
    data = np.load(DATA / "lenet_psm_q2k4.npz")

    def factors(name):
        return dict(factors=[data[f"{name}/factor_{i}"] for i in range(2)],
                    bias=data[f"{name}/bias"], name=name)

    inputs = keras.Input((28, 28, 1))
    x = SparseFactorConv2D.from_factors(kernel_size=5, padding="same", activation="relu",
                                        **factors("conv2d"))(inputs)
    x = keras.layers.MaxPooling2D()(x)
    x = SparseFactorConv2D.from_factors(kernel_size=5, activation="relu",
                                        **factors("conv2d_1"))(x)
    x = keras.layers.Flatten()(keras.layers.MaxPooling2D()(x))
    x = SparseFactorDense.from_factors(activation="relu", **factors("dense"))(x)
    x = SparseFactorDense.from_factors(activation="relu", **factors("dense_1"))(x)
    outputs = SparseFactorDense.from_factors(**factors("dense_2"))(x)
    return keras.Model(inputs, outputs), data["check_inputs"], data["keras_outputs"]


@pytest.fixture(scope="module")
def dense_lenet_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "lenet.tflite"
    return os.path.getsize(export.to_tflite(demo.lenet5(), path, sparse=False))


def test_reported_model_exports_small_and_right(tmp_path, dense_lenet_bytes):
    model, x, keras_outputs = lenet_psm_q2k4()
    # The same factors through TensorFlow float32 kernels: ~1e-6 on logits of order 10.
    np.testing.assert_allclose(model.predict(x, verbose=0), keras_outputs, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # no candidate is rejected
        path = export.to_tflite(model, tmp_path / "psm.tflite", inputs=x)
    assert os.path.getsize(path) * 5 <= dense_lenet_bytes
    assert export.verify_tflite(path, model, x) < 1e-4


def test_sequence_that_cannot_be_sparse_falls_back_to_the_product(
        tmp_path, monkeypatch, dense_lenet_bytes):
    # Without the route around the fault, the sparse-encoded sequence computes wrong numbers.
    monkeypatch.setattr(export, "drops_inputs", lambda matrix: False)
    model, x, _ = lenet_psm_q2k4()
    with pytest.warns(RuntimeWarning, match="keeps the product form"):
        path = export.to_tflite(model, tmp_path / "psm.tflite", inputs=x)
    assert os.path.getsize(path) <= dense_lenet_bytes
    assert export.verify_tflite(path, model, x) < 1e-4
