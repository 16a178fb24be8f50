"""Data for examples, the demo and the benchmarks.

``load_mnist_5k`` needs no network: it reads the 5,000 real MNIST digits
bundled with the package (500 per class; see ``keras_psm/data/README.md`` for
source and attribution). ``load_dataset`` also reaches the full data sets of
``keras.datasets`` when the network allows.
"""

from importlib import resources

import numpy as np

from keras_psm.validation import check_choice, check_int

DATASETS = ("mnist_5k", "mnist", "fashion_mnist", "cifar10")


def load_mnist_5k(test_size=1000, seed=0):
    """The bundled digits, shuffled and split: ``(x_train, y_train), (x_test, y_test)``.

    Images are float32 in [0, 1] of shape (n, 28, 28, 1); labels int64 0-9.
    """
    check_int(test_size, "test_size", minimum=1, maximum=4999)
    with resources.files("keras_psm").joinpath("data/mnist_5k.npz").open("rb") as handle:
        data = np.load(handle)
        x, y = data["x"], data["y"]
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order].astype("float32") / 255.0)[..., None]
    y = y[order].astype("int64")
    return (x[test_size:], y[test_size:]), (x[:test_size], y[:test_size])


def load_dataset(name="mnist_5k", seed=0):
    """``(x_train, y_train), (x_test, y_test)`` scaled to [0, 1], channels last.

    ``"mnist_5k"`` is bundled; the others come from ``keras.datasets`` and
    need the network the first time.
    """
    check_choice(name, "dataset", DATASETS)
    if name == "mnist_5k":
        return load_mnist_5k(seed=seed)
    from keras_psm.backend import keras

    (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., None], x_test[..., None]
    return (
        (x_train.astype("float32") / 255.0, y_train.reshape(-1).astype("int64")),
        (x_test.astype("float32") / 255.0, y_test.reshape(-1).astype("int64")),
    )
