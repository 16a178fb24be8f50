"""ALDS allocation (Algorithm 1) and the "svd" / "alds" methods of compress."""

import itertools

import numpy as np
import pytest

import keras_psm
from conftest import check_fine_tunes_and_round_trips
from keras_psm.factorize.lowrank import (
    alds_allocation,
    factored_size,
    relative_error_table,
)
from keras_psm.layers import LowRankConv, LowRankDense
from keras_psm.methods import ALDSConfig, LowRankLayerConfig, SVDConfig, get_method


def lenet_kernels(model):
    return {layer.name: layer.get_weights()[0] for layer in model.layers if layer.weights}


def stored_kernel_values(report, model):
    """Values the compressed layers store for their kernels (bias excluded)."""
    biases = {layer.name: layer.get_weights()[1].size for layer in model.layers if layer.weights}
    return sum(row.params_after - biases[row.name] for row in report.compressed)


def max_error(report):
    return max(row.relative_error for row in report.compressed)


def test_optimal_ranks_is_the_exact_minimax_solution():
    # Prime input sizes: one chunk is the only option that stays smaller than
    # the kernel, so ALDS reduces to OPTIMALRANKS; compare with brute force.
    rng = np.random.default_rng(0)
    kernels = {
        "a": rng.standard_normal((7, 6)),
        "b": rng.standard_normal((11, 5)) * np.linspace(2, 0.1, 5),
        "c": rng.standard_normal((13, 9)) @ np.diag(np.geomspace(1, 0.01, 9)),
    }
    tables = {name: relative_error_table(k) for name, k in kernels.items()}
    total = sum(k.size for k in kernels.values())
    caps = {name: min(len(tables[name]) - 1, k.size // factored_size(k.shape, 1))
            for name, k in kernels.items()}
    for target in (0.3, 0.5, 0.7):
        allocation = alds_allocation(kernels, target)
        budget = int((1 - target) * total)
        best = min(
            max(tables[name][r] for name, r in zip(kernels, ranks))
            for ranks in itertools.product(*(range(1, caps[n] + 1) for n in kernels))
            if sum(factored_size(kernels[n].shape, r) for n, r in zip(kernels, ranks)) <= budget
        )
        assert allocation.budget == budget and allocation.n_params <= budget
        assert allocation.max_error == pytest.approx(best, rel=1e-12)
        for name, layer in allocation.layers.items():
            assert (layer.groups, layer.scheme) == (1, 0)
            assert layer.error == pytest.approx(tables[name][layer.rank])
            assert layer.n_params == factored_size(kernels[name].shape, layer.rank)


def test_channel_slicing_wins_when_chunks_are_low_rank():
    # Rows 0-3 and 4-7 of the (in, out) kernel are each rank 1 but the whole is
    # rank 2: two chunks of rank 1 (8 + 2 * 8 = 24 values) are exact.
    rng = np.random.default_rng(1)
    top = np.outer(rng.standard_normal(4), rng.standard_normal(8))
    bottom = np.outer(rng.standard_normal(4), rng.standard_normal(8))
    kernel = np.vstack([top, bottom])
    allocation = alds_allocation({"dense": kernel}, target=1 - 24 / 64)
    layer = allocation.layers["dense"]
    assert (layer.rank, layer.groups, layer.n_params) == (1, 2, 24)
    assert layer.error == pytest.approx(0.0, abs=1e-12)
    assert relative_error_table(kernel)[1] > 0.1  # one chunk of rank 1 is not


@pytest.mark.slow
def test_alds_beats_uniform_svd_and_alds_plus_beats_alds(trained_lenet):
    model = trained_lenet
    kernels = lenet_kernels(model)
    total = sum(k.size for k in kernels.values())
    for ratio in (0.25, 0.5):
        _, svd = keras_psm.compress(model, "svd", rank_ratio=ratio, verbose=0)
        stored = stored_kernel_values(svd, model)
        target = 1 - (stored + 0.5) / total  # the same budget, `stored` values
        _, alds = keras_psm.compress(model, "alds", target=target, verbose=0)
        _, plus = keras_psm.compress(model, "alds", target=target, alds_plus=True, verbose=0)
        assert stored_kernel_values(alds, model) <= stored
        assert stored_kernel_values(plus, model) <= stored
        # ALDS's defining property: the largest per-layer error is not larger.
        assert max_error(alds) <= max_error(svd) + 1e-5
        assert max_error(plus) <= max_error(alds) + 1e-5
        # Equalized errors: ALDS spreads them far less than a uniform rank ratio.
        spread = [max_error(r) - min(row.relative_error for row in r.compressed)
                  for r in (svd, alds)]
        assert spread[1] < spread[0]
    # At ratio 0.5 the gap is large on this network (0.62 -> 0.50 when written).
    assert max_error(alds) < max_error(svd) - 0.05


@pytest.mark.slow
def test_predicted_errors_are_the_reported_ones(trained_lenet):
    kernels = lenet_kernels(trained_lenet)
    config = ALDSConfig(target=0.8, alds_plus=True)
    allocation = alds_allocation(kernels, 0.8, plus=True)
    compressed, report = keras_psm.compress(trained_lenet, "alds", config=config, verbose=0)
    for row in report.compressed:
        layer = allocation.layers[row.name]
        assert row.relative_error == pytest.approx(layer.error, rel=1e-4, abs=1e-6)
        new = compressed.get_layer(row.name)
        assert (new.rank, new.groups) == (layer.rank, layer.groups)
        assert new.count_nonzero_params() == layer.n_params + new.bias.shape[0]
        assert layer.n_params <= kernels[row.name].size  # never larger than the kernel
    assert allocation.n_params <= allocation.budget == int(0.2 * sum(
        k.size for k in kernels.values()))
    assert isinstance(compressed.get_layer("conv2"), LowRankConv)
    assert isinstance(compressed.get_layer("fc1"), LowRankDense)


@pytest.mark.slow
def test_operator_norm_measure(trained_lenet):
    kernels = lenet_kernels(trained_lenet)
    allocation = alds_allocation(kernels, 0.7, norm="operator", n_seeds=3)
    for name, layer in allocation.layers.items():
        table = relative_error_table(kernels[name], layer.groups, layer.scheme, "operator")
        assert layer.error == pytest.approx(table[layer.rank])
    assert allocation.max_error < 1.0 and allocation.n_params <= allocation.budget


@pytest.mark.slow
def test_allocation_is_reproducible_and_validated(trained_lenet):
    kernels = lenet_kernels(trained_lenet)
    first = alds_allocation(kernels, 0.9, n_seeds=5, random_state=3)
    assert alds_allocation(kernels, 0.9, n_seeds=5, random_state=3) == first
    with pytest.raises(ValueError, match="removes too much.*at most 0.98"):
        alds_allocation(kernels, 0.99)
    with pytest.raises(ValueError, match="target"):
        alds_allocation(kernels, 1.0)
    with pytest.raises(ValueError, match="norm"):
        alds_allocation(kernels, 0.5, norm="nuclear")
    with pytest.raises(ValueError, match="layer 'x'.*kernel"):
        alds_allocation({"x": np.ones((2, 2, 2))}, 0.5)


def test_configs_validate_their_fields():
    with pytest.raises(ValueError, match="ALDSConfig.*target"):
        ALDSConfig(target=1.0)
    with pytest.raises(ValueError, match="ALDSConfig.*norm"):
        ALDSConfig(norm="l1")
    with pytest.raises(TypeError, match="alds_plus"):
        ALDSConfig(alds_plus=1)
    with pytest.raises(ValueError, match="SVDConfig.*rank_ratio"):
        SVDConfig(rank_ratio=0.0)
    with pytest.raises(ValueError, match="LowRankLayerConfig.*scheme"):
        LowRankLayerConfig(rank=2, scheme=5)
    for name in ("svd", "alds"):
        method = get_method(name)
        assert set(method.presets) == {"small", "large"}
        for options in method.presets.values():
            method.make_config(**options)


def test_svd_ranks_follow_the_ratio(trained_lenet):
    compressed, report = keras_psm.compress(trained_lenet, "svd", rank_ratio=0.1, verbose=0)
    expected = {"conv1": 1, "conv2": 2, "fc1": 12, "fc2": 9, "fc3": 1}
    for name, rank in expected.items():
        layer = compressed.get_layer(name)
        assert (layer.rank, layer.groups) == (rank, 1)
        shape = trained_lenet.get_layer(name).get_weights()[0].shape
        row = next(r for r in report.rows if r.name == name)
        assert row.params_after == factored_size(shape, rank) + shape[-1]


@pytest.mark.slow
@pytest.mark.parametrize("method,options", [
    ("svd", dict(rank_ratio=0.3)),
    ("alds", dict(target=0.85, alds_plus=True)),
])
def test_compressed_model_trains_and_round_trips(trained_lenet, mnist_small, tmp_path,
                                                 method, options):
    compressed, report = keras_psm.compress(trained_lenet, method, verbose=0, **options)
    check_fine_tunes_and_round_trips(compressed, mnist_small, tmp_path / f"{method}.keras")
    assert report.params_after < report.params_before
