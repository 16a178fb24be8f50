"""Truncated SVD, channel slicing, flattening schemes and the low-rank layers."""

import numpy as np
import pytest

from keras_psm.backend import keras
from keras_psm.factorize.lowrank import (
    SCHEMES,
    channel_chunks,
    factor_kernel,
    factored_size,
    kernel_to_matrix,
    low_rank_kernel,
    matrix_to_kernel,
    max_rank,
    rank_for_ratio,
    relative_error_table,
    truncated_svd,
    valid_groups,
)
from keras_psm.layers import LowRankConv, LowRankDense
from keras_psm.ops import convert_to_numpy as to_numpy


def random_kernel(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_figure_9_example_has_308_parameters():
    # 20 filters, 6 channels, 2 x 2 window, rank 7: 7 (6 * 2 * 2 + 20) = 308.
    assert factored_size((2, 2, 6, 20), 7) == 308
    conv = keras.layers.Conv2D(20, 2, use_bias=False)
    conv.build((None, 3, 3, 6))
    layer = LowRankConv.from_layer(conv, rank=7)
    layer.build((None, 3, 3, 6))
    assert layer.count_params() == layer.count_nonzero_params() == 308
    assert layer.encoder_kernel.shape == (2, 2, 6, 7)
    assert layer.decoder_kernel.shape == (1, 1, 7, 20)
    # The encoder has j filters of c x kh x kw, the decoder is 1 x 1 (A.1).
    w = conv.get_weights()[0]
    matrix = w.transpose(3, 2, 0, 1).reshape(20, 24)  # the paper's (f, c k1 k2)
    ours = kernel_to_matrix(w, 0)
    np.testing.assert_allclose(np.linalg.svd(ours, compute_uv=False),
                               np.linalg.svd(matrix, compute_uv=False), rtol=1e-5)


def test_truncated_svd_folds_singular_values_into_v_and_is_optimal():
    matrix = random_kernel((9, 14))
    u, v = truncated_svd(matrix, 4)
    assert u.shape == (9, 4) and v.shape == (4, 14)
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-12)  # U orthonormal: S is in V
    s = np.linalg.svd(matrix, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), s[:4])
    # Eckart-Young: the error is the tail of the singular values.
    np.testing.assert_allclose(np.linalg.norm(matrix - u @ v), np.sqrt(np.sum(s[4:] ** 2)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_schemes_flatten_as_the_paper_says(scheme):
    kernel = random_kernel((3, 2, 4, 5))
    matrix = kernel_to_matrix(kernel, scheme)
    expected_shape = {0: (5, 3 * 2 * 4), 1: (5 * 3, 4 * 2), 2: (5 * 2, 4 * 3), 3: (5 * 3 * 2, 4)}
    assert matrix.shape == expected_shape[scheme]  # f kh_d kw_d x c kh_e kw_e
    np.testing.assert_array_equal(matrix_to_kernel(matrix, kernel.shape, scheme), kernel)
    # Scheme 1: row (a, o), column (b, c) holds K[a, b, c, o].
    if scheme == 1:
        assert matrix[2 * 5 + 3, 1 * 4 + 2] == kernel[2, 1, 2, 3]


def test_channel_slicing_uses_consecutive_chunks():
    kernel = random_kernel((3, 3, 6, 4))
    chunks = channel_chunks(kernel, 3)
    assert chunks.shape == (3, 3, 3, 2, 4)
    np.testing.assert_array_equal(chunks[1], kernel[:, :, 2:4, :])
    assert valid_groups(12) == [1, 2, 3, 4, 6, 12]
    with pytest.raises(ValueError, match="groups.*divide the 6 input channels"):
        channel_chunks(kernel, 4)


@pytest.mark.parametrize("shape", [(3, 3, 8, 5), (2, 3, 6, 4), (12, 7)])
def test_full_rank_is_exact_for_every_scheme_and_chunking(shape):
    kernel = random_kernel(shape)
    schemes = SCHEMES if len(shape) == 4 else (0,)
    for scheme in schemes:
        for groups in valid_groups(shape[-2]):
            factors = factor_kernel(kernel, max_rank(shape, groups, scheme), groups, scheme)
            np.testing.assert_allclose(factors.kernel, kernel, atol=1e-10)
            assert factors.n_params == factored_size(shape, factors.rank, groups, scheme)


def test_error_table_matches_reconstructions():
    kernel = random_kernel((3, 3, 6, 8), seed=1)
    for scheme in SCHEMES:
        for groups in (1, 2, 3):
            table = relative_error_table(kernel, groups, scheme)
            assert len(table) == max_rank(kernel.shape, groups, scheme) + 1
            assert table[0] == pytest.approx(1.0) and table[-1] == pytest.approx(0.0, abs=1e-12)
            operator = relative_error_table(kernel, groups, scheme, norm="operator")
            for rank in sorted({1, min(3, len(table) - 1)}):
                approx = factor_kernel(kernel, rank, groups, scheme).kernel
                frobenius = np.linalg.norm(approx - kernel) / np.linalg.norm(kernel)
                assert table[rank] == pytest.approx(frobenius, rel=1e-10)
                # Operator measure: the largest chunk residual over ||W||_2.
                residuals = [np.linalg.norm(kernel_to_matrix(r, scheme), 2)
                             for r in channel_chunks(kernel - approx, groups)]
                expected = max(residuals) / np.linalg.norm(kernel_to_matrix(kernel, scheme), 2)
                assert operator[rank] == pytest.approx(expected, rel=1e-8)
    # More chunks cannot do worse at the same rank (each chunk is a sub-block).
    two, one = relative_error_table(kernel, 2), relative_error_table(kernel, 1)
    assert np.all(two[:9] <= one[:9] + 1e-12)


def test_low_rank_kernel_reassembles_chunks_in_order():
    kernel = random_kernel((2, 2, 4, 3))
    factors = factor_kernel(kernel, 2, groups=2, scheme=3)
    assert factors.encoder.shape == (1, 1, 2, 4) and factors.decoder.shape == (2, 2, 4, 3)
    first = factor_kernel(kernel[:, :, :2], 2, scheme=3).kernel
    np.testing.assert_allclose(low_rank_kernel(factors.encoder, factors.decoder, 2)[:, :, :2],
                               first, atol=1e-12)


def test_rank_for_ratio_and_bad_arguments():
    assert rank_for_ratio(0.1, 120) == 12 and rank_for_ratio(0.01, 6) == 1
    assert rank_for_ratio(1.0, 6) == 6
    with pytest.raises(ValueError, match="rank"):
        factor_kernel(random_kernel((5, 4)), 5)
    with pytest.raises(ValueError, match="scheme"):
        factor_kernel(random_kernel((3, 3, 2, 2)), 1, scheme=4)
    with pytest.raises(ValueError, match="ratio"):
        rank_for_ratio(0.0, 5)
    with pytest.raises(ValueError, match="NaN"):
        factor_kernel(np.full((3, 3), np.nan), 1)


@pytest.mark.parametrize("input_shape", [(5, 12), (3, 4, 12)])
@pytest.mark.parametrize("groups", [1, 3])
def test_low_rank_dense_matches_numpy(input_shape, groups):
    kernel = random_kernel((12, 7)).astype("float32")
    factors = factor_kernel(kernel, 2, groups)
    bias = np.linspace(-1, 1, 7).astype("float32")
    layer = LowRankDense.from_factors(factors.encoder, factors.decoder, groups, bias=bias,
                                      activation="tanh")
    x = random_kernel(input_shape, seed=2).astype("float32")
    expected = np.tanh(x @ factors.kernel + bias)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.kernel), factors.kernel, atol=1e-5)
    assert layer.compute_output_shape(input_shape) == input_shape[:-1] + (7,)
    assert layer.count_nonzero_params() == factors.n_params + 7


CONV_CASES = [
    dict(strides=1, padding="valid", dilation_rate=1, data_format="channels_last"),
    dict(strides=2, padding="same", dilation_rate=1, data_format="channels_last"),
    dict(strides=(1, 3), padding="same", dilation_rate=1, data_format="channels_last"),
    dict(strides=1, padding="same", dilation_rate=(2, 1), data_format="channels_last"),
    dict(strides=(2, 1), padding="valid", dilation_rate=1, data_format="channels_first"),
]


def keras_conv_reference(kernel, bias, options, x):
    """Output of a Keras Conv2D (computed in NHWC: TF's CPU conv has no NCHW kernel)."""
    nhwc = {**options, "data_format": "channels_last"}
    layer = keras.layers.Conv2D(kernel.shape[-1], kernel.shape[:2], activation="relu", **nhwc)
    if options["data_format"] == "channels_first":
        x = np.transpose(x, (0, 2, 3, 1))
    layer.build(x.shape)
    layer.set_weights([kernel, bias])
    out = to_numpy(layer(x))
    return np.transpose(out, (0, 3, 1, 2)) if options["data_format"] == "channels_first" else out


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("options", CONV_CASES)
def test_full_rank_low_rank_conv_equals_the_conv2d(scheme, options):
    kh, kw, cin, cout = 3, 2, 4, 5
    kernel = random_kernel((kh, kw, cin, cout), seed=3).astype("float32")
    bias = np.arange(cout, dtype="float32") / cout
    shape = (2, 9, 8, cin) if options["data_format"] == "channels_last" else (2, cin, 9, 8)
    x = random_kernel(shape, seed=4).astype("float32")
    expected = keras_conv_reference(kernel, bias, options, x)
    for groups in (1, 2):
        factors = factor_kernel(kernel, max_rank(kernel.shape, groups, scheme), groups, scheme)
        layer = LowRankConv.from_factors(factors.encoder, factors.decoder, groups, scheme,
                                         bias=bias, activation="relu", **options)
        out = to_numpy(layer(x))
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
        assert out.shape == tuple(layer.compute_output_shape(shape))
        np.testing.assert_allclose(to_numpy(layer.kernel), kernel, atol=1e-5)


def test_from_layer_keeps_the_conv_options_and_bias():
    conv = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", name="c")
    conv.build((None, 8, 8, 4))
    layer = LowRankConv.from_layer(conv, rank=3, groups=2, scheme=1)
    config = layer.get_config()
    assert (config["name"], config["strides"], config["padding"]) == ("c", (2, 2), "same")
    assert (config["rank"], config["groups"], config["scheme"]) == (3, 2, 1)
    x = random_kernel((2, 8, 8, 4)).astype("float32")
    assert layer(x).shape == conv(x).shape
    np.testing.assert_array_equal(to_numpy(layer.bias), to_numpy(conv.bias))


def test_layer_arguments_are_validated():
    with pytest.raises(ValueError, match="LowRankConv 'bad'.*scheme"):
        LowRankConv(4, 3, rank=2, scheme=7, name="bad")
    with pytest.raises(ValueError, match="LowRankDense 'd'.*rank"):
        LowRankDense(4, rank=0, name="d")
    layer = LowRankConv(4, 3, rank=2, groups=3, name="g")
    with pytest.raises(ValueError, match="`groups` = 3 must divide the 4 input channels"):
        layer.build((None, 8, 8, 4))
    with pytest.raises(ValueError, match="divisible by `groups` = 2"):
        LowRankDense(3, rank=1, groups=2).build((None, 5))


@pytest.mark.slow
def test_grouped_layers_train_on_cpu_and_round_trip_exactly(tmp_path):
    inputs = keras.Input((10, 10, 4))
    x = LowRankConv(6, 3, rank=2, groups=2, scheme=2, padding="same", activation="relu")(inputs)
    x = LowRankConv(8, 3, rank=3, groups=3, scheme=3, strides=2)(x)
    x = keras.layers.Flatten()(x)
    outputs = LowRankDense(5, rank=2, groups=4)(x)
    model = keras.Model(inputs, outputs)
    data = random_kernel((32, 10, 10, 4)).astype("float32")
    target = random_kernel((32, 5), seed=1).astype("float32")
    before = [to_numpy(w).copy() for w in model.trainable_weights]
    model.compile(keras.optimizers.Adam(0.01), "mse")
    model.fit(data, target, epochs=2, batch_size=8, verbose=0)
    assert all(np.any(to_numpy(w) != b) for w, b in zip(model.trainable_weights, before))
    path = str(tmp_path / "low_rank.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    # Same weights, possibly different kernels (oneDNN and the CPU's instruction set choose
    # them per graph): float32 rounding of sums of a few hundred terms, far below 1e-5.
    np.testing.assert_allclose(to_numpy(model(data)), to_numpy(reloaded(data)), rtol=1e-5,
                               atol=1e-6)
    for layer in model.layers[1:3]:
        clone = reloaded.get_layer(layer.name)
        assert clone.get_config() == layer.get_config()
        # The kernel is a TF product of the same factors: float32 rounding only.
        np.testing.assert_allclose(to_numpy(clone.kernel), to_numpy(layer.kernel), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.tensorflow
def test_grouped_encoder_gradients_match_a_dense_reference():
    import tensorflow as tf

    kernel = random_kernel((3, 3, 4, 5)).astype("float32")
    factors = factor_kernel(kernel, 2, groups=2)
    layer = LowRankConv.from_factors(factors.encoder, factors.decoder, 2, use_bias=False)
    x = tf.constant(random_kernel((2, 6, 6, 4), seed=5).astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x) ** 2)
    grad = to_numpy(tape.gradient(loss, x))
    reference = tf.constant(factors.kernel.astype("float32"))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(tf.nn.conv2d(x, reference, 1, "VALID") ** 2)
    np.testing.assert_allclose(grad, to_numpy(tape.gradient(loss, x)), rtol=1e-3, atol=1e-3)
