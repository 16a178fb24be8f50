"""Data for examples, the demo and the benchmarks.

Two real data sets are bundled with the package and need no network (see
``keras_psm/data/README.md`` for their sources and licences):

- ``"mnist_5k"``: 5,000 MNIST digits (500 per class), ``load_mnist_5k``;
- ``"fashion_mnist_5k"``: 5,000 Fashion-MNIST article images, the first 400
  of each class of the official training split and the first 100 of each
  class of the test split, ``load_fashion_mnist_5k``. Harder than the
  digits, so compression methods separate more clearly.

``load_dataset`` also reaches the full ``"mnist"``, ``"fashion_mnist"`` and
``"cifar10"`` of ``keras.datasets``; offline, the first two fall back to
their bundled subset with a warning.
"""

import warnings
from importlib import resources

import numpy as np

from keras_psm.validation import check_choice, check_int

DATASETS = ("mnist_5k", "fashion_mnist_5k", "mnist", "fashion_mnist", "cifar10")

#: The bundled subset that stands in for a full ``keras.datasets`` set offline.
BUNDLED_SUBSET = {"mnist": "mnist_5k", "fashion_mnist": "fashion_mnist_5k"}


def _bundled_arrays(file_name):
    """The arrays of ``keras_psm/data/<file_name>`` as a dict."""
    with resources.files("keras_psm").joinpath("data", file_name).open("rb") as handle:
        with np.load(handle) as data:
            return {key: data[key] for key in data.files}


def _scaled(images, labels):
    """uint8 images -> float32 in [0, 1], channels last ((n, h, w) gets a channel); int64 labels."""
    images = images.astype("float32") / 255.0
    if images.ndim == 3:
        images = images[..., None]
    return images, labels.reshape(-1).astype("int64")


def load_mnist_5k(test_size=1000, seed=0):
    """The bundled digits, shuffled and split: ``(x_train, y_train), (x_test, y_test)``.

    Images are float32 in [0, 1] of shape (n, 28, 28, 1); labels int64 0-9.
    """
    check_int(test_size, "test_size", minimum=1, maximum=4999)
    data = _bundled_arrays("mnist_5k.npz")
    order = np.random.default_rng(seed).permutation(len(data["x"]))
    x, y = _scaled(data["x"][order], data["y"][order])
    return (x[test_size:], y[test_size:]), (x[:test_size], y[:test_size])


def load_fashion_mnist_5k(seed=0):
    """The bundled Fashion-MNIST images: ``(x_train, y_train), (x_test, y_test)``.

    4,000 training and 1,000 test images from the official splits (400 and
    100 per class), each split shuffled with ``seed``. Images are float32 in
    [0, 1] of shape (n, 28, 28, 1); labels int64 0-9 (T-shirt/top, trouser,
    pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot).
    """
    data = _bundled_arrays("fashion_mnist_5k.npz")
    rng = np.random.default_rng(seed)
    splits = []
    for split in ("train", "test"):
        order = rng.permutation(len(data[f"y_{split}"]))
        splits.append(_scaled(data[f"x_{split}"][order], data[f"y_{split}"][order]))
    return tuple(splits)


_BUNDLED = {"mnist_5k": load_mnist_5k, "fashion_mnist_5k": load_fashion_mnist_5k}


def load_dataset(name="mnist_5k", seed=0):
    """``(x_train, y_train), (x_test, y_test)`` scaled to [0, 1], channels last.

    ``"mnist_5k"`` and ``"fashion_mnist_5k"`` are bundled (shuffled with
    ``seed``). The others come from ``keras.datasets``, which downloads them
    the first time; when that fails, ``"mnist"`` and ``"fashion_mnist"``
    fall back to their bundled subset with a ``RuntimeWarning``, and
    ``"cifar10"`` raises the download error.
    """
    check_choice(name, "dataset", DATASETS)
    if name in _BUNDLED:
        return _BUNDLED[name](seed=seed)
    from keras_psm.backend import keras

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as error:  # keras.datasets raises a bare Exception on download failure
        if name not in BUNDLED_SUBSET:
            raise
        subset = BUNDLED_SUBSET[name]
        warnings.warn(
            f"could not load the full {name!r} data set from keras.datasets "
            f"({type(error).__name__}: {' '.join(str(error).split())}); using the bundled "
            f"{subset!r} subset instead.", RuntimeWarning, stacklevel=2)
        return _BUNDLED[subset](seed=seed)
    return _scaled(x_train, y_train), _scaled(x_test, y_test)
