"""Pruning at initialization: score the entries of every masked factor, keep the best.

The butterfly seed (section 3.1) compares five ways to choose the masks of a
freshly built network before training, on plain layers and beside
factorized ones (its "butterfly head"). For an entry of ``theta = weight * mask``:

- ``random``: S ~ U(0, 1);
- ``magnitude``: S = |theta|;
- ``snip`` (Lee et al. 2019, connection sensitivity): S = |theta * dL/dtheta|;
- ``grasp`` (Wang et al. 2020, gradient flow): S = theta * (H g), with
  g = dL/dtheta and H the Hessian of L, the loss computed on the logits
  divided by a temperature T. Keeping the largest S removes the entries
  whose removal would most reduce the gradient flow (the paper's top -theta * Hg);
- ``synflow`` (Tanaka et al. 2020, data-free): S = theta * dR/dtheta with
  R = 1^T f(1; |theta|), the output of the network whose weights are
  replaced by their absolute values, on an all-ones input, without the
  output activation. Scoring and pruning alternate for ``iterations``
  rounds, round i keeping the fraction (1 - s)^(i / iterations).

Gradients are summed over the given batches. Entries are chosen globally (all
scored entries ranked together, the default) or per factor. The target
sparsity is the fraction of the stored entries that is removed (for a plain
layer: of all its entries); an entry outside a support (a butterfly or PSM
support) never comes back.

Plain Dense/Conv2D layers are first turned into sparse-factor layers on the
full support (``compress(..., method="hard-pruning", target_sparsity=0)``);
``SparseFactorDense``/``SparseFactorConv2D`` layers already in the model have
every factor scored. The returned layers store the kept entries only
(values and indices), so the removed ones stay removed during ``fit``.

The gradient scores (snip, grasp, synflow) take their gradients with
TensorFlow's ``GradientTape`` and need the TensorFlow backend; random and
magnitude scores run on every backend.
"""

import contextlib

import numpy as np

from keras_psm import ops
from keras_psm.backend import keras, require_tensorflow_backend
from keras_psm.compress import compress
from keras_psm.model_layers import clone_replacing
from keras_psm.pruning import (
    check_layer_names,
    check_sparsity,
    is_selected,
    kept_count,
    masked_factors,
    top_k_mask,
)
from keras_psm.validation import check_choice, check_float, check_int

#: The scores ``prune_at_init`` accepts.
SCORES = ("random", "magnitude", "snip", "grasp", "synflow")
GRADIENT_SCORES = ("snip", "grasp", "synflow")
SCOPES = ("global", "layer")


def prune_at_init(model, target_sparsity, score="snip", data=None, *,
                  loss="sparse_categorical_crossentropy", layers=None, scope="global",
                  iterations=100, temperature=200.0, seed=None):
    """A copy of ``model`` whose sparse-factor layers keep the best-scoring entries.

    Args:
        model: a built functional or Sequential model (freshly initialised,
            typically); not modified.
        target_sparsity: fraction of the scored layers' stored entries to
            remove (for plain layers: of all their entries), in [0, 1).
        score: one of ``SCORES``.
        data: ``(x, y)`` (one batch) or an iterable of ``(x, y)`` batches;
            needed by ``snip`` and ``grasp``.
        loss: a Keras loss (name or callable ``loss(y_true, y_pred)``) for
            ``snip`` and ``grasp``.
        layers: which layers to score: None (every Dense, Conv2D and
            SparseFactor layer), layer names, or a predicate ``layer -> bool``.
        scope: ``"global"`` ranks all entries together; ``"layer"`` prunes
            each factor to ``target_sparsity`` on its own.
        iterations: rounds of ``synflow``.
        temperature: T of ``grasp``.
        seed: seed of the ``random`` scores.

    Returns:
        The new model, not compiled.
    """
    where = "prune_at_init"
    target_sparsity = check_sparsity(target_sparsity, "target_sparsity", where)
    check_choice(score, "score", SCORES, where=where)
    check_choice(scope, "scope", SCOPES, where=where)
    iterations = check_int(iterations, "iterations", minimum=1, where=where)
    temperature = check_float(temperature, "temperature", minimum=0.0, exclusive_minimum=True,
                              where=where)
    check_layer_names(model, layers, where)
    batches = _batches(data, score) if score in ("snip", "grasp") else None
    loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss

    working, _ = compress(model, "hard-pruning", layers=lambda layer: is_selected(layer, layers),
                          target_sparsity=0.0, verbose=0)
    factors = masked_factors(working, layers)
    if not factors:
        raise ValueError(f"{where}: model {model.name!r} has no Dense, Conv2D or "
                         "SparseFactor layer to prune among the selected layers.")
    if score in GRADIENT_SCORES:
        require_tensorflow_backend(f"prune_at_init(score={score!r})",
                                   "the 'random' and 'magnitude' scores run on every backend.")
    keeps = [np.ones(int(f.values.shape[0]), dtype=bool) if f.keep is None
             else f.keep.numpy() > 0 for f in factors]
    _remove(factors, keeps)
    sizes = [int(keep.sum()) for keep in keeps]
    if score == "synflow":
        for round_index in range(1, iterations + 1):
            sparsity = target_sparsity if round_index == iterations else \
                1.0 - (1.0 - target_sparsity) ** (round_index / iterations)
            keeps = _best(synflow_scores(working, factors), keeps, sparsity, scope, sizes)
            _remove(factors, keeps)
    else:
        scores = {
            "random": lambda: random_scores(factors, seed),
            "magnitude": lambda: magnitude_scores(factors),
            "snip": lambda: snip_scores(working, factors, batches, loss_fn),
            "grasp": lambda: grasp_scores(working, factors, batches, loss_fn, temperature),
        }[score]()
        keeps = _best(scores, keeps, target_sparsity, scope, sizes)
    return _keeping_only(working, factors, keeps)


def random_scores(factors, seed=None):
    """S ~ U(0, 1) for every entry."""
    rng = np.random.default_rng(seed)
    return [rng.random(tuple(factor.values.shape)) for factor in factors]


def magnitude_scores(factors):
    """S = |theta|."""
    return [np.abs(_theta(factor)) for factor in factors]


def snip_scores(model, factors, batches, loss):
    """SNIP: S = |theta * dL/dtheta|, gradients summed over ``batches``."""
    gradients = _summed(_gradients(model, factors, x, y, loss) for x, y in batches)
    return [np.abs(g * _theta(f)) for g, f in zip(gradients, factors)]


def grasp_scores(model, factors, batches, loss, temperature=200.0):
    """GraSP: S = theta * (H g), the loss on logits / ``temperature``.

    ``g`` is the gradient summed over ``batches`` (held constant); ``H g`` is
    the gradient of ``g . dL/dtheta``, again summed over ``batches``.
    """
    from keras_psm.backend import tf  # gradients through TensorFlow's tape

    with _output_activation(model, lambda activation: lambda z: activation(z / temperature)):
        held = [tf.constant(g, dtype=tf.float32) for g in
                _summed(_gradients(model, factors, x, y, loss) for x, y in batches)]
        hessian_gradient = _summed(
            _hessian_gradient(model, factors, x, y, loss, held) for x, y in batches)
    return [hg * _theta(f) for hg, f in zip(hessian_gradient, factors)]


def synflow_scores(model, factors):
    """SynFlow: S = theta * dR/dtheta, R = sum f(1; |theta|) without the output activation."""
    from keras_psm.backend import tf  # gradients through TensorFlow's tape

    inputs = _ones_input(model)
    weights = [factor.values for factor in factors]
    with _absolute_weights(model), _output_activation(model, lambda activation: _identity):
        with tf.GradientTape() as tape:
            flow = ops.sum(ops.cast(model(inputs, training=False), "float32"))
        gradients = tape.gradient(flow, weights)
        return [_numpy(g) * _theta(f) for g, f in zip(gradients, factors)]


def _best(scores, keeps, sparsity, scope, sizes):
    """The best ``scores`` among the entries ``keeps`` holds: ``kept_count(size, sparsity)``
    entries, ``sizes`` being the factors' support sizes before pruning."""
    if scope == "layer":
        return [top_k_mask(s, kept_count(n, sparsity), k) for s, k, n in zip(scores, keeps, sizes)]
    flat = top_k_mask(np.concatenate([s.ravel() for s in scores]),
                      kept_count(sum(sizes), sparsity),
                      np.concatenate([k.ravel() for k in keeps]))
    return np.split(flat, np.cumsum([s.size for s in scores])[:-1])


def _remove(factors, keeps):
    """Set the values of the entries ``keeps`` leaves out to zero."""
    for factor, keep in zip(factors, keeps):
        factor.values.assign(factor.values.numpy() * keep)


def _keeping_only(model, factors, keeps):
    """A copy of ``model`` whose scored layers store the entries ``keeps`` selects only."""
    chosen = {}
    for factor, keep in zip(factors, keeps):
        chosen.setdefault(id(factor.layer), (factor.layer, {}))[1][factor.index] = keep
    replacements = {key: layer.keeping([by_index[i] for i in range(layer.n_factors)])
                    for key, (layer, by_index) in chosen.items()}
    return clone_replacing(model, lambda layer: replacements.get(id(layer)))


def _gradients(model, factors, x, y, loss):
    """dL/dtheta on the stored entries, for one batch."""
    from keras_psm.backend import tf  # gradients through TensorFlow's tape

    weights = [factor.values for factor in factors]
    with tf.GradientTape() as tape:
        value = _loss(model, x, y, loss)
    return [_numpy(g) for g in tape.gradient(value, weights)]


def _hessian_gradient(model, factors, x, y, loss, held):
    """H g for one batch: the gradient of ``sum(held * dL/dtheta)``."""
    from keras_psm.backend import tf  # gradients through TensorFlow's tape

    weights = [factor.values for factor in factors]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            value = _loss(model, x, y, loss)
        gradients = inner.gradient(value, weights)
        product = sum(ops.sum(ops.cast(g, "float32") * h) for g, h in zip(gradients, held))
    return [_numpy(g) for g in outer.gradient(product, weights)]


def _loss(model, x, y, loss):
    outputs = model(ops.convert_to_tensor(x), training=False)
    return ops.mean(ops.cast(loss(ops.convert_to_tensor(y), outputs), "float32"))


def _theta(factor):
    """The stored values, pruned entries (and those a ``keep`` mask removes) at zero."""
    values = factor.values.numpy()
    return values if factor.keep is None else values * factor.keep.numpy()


def _numpy(gradient):
    return np.asarray(gradient, dtype=np.float64)


def _summed(arrays):
    total = None
    for values in arrays:
        total = values if total is None else [a + b for a, b in zip(total, values)]
    return total


def _identity(outputs):
    return outputs


@contextlib.contextmanager
def _absolute_weights(model):
    """Every float weight of ``model`` replaced by its absolute value, restored on exit."""
    saved = [(variable, variable.numpy()) for variable in model.weights
             if "float" in str(variable.dtype)]
    try:
        for variable, value in saved:
            variable.assign(np.abs(value))
        yield
    finally:
        for variable, value in saved:
            variable.assign(value)


@contextlib.contextmanager
def _output_activation(model, replace):
    """The output layer's activation ``a`` set to ``replace(a)`` while inside.

    Layers without an ``activation`` attribute are left as they are.
    """
    layer = model
    while isinstance(layer, keras.Model):
        layer = layer.outputs[0]._keras_history[0]
    original = getattr(layer, "activation", None)
    if original is None:
        yield
        return
    layer.activation = replace(original)
    try:
        yield
    finally:
        layer.activation = original


def _ones_input(model):
    if len(model.inputs) != 1:
        raise ValueError(f"prune_at_init: synflow needs a model with one input, "
                         f"model {model.name!r} has {len(model.inputs)}.")
    shape = tuple(model.inputs[0].shape)[1:]
    if any(dim is None for dim in shape):
        raise ValueError(f"prune_at_init: synflow needs a fully known input shape, "
                         f"model {model.name!r} takes {(None,) + shape}.")
    return ops.ones((1,) + shape)


def _batches(data, score):
    """``data`` as a list of ``(x, y)`` batches."""
    if data is None:
        raise ValueError(f"prune_at_init: score {score!r} needs `data`: (x, y) or an "
                         "iterable of (x, y) batches.")
    batches = [data] if isinstance(data, tuple) and len(data) == 2 else list(data)
    if not batches or not all(isinstance(b, (tuple, list)) and len(b) == 2 for b in batches):
        raise ValueError("prune_at_init: `data` must be (x, y) or a non-empty iterable of "
                         "(x, y) batches.")
    return batches


__all__ = [
    "SCORES",
    "grasp_scores",
    "magnitude_scores",
    "prune_at_init",
    "random_scores",
    "snip_scores",
    "synflow_scores",
]
