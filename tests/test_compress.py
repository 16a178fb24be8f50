"""compress(): layer replacement, the report, and what it must never do."""

import concurrent.futures
import multiprocessing

import numpy as np
import pytest

import keras_psm
from keras_psm.backend import keras
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
from keras_psm.ops import convert_to_numpy as to_numpy


def relative_error(kernel, approximation):
    return np.linalg.norm(kernel - approximation) / np.linalg.norm(kernel)


def weights_of(model):
    return [w.copy() for w in model.get_weights()]


@pytest.mark.parametrize("n_factors", [2, 3])
@pytest.mark.slow
def test_report_errors_match_kernels_and_decrease_with_k(trained_lenet, n_factors):
    errors = []
    for sparsity in (2, 4, 8, 14):
        model, report = keras_psm.compress(
            trained_lenet, n_factors=n_factors, sparsity=sparsity, max_iter=60, verbose=0)
        rows = {row.name: row for row in report.compressed}
        assert sorted(rows) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
        for name, row in rows.items():
            original = trained_lenet.get_layer(name).get_weights()[0]
            new_layer = model.get_layer(name)
            kernel = to_numpy(new_layer.kernel)
            assert kernel.shape == original.shape
            assert abs(relative_error(original, kernel) - row.relative_error) < 1e-5
            assert row.params_before == trained_lenet.get_layer(name).count_params()
            assert row.params_after == new_layer.count_nonzero_params()
            assert len(new_layer.masks) == n_factors
        errors.append(np.mean([row.relative_error for row in rows.values()]))
        assert report.params_after < report.params_before or sparsity >= 8
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_types_and_untouched_layers_keep_their_weights(trained_lenet, mnist_small):
    model, report = keras_psm.compress(trained_lenet, n_factors=2, sparsity=4, max_iter=30,
                                       layers=["conv2", "fc1"], verbose=0)
    assert isinstance(model.get_layer("conv2"), SparseFactorConv2D)
    assert isinstance(model.get_layer("fc1"), SparseFactorDense)
    for name in ("conv1", "fc2", "fc3"):
        assert type(model.get_layer(name)) is type(trained_lenet.get_layer(name))
        for a, b in zip(model.get_layer(name).get_weights(),
                        trained_lenet.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert {row.name: row.note for row in report.skipped} == {
        "conv1": "not selected", "fc2": "not selected", "fc3": "not selected"}
    assert model.get_layer("fc1").activation is keras.activations.relu


@pytest.mark.slow
def test_input_model_is_never_mutated_and_compressed_model_trains(trained_lenet, mnist_small):
    (x, y), (x_test, y_test) = mnist_small
    before = weights_of(trained_lenet)
    model, _ = keras_psm.compress(trained_lenet, n_factors=2, sparsity=4, max_iter=50, verbose=0)
    nnz = {layer.name: layer.count_nonzero_params() for layer in model.layers
           if hasattr(layer, "masks")}
    model.compile(keras.optimizers.RMSprop(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    loss_before, accuracy_before = model.evaluate(x_test, y_test, verbose=0)
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    loss_after, accuracy_after = model.evaluate(x_test, y_test, verbose=0)
    # One epoch on 1,000 digits from about 0.2: 0.45 to 0.63 on TensorFlow and JAX. 0.15 is
    # more than six standard deviations of an accuracy on 500 test digits.
    assert loss_after < loss_before
    assert accuracy_after > accuracy_before + 0.15
    for a, b in zip(before, trained_lenet.get_weights()):
        np.testing.assert_array_equal(a, b)
    for name, count in nnz.items():
        assert model.get_layer(name).count_nonzero_params() == count


def test_sequential_model_round_trips_exactly(make_lenet, tmp_path):
    original = make_lenet(sequential=True)
    model, report = keras_psm.compress(original, n_factors=3, sparsity=2, max_iter=20, verbose=0)
    assert isinstance(model, keras.Sequential)
    assert len(report.compressed) == 5
    path = str(tmp_path / "psm.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    x = np.random.default_rng(0).random((4, 28, 28, 1)).astype("float32")
    # Same weights; oneDNN may pick other kernels per graph: float32 rounding, below 1e-5.
    np.testing.assert_allclose(model.predict(x, verbose=0), reloaded.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_unsupported_layers_are_kept_and_reported():
    inputs = keras.Input((12, 12, 4))
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(inputs)
    x = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Conv2DTranspose(4, 3, name="transpose")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    original = keras.Model(inputs, outputs)
    model, report = keras_psm.compress(original, n_factors=2, sparsity=2, max_iter=10, verbose=0)
    assert [row.name for row in report.compressed] == ["head"]
    skipped = {row.name: row.note for row in report.skipped}
    assert set(skipped) == {"depthwise", "grouped", "bn", "transpose"}
    assert "groups=2" in skipped["grouped"]
    x = np.random.default_rng(0).random((2, 12, 12, 4)).astype("float32")
    for name in skipped:
        for a, b in zip(model.get_layer(name).get_weights(),
                        original.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert model(x).shape == (2, 3)
    assert "skipped" in str(report) and "head" in str(report)


def test_nested_models_are_compressed_inside():
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="inner_dense")],
                             name="block")
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(2, name="outer_dense")(inner(inputs))
    original = keras.Model(inputs, outputs)
    model, report = keras_psm.compress(original, n_factors=2, sparsity=6, verbose=0)
    assert {row.name for row in report.compressed} == {"inner_dense", "outer_dense"}
    x = np.random.default_rng(0).random((5, 6)).astype("float32")
    # K = 6 keeps every entry of these small factors, so the fit is exact.
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(original(x)), atol=1e-3)


def test_predicate_selection(trained_lenet):
    _, report = keras_psm.compress(
        trained_lenet, layers=lambda layer: isinstance(layer, keras.layers.Dense),
        n_factors=2, sparsity=2, max_iter=5, verbose=0)
    assert [row.name for row in report.compressed] == ["fc1", "fc2", "fc3"]


def test_bad_input_raises_clear_errors(trained_lenet):
    with pytest.raises(ValueError, match="sparsity"):
        keras_psm.compress(trained_lenet, sparsity=0, verbose=0)
    with pytest.raises(ValueError, match="n_factors"):
        keras_psm.compress(trained_lenet, n_factors=0, verbose=0)
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        keras_psm.compress(trained_lenet, layers=["fc1", "nope"], verbose=0)
    with pytest.raises(ValueError, match="'pool1' cannot be replaced"):
        keras_psm.compress(trained_lenet, layers=["pool1"], verbose=0)
    with pytest.raises(ValueError, match="`method` must be one of"):
        keras_psm.compress(trained_lenet, method="magic", verbose=0)
    with pytest.raises(TypeError, match="no option"):
        keras_psm.compress(trained_lenet, n_factor=2, verbose=0)
    with pytest.raises(TypeError, match="Keras model"):
        keras_psm.compress("model.keras", verbose=0)


def test_nan_weights_name_the_layer(make_lenet):
    model = make_lenet()
    kernel, bias = model.get_layer("fc2").get_weights()
    kernel[0, 0] = np.nan
    model.get_layer("fc2").set_weights([kernel, bias])
    with pytest.raises(ValueError, match="layer 'fc2'.*NaN"):
        keras_psm.compress(model, verbose=0)


def test_subclassed_model_is_refused_with_a_reason():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, inputs):
            return self.dense(inputs)

    net = Net()
    net(np.ones((1, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed"):
        keras_psm.compress(net, verbose=0)


def test_thread_pool_executor_gives_the_serial_result(trained_lenet):
    serial, serial_report = keras_psm.compress(trained_lenet, n_factors=2, sparsity=3,
                                               max_iter=20, verbose=0)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        parallel, parallel_report = keras_psm.compress(
            trained_lenet, n_factors=2, sparsity=3, max_iter=20, executor=pool, verbose=0)
    for a, b in zip(serial.get_weights(), parallel.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [r.relative_error for r in serial_report.rows] == [
        r.relative_error for r in parallel_report.rows]


@pytest.mark.slow
def test_process_pool_executor(trained_lenet):
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        model, report = keras_psm.compress(trained_lenet, n_factors=2, sparsity=3, max_iter=20,
                                           executor=pool, verbose=0)
    serial, _ = keras_psm.compress(trained_lenet, n_factors=2, sparsity=3, max_iter=20, verbose=0)
    for a, b in zip(serial.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(report.compressed) == 5


def test_progress_bar_and_report_print(trained_lenet, capsys):
    _, report = keras_psm.compress(trained_lenet, n_factors=2, sparsity=2, max_iter=5, verbose=1)
    captured = capsys.readouterr()
    assert "fc1" in captured.out and "total" in captured.out
    assert "psm" in captured.err  # the tqdm bar
    assert report.compression_ratio == pytest.approx(
        report.params_before / report.params_after)
