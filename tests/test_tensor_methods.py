"""EVBMF, Tucker-2, tensor-train layers and the "tucker-svd" / "tt" methods."""

import math

import numpy as np
import pytest
import tensorly as tl
from tensorly.tt_matrix import tt_matrix_to_matrix

import keras_psm
from conftest import check_fine_tunes_and_round_trips
from keras_psm.backend import keras, tf
from keras_psm.factorize.tensor import (
    balanced_factors,
    dimension_factors,
    evbmf,
    tt_matrix,
    tt_ranks,
    tucker2,
    vbmf_tucker_ranks,
)
from keras_psm.layers import LowRankDense, TTConv2D, TTDense, TuckerConv
from keras_psm.methods import TTConfig, TuckerSVDConfig, get_method
from keras_psm.ops import convert_to_numpy as to_numpy


def rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("rows,cols,rank,noise", [
    (40, 60, 5, 0.1), (100, 30, 8, 0.5), (50, 50, 10, 1.0), (20, 200, 3, 0.3),
])
def test_evbmf_recovers_rank_and_noise_of_a_low_rank_plus_noise_matrix(rows, cols, rank, noise):
    generator = rng(rank)
    signal = generator.standard_normal((rows, rank)) @ generator.standard_normal((rank, cols))
    matrix = signal + noise * generator.standard_normal((rows, cols))
    result = evbmf(matrix)
    assert result.rank == rank
    assert result.noise_variance == pytest.approx(noise ** 2, rel=0.15)
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert singular[rank - 1] > result.threshold >= singular[rank]
    transposed = evbmf(matrix.T)  # the same for the transpose
    assert transposed.rank == rank
    assert transposed.noise_variance == pytest.approx(result.noise_variance, rel=1e-8)


def test_evbmf_keeps_nothing_of_pure_noise_and_uses_the_exact_threshold():
    assert evbmf(rng(1).standard_normal((30, 40))).rank == 0
    assert evbmf(np.zeros((4, 5))).rank == 0
    # For a square matrix tau_ = 2.5129 (log(tau + 1) * 2 = tau), so the
    # threshold is sqrt(M sigma^2 (1 + tau_)^2 / tau_).
    result = evbmf(rng(2).standard_normal((30, 30)) * 0.5)
    tau = 2.5128624
    assert result.threshold == pytest.approx(
        math.sqrt(30 * result.noise_variance * (1 + tau) ** 2 / tau), rel=1e-6)


def test_vbmf_tucker_ranks_find_the_channel_ranks_of_a_tucker_kernel():
    generator = rng(3)
    core = generator.standard_normal((3, 3, 4, 6))
    factors = [generator.standard_normal((32, 4)), generator.standard_normal((48, 6))]
    kernel = tl.tucker_to_tensor((core, [np.eye(3), np.eye(3)] + factors))
    kernel += 0.01 * generator.standard_normal(kernel.shape)
    assert vbmf_tucker_ranks(kernel) == (4, 6)


def test_tucker2_is_exact_at_full_rank_and_tucker_conv_matches_conv2d():
    kernel = rng(4).standard_normal((3, 3, 6, 10)).astype("float32")
    fitted = tucker2(kernel, (6, 10))
    np.testing.assert_allclose(np.einsum("abst,cs,ot->abco", *fitted), kernel, atol=1e-6)
    bias = np.arange(10, dtype="float32")
    layer = TuckerConv.from_factors(*fitted, bias=bias, strides=2, padding="same",
                                    activation="relu")
    reference = keras.layers.Conv2D(10, 3, strides=2, padding="same", activation="relu")
    x = rng(5).standard_normal((2, 9, 9, 6)).astype("float32")
    reference.build(x.shape)
    reference.set_weights([kernel, bias])
    np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(reference(x)), atol=1e-4)
    np.testing.assert_allclose(to_numpy(layer.kernel), kernel, atol=1e-5)
    # 1x1 (6 -> 6), 3x3 core (6 -> 10), 1x1 (10 -> 10), bias.
    assert layer.count_nonzero_params() == 6 * 6 + 9 * 6 * 10 + 10 * 10 + 10


def test_dimension_factors_pad_only_what_does_not_factor():
    assert balanced_factors(400, 4) == (5, 5, 4, 4)
    assert balanced_factors(120, 4) == (5, 4, 3, 2)
    assert dimension_factors(400, 4) == (5, 5, 4, 4)
    assert dimension_factors(84, 4) == (5, 3, 3, 2)  # 84 = 7 * 3 * 2 * 2 -> 90
    assert dimension_factors(10, 4) == (3, 2, 2, 1)  # 10 -> 12
    assert dimension_factors(97, 4) == (5, 5, 2, 2)  # a prime -> 100
    assert dimension_factors(1, 3) == (1, 1, 1)
    assert tt_ranks((5, 5, 4, 4), (5, 4, 3, 2), 6) == (1, 6, 6, 6, 1)
    assert tt_ranks((25, 1, 1, 1), (1, 3, 2, 1), 6) == (1, 6, 2, 1, 1)


def test_tt_matrix_is_exact_at_full_rank_and_tt_dense_matches_x_at_w():
    kernel = rng(6).standard_normal((10, 7)).astype("float32")
    rows, cols = dimension_factors(10, 3), dimension_factors(7, 3)  # padded to 12 x 8
    padded = np.zeros((math.prod(rows), math.prod(cols)))
    padded[:10, :7] = kernel
    cores = tt_matrix(padded, rows, cols, max_rank=100)
    np.testing.assert_allclose(tt_matrix_to_matrix(cores), padded, atol=1e-10)
    layer = TTDense.from_cores(cores, 7, bias=np.ones(7, "float32"), activation="tanh")
    for shape in [(4, 10), (2, 3, 10)]:
        x = rng(7).standard_normal(shape).astype("float32")
        np.testing.assert_allclose(to_numpy(layer(x)), np.tanh(x @ kernel + 1), atol=1e-5)
        assert layer.compute_output_shape(shape) == shape[:-1] + (7,)
    np.testing.assert_allclose(to_numpy(layer.kernel), kernel, atol=1e-5)
    assert layer.count_nonzero_params() == sum(core.size for core in cores) + 7


def graph_shapes(layer, input_shape):
    """Shapes of every tensor in the traced graph of ``layer.call``."""
    function = tf.function(layer.call).get_concrete_function(
        tf.TensorSpec(input_shape, tf.float32))
    return [tuple(t.shape.as_list()) for op in function.graph.get_operations()
            for t in op.outputs if t.shape.rank is not None]


@pytest.mark.tensorflow
def test_tt_dense_never_forms_the_kernel():
    cores = tt_matrix(rng(8).standard_normal((400, 120)), (5, 5, 4, 4), (5, 4, 3, 2), 6)
    layer = TTDense.from_cores(cores, 120)
    layer.build((None, 400))
    for shape in graph_shapes(layer, (None, 400)):
        if None not in shape:  # batch-free tensors: the cores and shapes only
            assert math.prod(shape) < 400 * 120 // 20, shape


@pytest.mark.tensorflow
def test_tt_conv_matches_conv2d_and_does_not_inflate_activations():
    kh, kw, cin, cout = 3, 3, 6, 10
    kernel = rng(9).standard_normal((kh, kw, cin, cout)).astype("float32")
    channels, filters = dimension_factors(cin, 2), dimension_factors(cout, 2)
    padded = np.zeros((kh * kw, math.prod(channels), math.prod(filters)))
    padded[:, :cin, :cout] = kernel.reshape(kh * kw, cin, cout)
    cores = tt_matrix(padded.reshape(-1, padded.shape[-1]), (kh * kw,) + channels,
                      (1,) + filters, max_rank=1000)
    layer = TTConv2D.from_cores(cores, cout, (kh, kw), padding="same", strides=2)
    reference = keras.layers.Conv2D(cout, 3, padding="same", strides=2, use_bias=False)
    x = rng(10).standard_normal((2, 9, 9, cin)).astype("float32")
    reference.build(x.shape)
    reference.set_weights([kernel])
    np.testing.assert_allclose(to_numpy(layer(x)), to_numpy(reference(x)), atol=1e-4)
    np.testing.assert_allclose(to_numpy(layer.kernel), kernel, atol=1e-5)
    # Supplement A.6: the activations keep cin or cout channels (never r * cin).
    for shape in graph_shapes(layer, (None, 9, 9, cin)):
        if len(shape) == 4 and shape[0] is None:
            assert shape[-1] in (cin, cout), shape


def test_tensor_layers_validate_their_structure():
    with pytest.raises(ValueError, match="TTDense 't'.*fewer than `units` = 9"):
        TTDense(9, (2, 2), (2, 2), (1, 2, 1), name="t")
    with pytest.raises(ValueError, match="TTDense 't'.*ranks"):
        TTDense(4, (2, 2), (2, 2), (2, 2, 1), name="t")
    with pytest.raises(ValueError, match="at most prod\\(input_factors\\) = 4"):
        TTDense(4, (2, 2), (2, 2), (1, 2, 1)).build((None, 5))
    with pytest.raises(ValueError, match="7 input channels exceed prod\\(channel_factors\\) = 6"):
        TTConv2D(4, 3, (3, 2), (2, 2), (1, 3, 3, 1)).build((None, 8, 8, 7))
    with pytest.raises(ValueError, match="TuckerConv 'k'.*ranks"):
        TuckerConv(4, 3, ranks=(1, 2, 3), name="k")
    with pytest.raises(ValueError, match="TTConfig.*n_cores"):
        TTConfig(n_cores=1)
    with pytest.raises(ValueError, match="TuckerSVDConfig.*dense_rank_ratio"):
        TuckerSVDConfig(dense_rank_ratio=1.5)
    for name in ("tt", "tucker-svd"):
        method = get_method(name)
        assert set(method.presets) == {"small", "large"}
        for options in method.presets.values():
            method.make_config(**options)


def report_params(report):
    return {row.name: row.params_after for row in report.compressed}


def test_tt_method_reports_the_tt_parameter_counts(trained_lenet):
    compressed, report = keras_psm.compress(trained_lenet, "tt", verbose=0)
    # M = 4 cores, R = 6; a core (r_{k-1}, i_k, j_k, r_k) stores their product.
    expected = {
        # rows (25, 1, 1, 1), cols (1, 3, 2, 1), ranks (1, 6, 2, 1, 1)
        "conv1": 1 * 25 * 1 * 6 + 6 * 1 * 3 * 2 + 2 * 1 * 2 * 1 + 1 + 6,
        # rows (25, 3, 2, 1), cols (1, 4, 2, 2), ranks (1, 6, 6, 2, 1)
        "conv2": 1 * 25 * 1 * 6 + 6 * 3 * 4 * 6 + 6 * 2 * 2 * 2 + 2 * 1 * 2 * 1 + 16,
        # rows (5, 5, 4, 4), cols (5, 4, 3, 2), ranks (1, 6, 6, 6, 1)
        "fc1": 1 * 5 * 5 * 6 + 6 * 5 * 4 * 6 + 6 * 4 * 3 * 6 + 6 * 4 * 2 * 1 + 120,
        # rows (5, 4, 3, 2), cols (5, 3, 3, 2) (84 padded to 90), ranks (1, 6, 6, 4, 1)
        "fc2": 1 * 5 * 5 * 6 + 6 * 4 * 3 * 6 + 6 * 3 * 3 * 4 + 4 * 2 * 2 * 1 + 84,
        # rows (5, 3, 3, 2) (84 -> 90), cols (3, 2, 2, 1) (10 -> 12), ranks (1, 6, 6, 2, 1)
        "fc3": 1 * 5 * 3 * 6 + 6 * 3 * 2 * 6 + 6 * 3 * 2 * 2 + 2 * 2 * 1 * 1 + 10,
    }
    assert report_params(report) == expected
    assert isinstance(compressed.get_layer("conv2"), TTConv2D)
    assert isinstance(compressed.get_layer("fc1"), TTDense)
    for row in report.compressed:
        kernel = trained_lenet.get_layer(row.name).get_weights()[0]
        approx = to_numpy(compressed.get_layer(row.name).kernel)
        assert approx.shape == kernel.shape
        assert row.relative_error == pytest.approx(
            np.linalg.norm(approx - kernel) / np.linalg.norm(kernel), rel=1e-4)


def test_tucker_svd_method_reports_the_tucker_and_svd_parameter_counts(trained_lenet):
    _, report = keras_psm.compress(trained_lenet, "tucker-svd", conv_rank_ratio=0.5,
                                   dense_rank_ratio=0.1, verbose=0)
    assert report_params(report) == {
        # 1x1 cin -> r1, kh x kw r1 -> r2, 1x1 r2 -> cout, bias
        "conv1": 1 * 1 + 25 * 1 * 3 + 3 * 6 + 6,        # r1 = ceil(0.5), r2 = 3
        "conv2": 6 * 3 + 25 * 3 * 8 + 8 * 16 + 16,      # r1 = 3, r2 = 8
        # rank ceil(0.1 min(in, out)): j (in + out) + bias
        "fc1": 12 * (400 + 120) + 120,
        "fc2": 9 * (120 + 84) + 84,
        "fc3": 1 * (84 + 10) + 10,
    }
    compressed, report = keras_psm.compress(trained_lenet, "tucker-svd", verbose=0)
    for name in ("conv1", "conv2"):
        layer = compressed.get_layer(name)
        kernel = trained_lenet.get_layer(name).get_weights()[0]
        assert layer.ranks == vbmf_tucker_ranks(kernel)  # VBMF ranks, as in the paper
        (r1, r2), (kh, kw, cin, cout) = layer.ranks, kernel.shape
        assert report_params(report)[name] == cin * r1 + kh * kw * r1 * r2 + r2 * cout + cout
    assert isinstance(compressed.get_layer("fc2"), LowRankDense)
    assert compressed.get_layer("fc2").rank == 9


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [
    ("tt", dict(max_rank=10)),
    ("tucker-svd", dict(dense_rank_ratio=0.2, conv_rank_ratio=0.5)),
])
def test_compressed_model_trains_and_round_trips(trained_lenet, mnist_small, tmp_path,
                                                 method, options):
    compressed, _ = keras_psm.compress(trained_lenet, method, verbose=0, **options)
    reloaded = check_fine_tunes_and_round_trips(compressed, mnist_small,
                                                tmp_path / f"{method}.keras")
    for layer in compressed.layers:
        if hasattr(layer, "count_nonzero_params"):
            clone = reloaded.get_layer(layer.name)
            assert clone.get_config() == layer.get_config()
            assert clone.count_nonzero_params() == layer.count_nonzero_params()
