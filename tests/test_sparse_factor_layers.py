"""SparseFactorDense / SparseFactorConv2D against dense references."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import gradients
from keras_psm import ops
from keras_psm.backend import keras
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
from keras_psm.factorize.palm4msa import factor_shapes
from keras_psm.layers.sparse_factor import SPARSE_SLOWDOWN, application_plans, cheapest
from keras_psm.ops import convert_to_numpy as to_numpy


def random_sparse_factors(shapes, density=0.3, seed=0):
    rng = np.random.default_rng(seed)
    factors = []
    for shape in shapes:
        support = rng.random(shape) < density
        factors.append((rng.standard_normal(shape) * support).astype("float32"))
    return factors


def product(factors):
    out = factors[0].astype("float64")
    for factor in factors[1:]:
        out = out @ factor
    return out


@pytest.mark.parametrize("input_shape", [(5, 12), (3, 4, 12), (2, 3, 4, 12)])
def test_dense_matches_numpy_for_any_input_rank(input_shape):
    factors = random_sparse_factors(factor_shapes((12, 9), 3))
    bias = np.linspace(-1, 1, 9).astype("float32")
    layer = SparseFactorDense.from_factors(factors, bias=bias, activation="tanh")
    x = np.random.default_rng(1).standard_normal(input_shape).astype("float32")
    expected = np.tanh(x @ product(factors) + bias)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    assert layer.compute_output_shape(input_shape) == input_shape[:-1] + (9,)
    np.testing.assert_allclose(to_numpy(layer.kernel), product(factors), rtol=1e-5, atol=1e-6)


def test_plans_follow_the_break_even_row_counts():
    shapes = factor_shapes((40, 30), 3)             # (40, 30), (30, 30), (30, 30)
    costs = [rows * cols for rows, cols in shapes]  # 3000 per row against 1200 dense
    # One at a time: 3000 n. F_1 then (F_2 F_3): 30 * 900 + 2100 n. The product
    # first, right to left: 30 * (1200 + 900) + 1200 n. (F_1 F_2) then F_3 costs
    # 36000 + 2100 n and never wins. Break-even at 30 and at 40 rows.
    plans = application_plans(shapes, costs)
    assert [(p.split, p.rest_multiplied) for p in plans] == [(1, False), (1, True), (3, False)]
    assert [(p.fixed_cost, p.row_cost) for p in plans] == [(0, 3000), (27000, 2100),
                                                           (63000, 1200)]
    picked = [cheapest(plans, n, lambda plan: (plan.split, plan.rest_multiplied))
              for n in (29, 31, 39, 41)]
    assert picked == [(1, False), (1, True), (1, True), (3, False)]
    assert application_plans(shapes[:1], costs[:1])[0].split == 1


@pytest.mark.tensorflow
def test_a_graph_of_unknown_row_count_runs_the_cheapest_plan_when_it_runs():
    import tensorflow as tf

    shapes = factor_shapes((40, 30), 3)             # the plans of the test above
    plans = application_plans(shapes, [rows * cols for rows, cols in shapes])
    decide = tf.function(lambda n: cheapest(
        plans, n, lambda plan: tf.constant(plan.split + 10 * plan.rest_multiplied)))
    assert [int(decide(tf.constant(n))) for n in (29, 31, 41)] == [1, 11, 3]
    rng = np.random.default_rng(0)
    factors = [(rng.standard_normal(shape) * (rng.random(shape) < 0.3)).astype("float32")
               for shape in shapes]
    layer = SparseFactorDense.from_factors(factors)
    layer.build((None, 40))
    unknown_rows = tf.function(layer.call, input_signature=[tf.TensorSpec((None, 40))])
    for rows in (29, 41):
        x = rng.standard_normal((rows, 40)).astype("float32")
        # float32 sums of 30 to 40 products of unit-size terms, in different orders.
        np.testing.assert_allclose(to_numpy(unknown_rows(x)), x @ product(factors),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", [3, 5000])     # below and above the break-even row count
def test_dense_and_sparse_forms_match_the_product(rows):
    rng = np.random.default_rng(0)
    # A 400 x 300 first factor at 0.5% density is applied as a sparse product
    # (below 1 / SPARSE_SLOWDOWN), the 300 x 300 ones at 20% dense.
    factors = [(rng.standard_normal(shape) * (rng.random(shape) < density)).astype("float32")
               for shape, density in (((400, 300), 0.005), ((300, 300), 0.2),
                                      ((300, 300), 0.2))]
    layer = SparseFactorDense.from_factors(factors)
    x = rng.standard_normal((rows, 400)).astype("float32")
    expected = x @ product(factors)
    # float32 sums of up to 300 products of unit-size terms, in different orders.
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-3)
    assert [layer._is_sparse(i) for i in range(3)] == [True, False, False]
    assert 0.005 < 1 / SPARSE_SLOWDOWN
    np.testing.assert_allclose(to_numpy(layer.kernel), product(factors), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pixels", [1, 4])
def test_functional_conv_with_a_sparse_factor_keeps_its_channels(pixels):
    rng = np.random.default_rng(2)
    # A (960, 320) first factor, dense, and a (320, 320) one at 0.5% density,
    # applied sparse: every plan's output keeps its 320 channels statically,
    # which a functional model built on the layer needs (tf_keras).
    factors = [rng.standard_normal((960, 320)).astype("float32"),
               (rng.standard_normal((320, 320)) * (rng.random((320, 320)) < 0.005)
                ).astype("float32")]
    layer = SparseFactorConv2D.from_factors(factors, kernel_size=(1, 1))
    inputs = keras.Input((pixels, pixels, 960))
    outputs = keras.layers.BatchNormalization()(layer(inputs))
    assert tuple(outputs.shape) == (None, pixels, pixels, 320)
    assert layer._applied_sparse(conv_first=True) == [False, True]


def test_kernel_of_a_widening_layer_with_a_sparse_last_factor():
    rng = np.random.default_rng(1)
    # (100, 100) at 30% then (100, 500) at 0.5% (sparse): multiplied left to right.
    factors = [(rng.standard_normal(shape) * (rng.random(shape) < density)).astype("float32")
               for shape, density in (((100, 100), 0.3), ((100, 500), 0.005))]
    layer = SparseFactorDense.from_factors(factors)
    x = rng.standard_normal((4, 100)).astype("float32")
    # float32 sums of about 30 unit-size products.
    np.testing.assert_allclose(to_numpy(layer(x)), x @ product(factors), rtol=1e-4, atol=1e-4)
    assert [layer._is_sparse(i) for i in range(2)] == [False, True]
    np.testing.assert_allclose(to_numpy(layer.kernel), product(factors), rtol=1e-4, atol=1e-5)


def test_random_support_has_k_per_row_and_column_and_sparse_he_scale():
    layer = SparseFactorDense(64, n_factors=2, sparsity=4, seed=3)
    layer.build((None, 256))
    for mask, weight in zip(layer.masks, layer.factors):
        mask, weight = to_numpy(mask), to_numpy(weight)
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert (mask.sum(axis=0) >= 4).all() and (mask.sum(axis=1) >= 4).all()
        assert np.all(weight[mask == 0] == 0)
    first = to_numpy(layer.values[0])
    fan_in = to_numpy(layer.masks[0]).sum(axis=0).mean()
    assert abs(first.std() - np.sqrt(2 / fan_in)) < 0.25 * np.sqrt(2 / fan_in)
    assert layer.count_nonzero_params() == sum(
        int(to_numpy(m).sum()) for m in layer.masks) + 64


def test_gradients_are_the_dense_gradients_on_the_support_and_fit_keeps_supports():
    factors = random_sparse_factors(factor_shapes((16, 8), 2), density=0.4)
    layer = SparseFactorDense.from_factors(factors, bias=np.zeros(8, "float32"))
    model = keras.Sequential([keras.Input((16,)), layer])
    x = np.random.default_rng(0).standard_normal((64, 16)).astype("float32")
    y = np.random.default_rng(1).standard_normal((64, 8)).astype("float32")
    grads = gradients(lambda: ops.mean((model(x) - ops.convert_to_tensor(y)) ** 2), layer.values)
    # The same loss on the dense factors A, B, in float64: with E = 2 (x A B - y) / size,
    # dL/dA = x^T E B^T and dL/dB = (x A)^T E.
    a, b = (f.astype(np.float64) for f in factors)
    error = 2 * (x @ a @ b - y) / y.size
    references = [x.T @ error @ b.T, (x @ a).T @ error]
    for grad, reference, factor in zip(grads, references, factors):
        assert grad.shape == (np.count_nonzero(factor),)   # nothing off the support
        # float32 sums of 64 products against float64 ones.
        np.testing.assert_allclose(grad, reference[factor != 0], rtol=1e-4, atol=1e-6)
    before = layer.count_nonzero_params()
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(x, y, epochs=3, verbose=0)
    assert layer.count_nonzero_params() == before
    for factor, original in zip(layer.factors, factors):
        assert np.all(to_numpy(factor)[original == 0] == 0)


CONV_CASES = [
    dict(strides=1, padding="valid", dilation_rate=1, data_format="channels_last"),
    dict(strides=2, padding="same", dilation_rate=1, data_format="channels_last"),
    dict(strides=1, padding="same", dilation_rate=2, data_format="channels_last"),
    dict(strides=(2, 1), padding="valid", dilation_rate=1, data_format="channels_first"),
]


@pytest.mark.parametrize("options", CONV_CASES)
def test_conv_matches_keras_conv2d_with_the_product_kernel(options):
    kh, kw, cin, cout = 3, 2, 4, 5
    factors = random_sparse_factors(factor_shapes((kh * kw * cin, cout), 3), density=0.5)
    bias = np.arange(cout, dtype="float32")
    layer = SparseFactorConv2D.from_factors(factors, (kh, kw), bias=bias, activation="relu",
                                            **options)
    reference = keras.layers.Conv2D(cout, (kh, kw), activation="relu", **options)
    shape = (2, 9, 8, cin) if options["data_format"] == "channels_last" else (2, cin, 9, 8)
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    reference.build(shape)
    reference.set_weights([product(factors).reshape(kh, kw, cin, cout).astype("float32"), bias])
    if options["data_format"] == "channels_first":
        # TensorFlow's CPU Conv2D has no NCHW kernel: compare in NHWC.
        nhwc = keras.layers.Conv2D(cout, (kh, kw), activation="relu",
                                   **{**options, "data_format": "channels_last"})
        nhwc.build((2, 9, 8, cin))
        nhwc.set_weights(reference.get_weights())
        expected = np.transpose(to_numpy(nhwc(np.transpose(x, (0, 2, 3, 1)))), (0, 3, 1, 2))
    else:
        expected = to_numpy(reference(x))
    out = to_numpy(layer(x))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert out.shape == tuple(layer.compute_output_shape(shape))
    assert layer.kernel.shape == (kh, kw, cin, cout)


def test_keras_round_trip_is_exact_without_custom_objects(tmp_path):
    inputs = keras.Input((10, 10, 3))
    x = SparseFactorConv2D(8, 3, n_factors=2, sparsity=3, seed=1, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = SparseFactorDense(4, n_factors=3, sparsity=2, seed=2)(x)
    model = keras.Model(inputs, outputs)
    path = str(tmp_path / "model.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    x = np.random.default_rng(0).standard_normal((3, 10, 10, 3)).astype("float32")
    # Same weights; oneDNN may pick other kernels per graph: float32 rounding, below 1e-5.
    np.testing.assert_allclose(to_numpy(model(x)), to_numpy(reloaded(x)), rtol=1e-5, atol=1e-6)
    for a, b in zip(model.weights, reloaded.weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


def test_mixed_float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        dense = SparseFactorDense(6, n_factors=2, sparsity=2, seed=0)
        conv = SparseFactorConv2D(4, 3, n_factors=2, sparsity=2, seed=0)
        x = np.ones((2, 8, 8, 3), "float32")
        y = conv(x)
        z = dense(keras.layers.Flatten()(y))
        assert to_numpy(y).dtype == np.float16 and to_numpy(z).dtype == np.float16
        assert to_numpy(dense.values[0]).dtype == np.float32
        assert to_numpy(dense.indices[0]).dtype == np.int32
        assert np.all(np.isfinite(to_numpy(z)))
        model = keras.Sequential([keras.Input((8, 8, 3)), conv, keras.layers.Flatten(), dense])
        model.compile("sgd", "mse")
        history = model.fit(x, np.zeros((2, 6), "float32"), epochs=2, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_bad_arguments_name_the_layer_and_parameter():
    with pytest.raises(ValueError, match="SparseFactorDense 'fc'.*sparsity"):
        SparseFactorDense(4, sparsity=0, name="fc")
    with pytest.raises(ValueError, match="n_factors"):
        SparseFactorDense(4, n_factors=0)
    with pytest.raises(ValueError, match="padding"):
        SparseFactorConv2D(4, 3, padding="causal")
    with pytest.raises(ValueError, match="kernel_size"):
        SparseFactorConv2D(4, (3, 0))
    with pytest.raises(TypeError, match="units"):
        SparseFactorDense(2.5)
    with pytest.raises(ValueError, match="SparseFactorDense 'fc'.*`nonzeros`"):
        SparseFactorDense(4, n_factors=2, nonzeros=[3], name="fc")
    with pytest.raises(TypeError, match="prunable"):
        SparseFactorDense(4, prunable=1)


@pytest.mark.slow
@pytest.mark.tensorflow
def test_trains_under_mirrored_strategy_with_two_cpu_devices():
    script = textwrap.dedent("""
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from keras_psm.backend import keras
        from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
        from keras_psm.pruning import IterativePruning
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            model = keras.Sequential([
                keras.Input((8, 8, 1)),
                SparseFactorConv2D(4, 3, n_factors=2, sparsity=2, seed=0, activation="relu"),
                keras.layers.Flatten(),
                SparseFactorDense(3, n_factors=2, sparsity=2, seed=1),
            ])
            model.compile("adam", "sparse_categorical_crossentropy")
        x = np.random.default_rng(0).standard_normal((64, 8, 8, 1)).astype("float32")
        y = np.random.default_rng(1).integers(0, 3, 64)
        nnz = [int(np.count_nonzero(np.asarray(l.masks[0]))) for l in model.layers[::2]]
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        for layer, count in zip(model.layers[::2], nnz):
            assert int(np.count_nonzero(np.asarray(layer.masks[0]))) == count
            factor = np.asarray(layer.factors[0])
            assert np.all(factor[np.asarray(layer.masks[0]) == 0] == 0)
        with strategy.scope():
            prunable = keras.Sequential([
                keras.Input((8, 8, 1)), keras.layers.Flatten(),
                SparseFactorDense(3, n_factors=1, sparsity=8, seed=2, prunable=True),
            ])
            prunable.compile("adam", "sparse_categorical_crossentropy")
        before = prunable.layers[-1].count_nonzero_params()
        callback = IterativePruning(0.5, begin_step=0, end_step=4, frequency=2)
        prunable.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
        layer = prunable.layers[-1]
        assert layer.count_nonzero_params() < before
        assert np.all(np.asarray(layer.factors[0])[np.asarray(layer.masks[0]) == 0] == 0)
        print("OK", history.history["loss"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
