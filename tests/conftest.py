"""Shared fixtures: small models and the bundled MNIST digits."""

import pytest

from keras_psm import demo
from keras_psm.backend import keras
from keras_psm.datasets import load_mnist_5k


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
