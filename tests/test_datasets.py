"""The bundled data sets and the offline fallback of ``load_dataset``."""

from importlib import resources

import numpy as np
import pytest

from keras_psm.backend import keras
from keras_psm.datasets import DATASETS, load_dataset, load_fashion_mnist_5k, load_mnist_5k


def raw_fashion():
    with resources.files("keras_psm").joinpath("data/fashion_mnist_5k.npz").open("rb") as handle:
        with np.load(handle) as data:
            return {key: data[key] for key in data.files}


def test_fashion_mnist_5k_shapes_types_and_classes():
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist_5k(seed=0)
    assert x_train.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    assert 0.0 <= x_train.min() and x_train.max() == 1.0 and x_test.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y_train), [400] * 10)
    np.testing.assert_array_equal(np.bincount(y_test), [100] * 10)
    assert len(set(y_train[:100].tolist())) == 10  # shuffled: the classes are mixed


def test_fashion_mnist_5k_keeps_each_image_with_its_label_and_split():
    raw = raw_fashion()
    for seed in (0, 1):
        for (x, y), split in zip(load_fashion_mnist_5k(seed=seed), ("train", "test")):
            # Back to grey levels: v / 255 in float32 is within 255 * 2**-24 of the level's
            # float, far below 0.5, so rounding recovers the file's uint8 exactly.
            levels = np.rint(x[..., 0] * 255.0).astype(np.uint8)
            for label in range(10):  # each class holds exactly its own images
                assert sorted(image.tobytes() for image in levels[y == label]) == sorted(
                    image.tobytes() for image in raw[f"x_{split}"][raw[f"y_{split}"] == label])
    first, again, other = (load_fashion_mnist_5k(seed=s)[0][1] for s in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_load_dataset_reads_the_bundled_sets():
    (x, y), (x_test, y_test) = load_dataset("fashion_mnist_5k", seed=3)
    np.testing.assert_array_equal(y, load_fashion_mnist_5k(seed=3)[0][1])
    (x, y), (x_test, y_test) = load_dataset("mnist_5k")
    assert x.shape == (4000, 28, 28, 1) and x_test.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(y_test, load_mnist_5k()[1][1])
    with pytest.raises(ValueError, match="`dataset` must be one of"):
        load_dataset("imagenet")
    assert {"mnist_5k", "fashion_mnist_5k", "fashion_mnist"} <= set(DATASETS)


def offline(*args, **kwargs):
    raise Exception("URL fetch failure on https://storage.googleapis.com: Name or service "
                    "not known")


def test_offline_fashion_mnist_falls_back_to_the_bundled_subset(monkeypatch):
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.warns(RuntimeWarning, match="could not load the full 'fashion_mnist' data set "
                                            r".*URL fetch failure.*using the bundled "
                                            "'fashion_mnist_5k' subset instead"):
        (x, y), (x_test, y_test) = load_dataset("fashion_mnist", seed=2)
    (x_bundled, y_bundled), _ = load_fashion_mnist_5k(seed=2)
    np.testing.assert_array_equal(x, x_bundled)
    np.testing.assert_array_equal(y, y_bundled)

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(Exception, match="URL fetch failure"):  # no bundled stand-in
        load_dataset("cifar10")


def test_a_full_set_is_scaled_like_the_bundled_ones(monkeypatch):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([[3], [7]], dtype=np.uint8)
    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data",
                        lambda: ((images, labels), (images[:1], labels[:1])))
    (x, y), (x_test, y_test) = load_dataset("fashion_mnist")
    assert x.shape == (2, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=1e-6)  # float32 rounding
    np.testing.assert_array_equal(y, [3, 7])
    assert y.dtype == np.int64 and y_test.tolist() == [3]
