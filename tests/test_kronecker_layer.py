"""KroneckerDense, KroneckerPatternDense and method="kpd" against materialized kernels."""

import numpy as np
import pytest

import keras_psm
from conftest import gradients
from keras_psm import ops
from keras_psm.backend import keras
from keras_psm.datasets import load_mnist_5k
from keras_psm.factorize.kronecker import kronecker_sum, nearest_kronecker_sum
from keras_psm.ops import convert_to_numpy as to_numpy
from keras_psm.layers import (
    KroneckerDense,
    KroneckerPatternDense,
    PenaltySchedule,
    keep_selected_patterns,
    select_pattern,
)

# (in, units, block): both contraction orders, and sizes the blocks do not tile.
SHAPES = [(12, 10, (4, 5)), (64, 64, (2, 16)), (784, 10, (16, 2)), (13, 7, (4, 2))]


def reference_kernel(layer):
    """The kernel from the layer's weights with np.kron, cropped to (in, units)."""
    s = to_numpy(layer.s) * to_numpy(layer.s_mask)
    kernel = sum(np.kron(s * a, b) for a, b in zip(to_numpy(layer.a), to_numpy(layer.b)))
    return kernel[:layer.geometry.n_in, :layer.units]


@pytest.mark.parametrize("n_in, units, block", SHAPES)
def test_forward_equals_inputs_times_materialized_kernel(n_in, units, block):
    layer = KroneckerDense(units, block, rank=3, seed=0, activation="tanh")
    x = np.random.default_rng(1).standard_normal((6, n_in)).astype("float32")
    layer.build((None, n_in))
    layer.bias.assign(np.linspace(-1, 1, units).astype("float32"))
    kernel = reference_kernel(layer)
    expected = np.tanh(x @ kernel + to_numpy(layer.bias))
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.kernel), kernel, rtol=1e-5, atol=1e-6)
    materialized = KroneckerDense.from_config({**layer.get_config(), "compute": "materialized"})
    materialized.build((None, n_in))
    materialized.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(materialized(x)), expected, rtol=1e-5, atol=1e-5)
    x3 = x.reshape(2, 3, n_in)
    np.testing.assert_allclose(to_numpy(layer(x3)), expected.reshape(2, 3, units),
                               rtol=1e-5, atol=1e-5)
    assert layer.compute_output_shape((2, 3, n_in)) == (2, 3, units)


def test_both_contraction_orders_are_exercised():
    orders = set()
    for n_in, units, block in SHAPES:
        layer = KroneckerDense(units, block)
        layer.build((None, n_in))
        orders.add(layer.geometry.blocks_first)
    assert orders == {True, False}


@pytest.mark.parametrize("n_in, units, block", SHAPES[:3])
def test_gradients_match_the_materialized_computation(n_in, units, block):
    layer = KroneckerDense(units, block, rank=2, seed=3, l1=0.1)
    x = np.random.default_rng(0).standard_normal((5, n_in)).astype("float32")
    y = np.random.default_rng(1).standard_normal((5, units)).astype("float32")
    y = ops.convert_to_tensor(y)  # a NumPy y would turn layer(x) - y into NumPy on torch
    layer(x)

    def factored():
        return ops.sum((layer(x) - y) ** 2) + sum(layer.losses)

    def dense():
        return (ops.sum((ops.matmul(x, layer.kernel) + layer.bias - y) ** 2)
                + 0.1 * ops.sum(ops.abs(layer.s)))

    variables = [layer.s, layer.a, layer.b, layer.bias]
    np.testing.assert_allclose(to_numpy(factored()), to_numpy(dense()), rtol=1e-5)
    for got, want in zip(gradients(factored, variables), gradients(dense, variables)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    layer(x)
    assert len(layer.losses) == 1   # one penalty per call
    # A float32 sum of 16 terms against float64: within 16 float32 roundings (~1e-6).
    assert to_numpy(layer.losses[0]) == pytest.approx(0.1 * np.abs(to_numpy(layer.s)).sum(),
                                                        rel=1e-5)


def test_sparsify_zeroes_blocks_for_good_and_counts():
    layer = KroneckerDense(8, (4, 2), rank=2, seed=0, l1=0.05)
    model = keras.Sequential([keras.Input((16,)), layer])
    s = np.arange(16, dtype="float32").reshape(4, 4) / 16.0
    layer.s.assign(s)
    sparsity = layer.sparsify(0.3)
    assert sparsity == layer.block_sparsity == np.mean(s <= 0.3)
    kernel = to_numpy(layer.kernel)
    for p, q in zip(*np.nonzero(s <= 0.3)):
        assert not kernel[4 * p:4 * p + 4, 2 * q:2 * q + 2].any()
    expected_count = np.count_nonzero(to_numpy(layer.s)[None] * to_numpy(layer.a)) \
        + np.count_nonzero(to_numpy(layer.b)) + 8
    assert layer.count_nonzero_params() == expected_count
    rng = np.random.default_rng(0)
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(rng.standard_normal((64, 16)), rng.standard_normal((64, 8)), epochs=2, verbose=0)
    assert layer.block_sparsity == sparsity
    assert not (to_numpy(layer.s) * to_numpy(layer.s_mask))[s <= 0.3].any()


@pytest.mark.slow
def test_l1_penalty_shrinks_s_during_fit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((128, 16)).astype("float32")
    y = x @ rng.standard_normal((16, 8)).astype("float32")
    norms = []
    for l1 in (0.0, 0.5):
        keras.utils.set_random_seed(0)
        layer = KroneckerDense(8, (2, 2), rank=2, seed=0, l1=l1)
        model = keras.Sequential([keras.Input((16,)), layer])
        model.compile(keras.optimizers.Adam(0.02), "mse")
        model.fit(x, y, epochs=10, batch_size=32, verbose=0)
        norms.append(np.abs(to_numpy(layer.s)).sum())
    assert norms[1] < 0.5 * norms[0]


def test_keras_round_trip_is_exact_without_custom_objects(tmp_path):
    inputs = keras.Input((13,))
    hidden = KroneckerDense(7, (4, 2), rank=2, seed=1, l1=0.01, activation="relu")(inputs)
    outputs = KroneckerPatternDense(6, [(7, 3), (1, 2)], rank=2, factor_decay=0.5,
                                    seed=2)(hidden)
    model = keras.Model(inputs, outputs)
    model.layers[1].s.assign(np.random.default_rng(0).random((4, 4)).astype("float32"))
    assert 0 < model.layers[1].sparsify(0.5) < 1
    model.layers[1].set_penalty(0.25)
    path = str(tmp_path / "kronecker.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    x = np.random.default_rng(0).standard_normal((4, 13)).astype("float32")
    # Same weights, possibly different kernels (oneDNN and the CPU's instruction set choose
    # them per graph): float32 rounding of sums of a few hundred terms, far below 1e-5.
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(reloaded(x)), rtol=1e-5, atol=1e-6)
    for a, b in zip(model.weights, reloaded.weights):  # stored values: bit for bit
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert reloaded.layers[1].get_config() == model.layers[1].get_config()
    assert to_numpy(reloaded.layers[1].l1_strength) == 0.25
    assert reloaded.layers[2].block_shapes == [(7, 3), (1, 2)]
    assert reloaded.layers[2].factor_decay == 0.5


def test_constructor_errors_name_the_layer_and_argument():
    with pytest.raises(ValueError, match="KroneckerDense 'k'.*`block_shape`"):
        KroneckerDense(4, (2, 0), name="k")
    with pytest.raises(ValueError, match="KroneckerDense 'k'.*`rank` must be >= 1"):
        KroneckerDense(4, 2, rank=0, name="k")
    with pytest.raises(ValueError, match="`compute` must be one of"):
        KroneckerDense(4, 2, compute="sparse")
    with pytest.raises(ValueError, match="`l1` must be >= 0.0"):
        KroneckerDense(4, 2, l1=-1.0)
    with pytest.raises(ValueError, match="KroneckerPatternDense 'p'.*at least two block shapes"):
        KroneckerPatternDense(4, [(2, 2)], name="p")
    with pytest.raises(ValueError, match="repeats a block shape"):
        KroneckerPatternDense(4, [(2, 2), 2])
    with pytest.raises(ValueError, match="KroneckerPatternDense 'p'.*`factor_decay`"):
        KroneckerPatternDense(4, [(2, 2), (4, 4)], factor_decay=-0.1, name="p")
    with pytest.raises(TypeError, match="PenaltySchedule.*`stop_when_one_remains`"):
        PenaltySchedule(stop_when_one_remains="yes")
    with pytest.raises(ValueError, match="PenaltySchedule.*`tolerance`"):
        PenaltySchedule(tolerance=2.0)
    with pytest.raises(ValueError, match="last input dimension must be known"):
        KroneckerDense(4, 2).build((None, None))


def test_pattern_layer_is_the_sum_of_its_patterns():
    layer = KroneckerPatternDense(10, [(2, 2), (4, 5), (3, 2)], rank=2, seed=0, group=0.5,
                                  l1=0.25, factor_decay=0.125)
    x = np.random.default_rng(0).standard_normal((3, 12)).astype("float32")
    out = to_numpy(layer(x))
    expected_kernel = 0
    for k, block in enumerate(layer.block_shapes):
        s, a, b = to_numpy(layer.s[k]), to_numpy(layer.a[k]), to_numpy(layer.b[k])
        expected_kernel = expected_kernel + kronecker_sum(s[None] * a, b)[:12, :10]
    np.testing.assert_allclose(out, x @ expected_kernel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.kernel), expected_kernel, rtol=1e-5, atol=1e-6)
    penalty = sum(0.5 * np.linalg.norm(to_numpy(s)) + 0.25 * np.abs(to_numpy(s)).sum()
                  + 0.125 * (np.sum(to_numpy(a) ** 2) + np.sum(to_numpy(b) ** 2))
                  for s, a, b in zip(layer.s, layer.a, layer.b))
    assert to_numpy(layer.losses[0]) == pytest.approx(penalty, rel=1e-5)
    kernel_norms = [np.linalg.norm(kronecker_sum(to_numpy(s)[None] * to_numpy(a),
                                                 to_numpy(b)))
                    for s, a, b in zip(layer.s, layer.a, layer.b)]
    np.testing.assert_allclose(layer.kernel_norms(), kernel_norms, rtol=1e-5)
    assert layer.selected_pattern == int(np.argmax(kernel_norms))
    selected = select_pattern(layer)
    assert isinstance(selected, KroneckerDense) and selected.name == layer.name
    assert selected.block_shape == layer.block_shapes[layer.selected_pattern]


@pytest.mark.slow
def test_penalty_schedule_raises_strengths_every_few_epochs():
    pattern = KroneckerPatternDense(4, [(2, 2), (4, 4)], rank=1, seed=0, name="pattern")
    dense = KroneckerDense(4, 2, rank=1, seed=0)
    model = keras.Sequential([keras.Input((8,)), dense, pattern])
    model.compile("sgd", "mse")
    schedule = PenaltySchedule(start=0.01, step=0.002, every=5)
    assert [schedule.strength(e) for e in (0, 4, 5, 12)] == pytest.approx(
        [0.01, 0.01, 0.012, 0.014])
    model.fit(np.ones((8, 8)), np.zeros((8, 4)), epochs=11, verbose=0, callbacks=[schedule])
    for strength in (pattern.group_strength, pattern.l1_strength, dense.l1_strength):
        assert to_numpy(strength) == pytest.approx(0.014)
    assert len(schedule.history["pattern"]) == 11
    assert schedule.history["pattern"][-1].shape == (2,)
    assert schedule.stopped_epoch is None


@pytest.mark.slow
def test_penalty_schedule_stops_when_one_pattern_remains():
    pattern = KroneckerPatternDense(4, [(2, 2), (4, 4)], rank=1, seed=0)
    model = keras.Sequential([keras.Input((8,)), pattern])
    model.compile("sgd", "mse")
    x, y = np.ones((8, 8)), np.zeros((8, 4))
    schedule = PenaltySchedule(stop_when_one_remains=True)
    model.fit(x, y, epochs=3, verbose=0, callbacks=[schedule])
    assert schedule.stopped_epoch is None and len(schedule.history[pattern.name]) == 3
    pattern.s[1].assign(np.zeros_like(to_numpy(pattern.s[1])))  # pattern 1 is gone
    assert pattern.surviving_patterns(tolerance=0.01) == [0]
    schedule = PenaltySchedule(stop_when_one_remains=True)
    model.fit(x, model.predict(x, verbose=0), epochs=5, verbose=0, callbacks=[schedule])
    assert schedule.stopped_epoch == 1 and len(schedule.history[pattern.name]) == 1


@pytest.mark.slow
def test_pattern_selection_keeps_the_true_block_pattern():
    # Target: one block-sparse rank-1 term with 4 x 4 blocks; rank-1 candidates of 2 x 2 or
    # 8 x 8 blocks cannot represent it, so the group penalty should leave only 4 x 4
    # (on this regression problem Adam separates the patterns, plain SGD does not).
    rng = np.random.default_rng(0)
    s = (rng.random((8, 4)) < 0.6).astype(float)
    target = kronecker_sum(rng.standard_normal((1, 8, 4)) * s, rng.standard_normal((1, 4, 4)))
    x = rng.standard_normal((512, 32)).astype("float32")
    y = (x @ target).astype("float32")
    keras.utils.set_random_seed(0)
    layer = KroneckerPatternDense(16, [(2, 2), (4, 4), (8, 8)], rank=1, seed=0, use_bias=False)
    model = keras.Sequential([keras.Input((32,)), layer])
    model.compile(keras.optimizers.Adam(0.02), "mse")
    model.fit(x, y, epochs=60, batch_size=64, verbose=0,
              callbacks=[PenaltySchedule(start=0.01, step=0.005, every=5)])
    assert layer.surviving_patterns(tolerance=0.2) == [1]
    selected = keep_selected_patterns(model)
    kept = selected.layers[-1]
    assert isinstance(kept, KroneckerDense) and kept.block_shape == (4, 4)
    selected.compile(keras.optimizers.Adam(0.01), "mse")
    selected.fit(x, y, epochs=30, batch_size=64, verbose=0)
    error = np.linalg.norm(to_numpy(kept.kernel) - target) / np.linalg.norm(target)
    assert error < 0.05
    assert model.layers[-1] is layer  # the original model is left alone


@pytest.mark.slow
def test_pattern_selection_on_mnist_keeps_one_pattern():
    # Section 6.1's run: blocks (2, 2) ... (16, 2) of a 784 -> 10 softmax layer, rank 2,
    # the paper's schedule under plain gradient descent, weight decay on the factors.
    (x, y), (x_test, y_test) = load_mnist_5k(test_size=1000, seed=0)
    keras.utils.set_random_seed(0)
    layer = KroneckerPatternDense(10, [(2, 2), (4, 2), (8, 2), (16, 2)], rank=2,
                                  factor_decay=0.03, seed=0, activation="softmax")
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), layer])
    model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    schedule = PenaltySchedule(start=0.01, step=0.002, every=5, stop_when_one_remains=True)
    model.fit(x, y, epochs=120, batch_size=64, verbose=0, callbacks=[schedule])
    assert schedule.stopped_epoch is not None
    norms = layer.kernel_norms()
    assert np.sum(norms > 0.01 * norms.max()) == 1
    selected = keep_selected_patterns(model)
    kept = selected.layers[-1]
    assert kept.block_shape == layer.block_shapes[int(np.argmax(norms))]
    selected.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
                     metrics=["accuracy"])
    selected.fit(x, y, epochs=5, batch_size=64, verbose=0)
    assert selected.evaluate(x_test, y_test, verbose=0)[1] > 0.85  # a dense softmax: 0.90


@pytest.mark.slow
def test_compress_kpd_fits_dense_layers_and_skips_conv(trained_lenet):
    model, report = keras_psm.compress(trained_lenet, "kpd", rank=2, verbose=0)
    assert sorted(row.name for row in report.compressed) == ["fc1", "fc2", "fc3"]
    assert {row.name for row in report.skipped} == {"conv1", "conv2"}
    assert all("replaces Dense layers only" in row.note for row in report.skipped)
    for row in report.compressed:
        original = trained_lenet.get_layer(row.name).get_weights()[0]
        layer = model.get_layer(row.name)
        assert isinstance(layer, KroneckerDense) and layer.kernel.shape == original.shape
        fit = nearest_kronecker_sum(original, layer.block_shape, 2)
        assert row.relative_error == pytest.approx(fit.relative_error, abs=1e-5)
        assert row.params_after == layer.count_nonzero_params() < row.params_before
        assert layer.activation is trained_lenet.get_layer(row.name).activation
    x = np.random.default_rng(0).random((2, 28, 28, 1)).astype("float32")
    assert model(x).shape == (2, 10)


@pytest.mark.slow
def test_compress_kpd_block_mask_padding_and_exact_rank(trained_lenet):
    model, report = keras_psm.compress(trained_lenet, "kpd", layers=["fc2"], block_shape=(16, 8),
                                       rank=4, block_sparsity=0.5, verbose=0)
    layer = model.get_layer("fc2")  # 120 x 84 is padded to 128 x 88
    assert layer.geometry.grid_shape == (8, 11)
    assert layer.block_sparsity == pytest.approx(44 / 88)
    assert layer.kernel.shape == (120, 84)
    with pytest.raises(ValueError, match="layer 'fc2'.*does not divide the kernel shape"):
        keras_psm.compress(trained_lenet, "kpd", layers=["fc2"], block_shape=(16, 8), pad=False,
                           verbose=0)
    _, exact = keras_psm.compress(trained_lenet, "kpd", layers=["fc3"], block_shape=(2, 2),
                                  rank=4, verbose=0)
    assert exact.compressed[0].relative_error < 1e-5
    with pytest.raises(ValueError, match="KPDConfig: `block_sparsity` must be < 1"):
        keras_psm.compress(trained_lenet, "kpd", block_sparsity=1.0, verbose=0)
    method = keras_psm.get_method("kpd")
    for options in method.presets.values():
        _, preset_report = keras_psm.compress(trained_lenet, "kpd", verbose=0, **options)
        assert preset_report.params_after < preset_report.params_before


@pytest.mark.slow
def test_compressed_model_fine_tunes_with_fit(trained_lenet, mnist_small):
    (x, y), (x_test, y_test) = mnist_small
    model, _ = keras_psm.compress(trained_lenet, "kpd", block_shape=(4, 2), rank=4, l1=1e-4,
                                  verbose=0)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    before = model.evaluate(x_test, y_test, verbose=0)[0]
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    assert model.evaluate(x_test, y_test, verbose=0)[0] < before
