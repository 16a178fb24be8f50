"""Pruning at initialization: random, magnitude, SNIP, GraSP and SynFlow choices."""

import numpy as np
import pytest
from conftest import build_lenet

import keras_psm
from keras_psm.backend import keras, tf
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense
from keras_psm.pruning import kept_count, masked_factors
from keras_psm.ops import convert_to_numpy as to_numpy
from keras_psm.pruning_at_init import (
    SCORES,
    grasp_scores,
    prune_at_init,
    snip_scores,
    synflow_scores,
)


TARGET = 0.9


def support_of(factor):
    """The dense 0/1 support of a ``masked_factors`` entry (pruned entries removed)."""
    return to_numpy(factor.layer.masks[factor.index])


@pytest.fixture(scope="module")
def fresh_lenet():
    return build_lenet(seed=1)


@pytest.fixture(scope="module")
def batch(mnist_small):
    (x, y), _ = mnist_small
    return x[:128], y[:128]


@pytest.fixture(scope="module")
def pruned_masks(fresh_lenet, batch):
    """Concatenated masks of the LeNet pruned by each score."""
    masks = {}
    for score in SCORES:
        model = prune_at_init(fresh_lenet, TARGET, score, batch, iterations=10, seed=0)
        masks[score] = np.concatenate([support_of(f).ravel() for f in masked_factors(model)])
    return masks


def full_mask_copy(model):
    return keras_psm.compress(model, "hard-pruning", target_sparsity=0.0, verbose=0)[0]


@pytest.mark.parametrize("score", SCORES)
def test_masks_have_the_requested_sparsity(pruned_masks, fresh_lenet, score):
    total = sum(int(np.prod(w.shape)) for w in fresh_lenet.weights if len(w.shape) > 1)
    mask = pruned_masks[score]
    assert mask.size == total
    assert int(mask.sum()) == kept_count(total, TARGET)
    if score != "random":
        assert np.mean(mask != pruned_masks["random"]) > 0.05


def test_scores_make_different_layerwise_choices(pruned_masks, fresh_lenet):
    sizes = np.array([int(np.prod(fresh_lenet.get_layer(n).kernel.shape))
                      for n in ("conv1", "conv2", "fc1", "fc2", "fc3")])
    density = {score: [part.mean() for part in np.split(mask, np.cumsum(sizes)[:-1])]
               for score, mask in pruned_masks.items()}
    # Random pruning is uniform across layers: each layer keeps 1 - TARGET of its n entries
    # within 4 binomial standard deviations, sqrt(TARGET (1 - TARGET) / n) (0.025 for
    # conv1's 150 entries, 0.0014 for fc1's 48,000). SynFlow keeps the small first layer
    # densest.
    np.testing.assert_array_less(np.abs(np.array(density["random"]) - (1 - TARGET)),
                                 4 * np.sqrt(TARGET * (1 - TARGET) / sizes))
    assert density["synflow"][0] == max(density["synflow"])
    assert len({tuple(np.round(d, 4)) for d in density.values()}) == len(SCORES)


def test_input_model_is_unchanged_and_plain_layers_become_masked(fresh_lenet, batch):
    before = [w.copy() for w in fresh_lenet.get_weights()]
    model = prune_at_init(fresh_lenet, 0.5, "magnitude")
    for a, b in zip(before, fresh_lenet.get_weights()):
        np.testing.assert_array_equal(a, b)
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        layer = model.get_layer(name)
        assert isinstance(layer, (SparseFactorDense, SparseFactorConv2D)) and layer.n_factors == 1
    kernels = [np.abs(to_numpy(fresh_lenet.get_layer(n).kernel)).ravel()
               for n in ("conv1", "conv2", "fc1", "fc2", "fc3")]
    threshold = np.sort(np.concatenate(kernels))[::-1][kept_count(sum(k.size for k in kernels),
                                                                  0.5) - 1]
    for name, kernel in zip(("conv1", "conv2", "fc1", "fc2", "fc3"), kernels):
        np.testing.assert_array_equal(to_numpy(model.get_layer(name).masks[0]).ravel() > 0,
                                      kernel >= threshold)
    np.testing.assert_allclose(model.predict(batch[0][:4], verbose=0).sum(axis=1), 1, rtol=1e-5)


def test_snip_scores_are_connection_sensitivities(fresh_lenet, batch):
    x, y = batch
    names = ("conv1", "conv2", "fc1", "fc2", "fc3")
    kernels = [fresh_lenet.get_layer(n).kernel for n in names]
    loss = keras.losses.get("sparse_categorical_crossentropy")
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(loss(y, fresh_lenet(x, training=False)))
    gradients = tape.gradient(value, kernels)
    model = full_mask_copy(fresh_lenet)
    halves = [(x[:64], y[:64]), (x[64:], y[64:])]    # gradients summed over two batches
    scores = snip_scores(model, masked_factors(model), halves, loss)
    for score, gradient, kernel in zip(scores, gradients, kernels):
        expected = np.abs(2 * to_numpy(gradient) * to_numpy(kernel)).ravel()
        # Both sides are float32 sums over 128 samples, in a different order (two halves
        # against one batch): an entry whose terms cancel moves by ~1e-6 of the largest
        # score (measured up to 9e-7 on conv1), so atol scales with that, 10x above it.
        np.testing.assert_allclose(score, expected, rtol=1e-3,
                                   atol=1e-5 * np.abs(expected).max())


def tiny_model(seed, activation="tanh", use_bias=True, output_activation="softmax"):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(5, activation=activation, use_bias=use_bias, name="hidden")(inputs)
    outputs = keras.layers.Dense(3, activation=output_activation, use_bias=use_bias,
                                 name="out")(hidden)
    return keras.Model(inputs, outputs)


def test_grasp_scores_are_theta_times_hessian_gradient():
    temperature = 4.0
    model = full_mask_copy(tiny_model(2))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 6)).astype("float32")
    y = rng.integers(0, 3, 16)
    factors = masked_factors(model)
    loss = keras.losses.get("sparse_categorical_crossentropy")
    scores = grasp_scores(model, factors, [(x, y)], loss, temperature)

    (w1,), (w2,) = [[to_numpy(f.layer.factors[f.index]).astype("float64")] for f in factors]
    b1, b2 = (to_numpy(model.get_layer(n).bias).astype("float64") for n in ("hidden", "out"))

    def gradient(w1, w2):
        w1, w2 = tf.Variable(w1), tf.Variable(w2)
        with tf.GradientTape() as tape:
            logits = (tf.tanh(x.astype("float64") @ w1 + b1) @ w2 + b2) / temperature
            value = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
        return [to_numpy(g) for g in tape.gradient(value, [w1, w2])]

    g1, g2 = gradient(w1, w2)
    eps = 1e-4
    plus, minus = gradient(w1 + eps * g1, w2 + eps * g2), gradient(w1 - eps * g1, w2 - eps * g2)
    hessian_gradient = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
    for score, weight, hg in zip(scores, (w1, w2), hessian_gradient):
        # full supports: the stored values are the dense entries in row-major order
        np.testing.assert_allclose(score.reshape(weight.shape), weight * hg, rtol=2e-3,
                                   atol=1e-6)
    assert model.get_layer("out").activation is keras.activations.softmax


def test_synflow_scores_are_path_norm_sensitivities():
    model = full_mask_copy(tiny_model(3, activation=None, use_bias=False))
    factors = masked_factors(model)
    w1, w2 = (np.abs(to_numpy(f.layer.factors[f.index]).astype("float64")) for f in factors)
    # R = 1^T |W1| |W2| 1 without the softmax: dR/dW1_ij = (|W2| 1)_j, dR/dW2_jk = (1^T |W1|)_j.
    expected = [w1 * w2.sum(axis=1)[None, :], w2 * w1.sum(axis=0)[:, None]]
    signs = [np.sign(to_numpy(f.layer.factors[f.index])) for f in factors]
    for score, reference in zip(synflow_scores(model, factors), expected):
        np.testing.assert_allclose(score.reshape(reference.shape), reference, rtol=1e-5)
    for factor, sign in zip(factors, signs):    # the weights get their signs back
        np.testing.assert_array_equal(np.sign(to_numpy(factor.layer.factors[factor.index])), sign)
    assert model.get_layer("out").activation is keras.activations.softmax


def test_butterfly_head_factors_are_scored_inside_their_supports(fresh_lenet, batch):
    model, _ = keras_psm.compress(fresh_lenet, "butterfly", layers=["fc3"], verbose=0)
    supports = [support_of(f).copy() for f in masked_factors(model)]
    pruned = prune_at_init(model, 0.8, "snip", batch)
    factors = masked_factors(pruned)
    names = [(f.layer.name, f.index) for f in factors]
    assert names[:4] == [("conv1", 0), ("conv2", 0), ("fc1", 0), ("fc2", 0)]
    assert [n for n in names if n[0] == "fc3"] == [("fc3", i) for i in range(7)]
    head = list(zip(factors[4:], supports))     # the model held only fc3 as masked layers
    for factor, support in head:
        assert np.all(support_of(factor) <= support)
    assert any(support_of(factor).sum() < support.sum() for factor, support in head)
    allowed = sum(int(np.prod(support_of(f).shape)) for f in factors[:4]) + \
        sum(int(s.sum()) for _, s in head)
    assert sum(int(support_of(f).sum()) for f in factors) == kept_count(allowed, 0.8)


def test_layer_scope_prunes_every_factor_to_the_target(fresh_lenet, batch):
    model = prune_at_init(fresh_lenet, 0.7, "grasp", batch, scope="layer",
                          layers=["conv2", "fc1", "fc2"])
    assert type(model.get_layer("conv1")) is keras.layers.Conv2D
    for factor in masked_factors(model):
        assert support_of(factor).sum() == kept_count(int(np.prod(support_of(factor).shape)), 0.7)


def test_bad_arguments_are_rejected(fresh_lenet, batch):
    with pytest.raises(ValueError, match="snip.*needs `data`"):
        prune_at_init(fresh_lenet, 0.5, "snip")
    with pytest.raises(ValueError, match="`score` must be one of"):
        prune_at_init(fresh_lenet, 0.5, "obd", batch)
    with pytest.raises(ValueError, match="target_sparsity.*< 1"):
        prune_at_init(fresh_lenet, 1.0, "random")
    with pytest.raises(ValueError, match=r"\['fc9'\]"):
        prune_at_init(fresh_lenet, 0.5, "random", layers=["fc9"])
    with pytest.raises(ValueError, match="no Dense, Conv2D or SparseFactor layer"):
        prune_at_init(fresh_lenet, 0.5, "random", layers=["pool1"])
