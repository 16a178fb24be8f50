"""Shared fixtures: small models and the bundled MNIST digits."""

import pytest

from keras_psm.backend import keras
from keras_psm.datasets import load_mnist_5k


@pytest.fixture(scope="session")
def mnist_small():
    """1,000 training and 500 test digits, scaled to [0, 1], shape (n, 28, 28, 1)."""
    (x_train, y_train), (x_test, y_test) = load_mnist_5k(test_size=500, seed=0)
    return (x_train[:1000], y_train[:1000]), (x_test, y_test)


def build_lenet(sequential=False, seed=0):
    """A LeNet-5-style CNN for 28x28x1 digits (functional or Sequential)."""
    keras.utils.set_random_seed(seed)
    layers = [
        keras.layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(name="pool1"),
        keras.layers.Conv2D(16, 5, activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(120, activation="relu", name="fc1"),
        keras.layers.Dense(84, activation="relu", name="fc2"),
        keras.layers.Dense(10, activation="softmax", name="fc3"),
    ]
    if sequential:
        return keras.Sequential([keras.Input((28, 28, 1))] + layers, name="lenet_seq")
    inputs = keras.Input((28, 28, 1))
    outputs = inputs
    for layer in layers:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name="lenet")


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
