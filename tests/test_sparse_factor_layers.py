"""SparseFactorDense / SparseFactorConv2D against dense references."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_psm.backend import keras, tf
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
from keras_psm.factorize.palm4msa import factor_shapes
from keras_psm.layers.sparse_factor import chain_matmul


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
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert layer.compute_output_shape(input_shape) == input_shape[:-1] + (9,)
    np.testing.assert_allclose(layer.kernel.numpy(), product(factors), rtol=1e-5, atol=1e-6)


def test_chain_association_orders_agree():
    factors = [tf.constant(f) for f in random_sparse_factors(factor_shapes((40, 30), 3))]
    reference = product([f.numpy() for f in factors])
    for rows in (2, 5000):  # below and above the break-even row count
        x = np.random.default_rng(rows).standard_normal((rows, 40)).astype("float32")
        np.testing.assert_allclose(chain_matmul(tf.constant(x), factors).numpy(),
                                   x @ reference, rtol=1e-4, atol=1e-4)
    unknown_batch = tf.function(
        lambda x: chain_matmul(x, factors),
        input_signature=[tf.TensorSpec((None, 40), tf.float32)],
    )
    x = np.ones((7, 40), "float32")
    np.testing.assert_allclose(unknown_batch(x).numpy(), x @ reference, rtol=1e-4, atol=1e-4)


def test_random_support_has_k_per_row_and_column_and_sparse_he_scale():
    layer = SparseFactorDense(64, n_factors=2, sparsity=4, seed=3)
    layer.build((None, 256))
    for mask, weight in zip(layer.masks, layer.factor_weights):
        mask, weight = mask.numpy(), weight.numpy()
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert (mask.sum(axis=0) >= 4).all() and (mask.sum(axis=1) >= 4).all()
        assert np.all(weight[mask == 0] == 0)
    first = layer.factor_weights[0].numpy()[layer.masks[0].numpy() == 1]
    fan_in = layer.masks[0].numpy().sum(axis=0).mean()
    assert abs(first.std() - np.sqrt(2 / fan_in)) < 0.25 * np.sqrt(2 / fan_in)
    assert layer.count_nonzero_params() == sum(
        int(m.numpy().sum()) for m in layer.masks) + 64


def test_gradients_outside_the_support_are_zero_and_fit_keeps_supports():
    factors = random_sparse_factors(factor_shapes((16, 8), 2), density=0.4)
    layer = SparseFactorDense.from_factors(factors, bias=np.zeros(8, "float32"))
    model = keras.Sequential([keras.Input((16,)), layer])
    x = np.random.default_rng(0).standard_normal((64, 16)).astype("float32")
    y = np.random.default_rng(1).standard_normal((64, 8)).astype("float32")
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x) - y) ** 2)
    grads = tape.gradient(loss, layer.factor_weights)
    for grad, mask in zip(grads, layer.masks):
        assert np.all(grad.numpy()[mask.numpy() == 0] == 0)
        assert np.any(grad.numpy()[mask.numpy() == 1] != 0)
    before = layer.count_nonzero_params()
    model.compile(keras.optimizers.Adam(0.05), "mse")
    model.fit(x, y, epochs=3, verbose=0)
    assert layer.count_nonzero_params() == before
    effective = [f.numpy() for f in layer.factors]
    for factor, original in zip(effective, factors):
        assert np.array_equal(factor != 0, (original != 0) & (factor != 0))
        assert np.count_nonzero(factor) <= np.count_nonzero(original)


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
        expected = np.transpose(nhwc(np.transpose(x, (0, 2, 3, 1))).numpy(), (0, 3, 1, 2))
    else:
        expected = reference(x).numpy()
    out = layer(x).numpy()
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
    np.testing.assert_allclose(model(x).numpy(), reloaded(x).numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(model.weights, reloaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_mixed_float16_policy():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        dense = SparseFactorDense(6, n_factors=2, sparsity=2, seed=0)
        conv = SparseFactorConv2D(4, 3, n_factors=2, sparsity=2, seed=0)
        x = np.ones((2, 8, 8, 3), "float32")
        y = conv(x)
        z = dense(keras.layers.Flatten()(y))
        assert y.dtype == tf.float16 and z.dtype == tf.float16
        assert dense.factor_weights[0].dtype == tf.float32
        assert np.all(np.isfinite(z.numpy()))
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


@pytest.mark.slow
def test_trains_under_mirrored_strategy_with_two_cpu_devices():
    script = textwrap.dedent("""
        import numpy as np
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from keras_psm.backend import keras
        from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
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
        nnz = [int(np.count_nonzero(l.masks[0].numpy())) for l in model.layers[::2]]
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        assert np.isfinite(history.history["loss"][-1])
        for layer, count in zip(model.layers[::2], nnz):
            assert int(np.count_nonzero(layer.masks[0].numpy())) == count
            factor = layer.factors[0].numpy()
            assert np.all(factor[layer.masks[0].numpy() == 0] == 0)
        print("OK", history.history["loss"])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
