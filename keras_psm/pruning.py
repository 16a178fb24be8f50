"""Magnitude pruning: the PSM paper's pruning baselines, two ways.

PSM paper, section 3.1: "Hard pruning" (HP) keeps the largest-magnitude
weights of each kernel once and fine-tunes at that constant sparsity; it is
PSM with a single factor (Q = 1). "Iterative pruning" (IP) is Zhu & Gupta
(2017): every ``frequency`` steps between ``t0 = begin_step`` and
``t0 + n dt = end_step`` the masks are recomputed by magnitude at

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3

and training goes on in between (supplement A.3).

- tfmot (``iterative_pruning``, ``hard_pruning``, ``strip``): wrappers of
  tensorflow-model-optimization, as the paper used. tfmot supports tf_keras
  only: run with ``TF_USE_LEGACY_KERAS=1`` set before TensorFlow is imported.
  tfmot is imported inside these functions only, because importing it sets
  ``TF_USE_LEGACY_KERAS=1`` for the whole process.
- native, under Keras 3 and tf_keras: the sparse-factor layers of this
  package (``SparseFactorDense``/``SparseFactorConv2D`` with one factor)
  through ``compress(model, method="hard-pruning")`` (a compact support, no
  mask) and ``compress(model, method="iterative-pruning")`` (``prunable``
  layers: a 0/1 ``keep`` mask over the stored values), whose
  ``report.callbacks`` hold the ``IterativePruning`` callback below. On the
  same model, data and schedule both keep the same number of weights: each
  pruned weight keeps ``max(1, round(size * (1 - s)))`` entries, computed in
  float32 as tfmot does.

This module owns magnitude pruning: the counts, the schedule and the
callback; ``keras_psm.methods.pruning`` registers the two methods on top of it.
"""

import collections

import numpy as np

from keras_psm.backend import LEGACY_KERAS, keras
from keras_psm.layers.base import CompressedLayer
from keras_psm.layers.sparse_factor import SparseFactorConv2D, SparseFactorDense
from keras_psm.model_layers import clone_replacing, is_graph_model, leaf_layers
from keras_psm.validation import check_float, check_int

#: Exponent of Zhu & Gupta's schedule.
POLYNOMIAL_POWER = 3

#: One prunable factor of a layer: its stored ``values`` (trainable), their 0/1
#: ``keep`` mask, and ``size``, the entries of the dense factor (rows * cols).
MaskedFactor = collections.namedtuple("MaskedFactor", "layer index values keep size")


# --- counts ---

def kept_count(size, sparsity):
    """Entries kept when ``size`` entries are pruned to ``sparsity``.

    ``max(1, round(size * (1 - sparsity)))`` in float32 with ties to even,
    exactly as tfmot counts them.
    """
    kept = np.float32(size) * (np.float32(1.0) - np.float32(sparsity))
    return int(max(1, np.round(kept)))


def top_k_mask(scores, k, support=None):
    """Boolean mask of the ``k`` largest ``scores`` among ``support``.

    Exactly ``min(k, support.sum())`` entries are kept (ties broken by
    position); entries outside ``support`` are never kept.
    """
    scores = np.asarray(scores, dtype=np.float64)
    flat = scores.ravel()
    allowed = np.ones(flat.size, dtype=bool) if support is None else \
        np.asarray(support, dtype=bool).ravel()
    candidates = np.flatnonzero(allowed)
    mask = np.zeros(flat.size, dtype=bool)
    if k >= candidates.size:
        mask[candidates] = True
    elif k > 0:
        mask[candidates[np.argpartition(-flat[candidates], k - 1)[:k]]] = True
    return mask.reshape(scores.shape)


def check_sparsity(value, name, where):
    """A sparsity (fraction of zeros) in [0, 1), tfmot's range."""
    value = check_float(value, name, minimum=0.0, where=where)
    if value >= 1.0:
        raise ValueError(f"{where}: `{name}` must be >= 0 and < 1, got {value}.")
    return value


def check_schedule(where, target_sparsity, begin_step, end_step, frequency, initial_sparsity):
    """Validated ``(target_sparsity, begin_step, end_step, frequency, initial_sparsity)``."""
    target_sparsity = check_sparsity(target_sparsity, "target_sparsity", where)
    begin_step = check_int(begin_step, "begin_step", minimum=0, where=where)
    end_step = check_int(end_step, "end_step", minimum=begin_step + 1, where=where)
    frequency = check_int(frequency, "frequency", minimum=1, where=where)
    initial_sparsity = check_float(initial_sparsity, "initial_sparsity", minimum=0.0,
                                   maximum=target_sparsity, where=where)
    return target_sparsity, begin_step, end_step, frequency, initial_sparsity


# --- the schedule ---

def polynomial_sparsity(step, initial_sparsity, target_sparsity, begin_step, end_step):
    """Zhu & Gupta's ``s_t`` at ``step`` (float32, clamped to [begin, end] like tfmot)."""
    progress = np.float32(step - begin_step) / np.float32(end_step - begin_step)
    progress = np.clip(progress, np.float32(0.0), np.float32(1.0))
    decay = np.power(np.float32(1.0) - progress, np.float32(POLYNOMIAL_POWER))
    return float(np.float32(initial_sparsity - target_sparsity) * decay
                 + np.float32(target_sparsity))


def is_pruning_step(step, begin_step, end_step, frequency):
    """True when masks are recomputed at ``step``: in [begin, end], every ``frequency``."""
    return begin_step <= step <= end_step and (step - begin_step) % frequency == 0


# --- native magnitude pruning on masked layers ---

def masked_factors(model, layers=None):
    """The factors of a model's ``SparseFactorDense``/``SparseFactorConv2D`` layers.

    ``layers``: None (all of them), a list of layer names, or a predicate
    ``layer -> bool``. Nested models are searched too. ``keep`` is None for
    a layer that is not ``prunable``.
    """
    selected = [
        layer for layer in leaf_layers(model)
        if isinstance(layer, (SparseFactorDense, SparseFactorConv2D))
        and is_selected(layer, layers)
    ]
    return [
        MaskedFactor(layer, index, values, layer.keeps[index] if layer.prunable else None,
                     rows * cols)
        for layer in selected
        for index, (values, (rows, cols)) in enumerate(zip(layer.values, layer.factor_shapes))
    ]


def prune_by_magnitude(factors, sparsity):
    """Keep in each factor its ``kept_count(size, sparsity)`` largest ``|values * keep|``.

    Entries already pruned stay out.
    """
    for factor in factors:
        keep = factor.keep.numpy()
        support = keep > 0
        kept = top_k_mask(np.abs(factor.values.numpy()) * support,
                          kept_count(factor.size, sparsity), support)
        factor.keep.assign(kept.astype(keep.dtype))


class IterativePruning(keras.callbacks.Callback):
    """Zhu & Gupta's iterative magnitude pruning of masked layers, as a callback.

    At training step ``t`` (1 for the first batch a fresh optimizer sees, as
    in tfmot), if ``begin_step <= t <= end_step`` and ``(t - begin_step)`` is a
    multiple of ``frequency``, every selected factor keeps its
    ``kept_count(size, s_t)`` largest magnitudes (``prune_by_magnitude``).
    Pruned entries never come back. Works under Keras 3 and tf_keras.

    Args:
        target_sparsity: s_f, fraction of zeros reached at ``end_step``, in [0, 1).
        begin_step, end_step: t0 and t0 + n dt (``end_step > begin_step >= 0``).
        frequency: dt, steps between two mask updates (>= 1).
        initial_sparsity: s_i, in [0, target_sparsity].
        layers: which masked layers to prune: None (all ``SparseFactorDense``/
            ``SparseFactorConv2D`` layers), layer names, or a predicate.
    """

    def __init__(self, target_sparsity, begin_step=0, end_step=1000, frequency=100,
                 initial_sparsity=0.0, layers=None):
        super().__init__()
        self.target_sparsity, self.begin_step, self.end_step, self.frequency, \
            self.initial_sparsity = check_schedule(
                "IterativePruning", target_sparsity, begin_step, end_step, frequency,
                initial_sparsity)
        self.layers = layers
        self.step = 0
        self._factors = []

    def sparsity_at(self, step):
        """``s_t`` of the schedule at ``step``."""
        return polynomial_sparsity(step, self.initial_sparsity, self.target_sparsity,
                                   self.begin_step, self.end_step)

    def on_train_begin(self, logs=None):
        self._factors = [factor for factor in masked_factors(self.model, self.layers)
                         if factor.keep is not None]
        if not self._factors:
            raise ValueError(
                f"IterativePruning: model {self.model.name!r} has no prunable layers to prune "
                "(SparseFactorDense/SparseFactorConv2D with prunable=True). Build them with "
                "keras_psm.compress(model, method='iterative-pruning')."
            )
        self.step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_begin(self, batch, logs=None):
        self.step += 1
        if is_pruning_step(self.step, self.begin_step, self.end_step, self.frequency):
            # Reaching the variables through ``self.model`` brings them up to date on
            # JAX, whose ``fit`` holds their values apart within an epoch, and makes
            # it take the new masks for the next step.
            self.model  # noqa: B018
            prune_by_magnitude(self._factors, self.sparsity_at(self.step))


# --- tfmot baselines (tf_keras only) ---

def iterative_pruning(model, target_sparsity, begin_step=0, end_step=1000, frequency=100,
                      initial_sparsity=0.0, layers=None):
    """Zhu & Gupta iterative pruning with tfmot's ``prune_low_magnitude`` (tf_keras only).

    Args:
        model: a built functional or Sequential tf_keras model; not modified
            (its layers are copied before wrapping).
        target_sparsity, begin_step, end_step, frequency, initial_sparsity:
            tfmot's ``PolynomialDecay(initial_sparsity, target_sparsity,
            begin_step, end_step, power=3, frequency)``.
        layers: which layers to prune: None (every Dense, Conv2D and layer of
            this package with prunable weights), layer names, or a predicate.

    Returns:
        ``(pruned_model, callbacks)``. Compile ``pruned_model`` (the wrappers
        need a new compile) and pass ``callbacks`` (tfmot's
        ``UpdatePruningStep``) to ``fit``; ``strip`` removes the wrappers.

    Raises:
        RuntimeError: under Keras 3 (see ``LEGACY_KERAS``).
    """
    tfmot = _import_tfmot("iterative_pruning")
    schedule = check_schedule("iterative_pruning", target_sparsity, begin_step, end_step,
                              frequency, initial_sparsity)
    target_sparsity, begin_step, end_step, frequency, initial_sparsity = schedule
    pruning_schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=initial_sparsity, final_sparsity=target_sparsity,
        begin_step=begin_step, end_step=end_step, power=POLYNOMIAL_POWER, frequency=frequency)
    pruned = _wrap_for_pruning(tfmot, model, pruning_schedule, layers, "iterative_pruning")
    return pruned, [tfmot.sparsity.keras.UpdatePruningStep()]


def hard_pruning(model, target_sparsity, layers=None):
    """One-shot magnitude pruning with tfmot, then fine-tuning at constant sparsity.

    The masks are computed at once (each pruned weight keeps its
    ``kept_count(size, target_sparsity)`` largest magnitudes) and never
    change during ``fit``. tf_keras only; ``layers`` as in ``iterative_pruning``.

    Returns:
        ``(pruned_model, callbacks)``, as ``iterative_pruning``.
    """
    tfmot = _import_tfmot("hard_pruning")
    target_sparsity = check_sparsity(target_sparsity, "target_sparsity", "hard_pruning")
    # Masks are updated at step 0 only: now, below. Training steps start at 1.
    schedule = tfmot.sparsity.keras.ConstantSparsity(
        target_sparsity, begin_step=0, end_step=0, frequency=1)
    pruned = _wrap_for_pruning(tfmot, model, schedule, layers, "hard_pruning")
    for wrapper in _pruning_wrappers(pruned):
        wrapper.pruning_step.assign(0)
        wrapper.pruning_obj.conditional_mask_update()
        wrapper.pruning_obj.weight_mask_op()
    return pruned, [tfmot.sparsity.keras.UpdatePruningStep()]


def strip(model):
    """Remove tfmot's pruning wrappers for saving and export (tf_keras only).

    The wrapped layers' weights are set to ``weight * mask`` first. The
    returned model shares its layers with ``model``.
    """
    tfmot = _import_tfmot("strip")
    for wrapper in _pruning_wrappers(model):
        wrapper.pruning_obj.weight_mask_op()
    return tfmot.sparsity.keras.strip_pruning(model)


def _import_tfmot(function_name):
    """tensorflow_model_optimization, imported only under tf_keras."""
    if not LEGACY_KERAS:
        raise RuntimeError(
            f"keras_psm.pruning.{function_name} uses tensorflow-model-optimization, which "
            "supports tf_keras only, and keras_psm runs on Keras 3. Set "
            "TF_USE_LEGACY_KERAS=1 before importing TensorFlow (and keras_psm), or use the "
            "native pruning, which works with both: keras_psm.compress(model, "
            "method='iterative-pruning', ...) and fit with report.callbacks, or "
            "keras_psm.compress(model, method='hard-pruning', ...)."
        )
    import tensorflow_model_optimization as tfmot

    # The package's layers declare what may be pruned via get_prunable_weights.
    tfmot.sparsity.keras.PrunableLayer.register(CompressedLayer)
    return tfmot


def _wrap_for_pruning(tfmot, model, schedule, layers, where):
    """A copy of ``model`` whose selected layers are wrapped by ``PruneLowMagnitude``."""
    if not isinstance(model, keras.Model) or not is_graph_model(model):
        raise TypeError(
            f"{where}: `model` must be a functional or Sequential {keras.__name__} model, "
            f"got {type(model).__name__}."
        )
    check_layer_names(model, layers, where)
    def replace(layer):
        if not (_is_prunable(layer) and is_selected(layer, layers)):
            return None
        copy = layer.__class__.from_config(layer.get_config())
        copies.append((layer, copy))
        return tfmot.sparsity.keras.prune_low_magnitude(copy, pruning_schedule=schedule)

    copies = []
    pruned = clone_replacing(model, replace)
    for original, copy in copies:
        copy.set_weights(original.get_weights())
    if not _pruning_wrappers(pruned):
        raise ValueError(f"{where}: no layer of model {model.name!r} was selected for pruning.")
    return pruned


def _pruning_wrappers(model):
    # tfmot's public API does not export the wrapper class; its callbacks use this module.
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    return [layer for layer in leaf_layers(model)
            if isinstance(layer, pruning_wrapper.PruneLowMagnitude)]


def _is_prunable(layer):
    if isinstance(layer, CompressedLayer):
        return bool(layer.get_prunable_weights())
    return type(layer) in (keras.layers.Dense, keras.layers.Conv2D)


def check_layer_names(model, layers, where):
    """Raise ``ValueError`` if ``layers`` (None, names or a predicate) names an unknown layer."""
    if layers is None or callable(layers):
        return
    names = [layers] if isinstance(layers, str) else list(layers)
    known = {layer.name for layer in leaf_layers(model)}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ValueError(f"{where}: `layers` names {unknown}, which model {model.name!r} "
                         f"does not have; its layers are {sorted(known)}.")


def is_selected(layer, layers):
    """Whether ``layers`` (None: all, layer names, or a predicate) selects ``layer``."""
    if layers is None:
        return True
    if callable(layers):
        return bool(layers(layer))
    return layer.name in ([layers] if isinstance(layers, str) else layers)


__all__ = [
    "IterativePruning",
    "MaskedFactor",
    "check_layer_names",
    "check_schedule",
    "check_sparsity",
    "hard_pruning",
    "is_pruning_step",
    "is_selected",
    "iterative_pruning",
    "kept_count",
    "masked_factors",
    "polynomial_sparsity",
    "prune_by_magnitude",
    "strip",
    "top_k_mask",
]
