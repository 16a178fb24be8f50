"""Shared fixtures: one random state per test, small models, the bundled MNIST digits,
gradients on any backend, and the ``tensorflow`` marker."""

import numpy as np
import pytest

from keras_psm import demo
from keras_psm.backend import BACKEND, keras
from keras_psm.datasets import load_mnist_5k
from keras_psm.ops import convert_to_numpy as to_numpy

#: Test files whose every test needs TensorFlow itself (TFLite export and LiteRT,
#: the command line and demo that export, pruning-at-init scores through
#: TensorFlow's gradient tape): skipped, like tests marked ``tensorflow``, on other
#: Keras backends.
TENSORFLOW_FILES = {"test_export.py", "test_litert_faults.py", "test_cli.py", "test_demo.py",
                    "test_zoo.py", "test_pruning_at_init.py"}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tensorflow: needs TensorFlow itself (tf.function, GradientTape, TFLite, "
        "tf.distribute); skipped when Keras runs on another backend")


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason=f"needs TensorFlow itself; Keras runs on {BACKEND}")
    for item in items:
        if item.get_closest_marker("tensorflow") or item.path.name in TENSORFLOW_FILES:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def same_random_state():
    """Every test starts from one random state (Python, NumPy and the Keras backend): a
    layer built without a seed gets the same weights in every run, whichever tests ran
    before it, so a failure in the whole suite reproduces with the test alone."""
    keras.utils.set_random_seed(0)


def gradients(loss, variables):
    """``d loss() / d variables`` on the current backend, as NumPy arrays.

    ``loss`` is a function of no argument that reads ``variables`` (Keras
    variables, e.g. a layer's weights) and returns a scalar.
    """
    if BACKEND == "jax":
        import jax

        def pure(values):
            with keras.StatelessScope(state_mapping=list(zip(variables, values)),
                                      collect_losses=True):
                return loss()

        return [to_numpy(g) for g in jax.grad(pure)([v.value for v in variables])]
    if BACKEND == "torch":
        for variable in variables:
            variable.value.grad = None
        loss().backward()
        return [variable.value.grad.cpu().numpy() for variable in variables]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        value = loss()
    return [to_numpy(g) for g in tape.gradient(value, variables)]


@pytest.fixture(scope="session")
def mnist_small():
    """1,000 training and 500 test digits, scaled to [0, 1], shape (n, 28, 28, 1)."""
    (x_train, y_train), (x_test, y_test) = load_mnist_5k(test_size=500, seed=0)
    return (x_train[:1000], y_train[:1000]), (x_test, y_test)


def build_lenet(sequential=False, seed=0):
    """The demo's LeNet-5 for 28x28x1 digits, functional or as a Sequential model."""
    model = demo.lenet5(seed=seed)
    if not sequential:
        return model
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    return keras.Sequential([keras.Input((28, 28, 1))] + layers, name="lenet_seq")


@pytest.fixture
def make_lenet():
    """The LeNet builder, ``make_lenet(sequential=False, seed=0)``."""
    return build_lenet


@pytest.fixture(scope="session")
def trained_lenet(mnist_small):
    """A functional LeNet trained for two epochs on 1,000 digits."""
    (x, y), _ = mnist_small
    model = build_lenet()
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    return model


def check_fine_tunes_and_round_trips(compressed, data, path):
    """Two epochs of ``fit`` lower the test loss and raise the accuracy, and the
    ``.keras`` file at ``path`` reloads (no custom_objects) to identical outputs.
    Returns the reloaded model."""
    (x, y), (x_test, y_test) = data
    compressed.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                       metrics=["accuracy"])
    loss_before, accuracy_before = compressed.evaluate(x_test, y_test, verbose=0)
    compressed.fit(x, y, epochs=2, batch_size=64, verbose=0)
    loss_after, accuracy_after = compressed.evaluate(x_test, y_test, verbose=0)
    assert loss_after < loss_before and accuracy_after > accuracy_before
    compressed.save(str(path))
    reloaded = keras.models.load_model(str(path))
    # Same weights, possibly different kernels (oneDNN and the CPU's instruction set choose
    # them per graph): float32 rounding of sums of a few hundred terms, far below 1e-5.
    np.testing.assert_allclose(compressed.predict(x_test[:16], verbose=0),
                               reloaded.predict(x_test[:16], verbose=0), rtol=1e-5, atol=1e-6)
    return reloaded


def check_exports_to_tflite(model, x, path, **options):
    """``to_tflite`` writes ``path`` and LiteRT's outputs on ``x`` match the model's
    within to_tflite's float32 tolerance (1e-4 of the outputs' scale). Returns the path."""
    import keras_psm

    # to_tflite writes the file only after LiteRT ran it and matched the model;
    # the check is made again here so the test states it.
    path = keras_psm.to_tflite(model, str(path), inputs=x, **options)
    scale = max(1.0, float(np.abs(to_numpy(model(x))).max()))
    assert keras_psm.verify_tflite(path, model, x) <= 1e-4 * scale
    return path
