"""``hard-pruning`` and ``iterative-pruning``: magnitude pruning on masked layers.

PSM paper, section 3.1: hard pruning is PSM with a single factor (Q = 1)
whose support keeps the largest magnitudes; iterative pruning (Zhu & Gupta
2017) recomputes that support during training on a polynomial schedule.
Both replace each Dense/Conv2D by ``SparseFactorDense``/``SparseFactorConv2D``
with one factor and work under Keras 3 and tf_keras (``keras_psm.pruning``
owns the counts and the callback, and holds the tfmot versions the paper used).

- ``hard-pruning``: each kernel keeps its ``kept_count(size, target_sparsity)``
  largest magnitudes, at once, stored compactly (values and indices only);
  fine-tuning keeps that support.
- ``iterative-pruning``: ``prunable`` layers on the full support (a 0/1
  ``keep`` mask over the stored values); ``report.callbacks`` holds the
  ``IterativePruning`` callback that prunes them during ``fit``.

Both count kept entries as tfmot does, so on the same model and schedule the
two implementations reach the same number of nonzeros.
"""

import dataclasses
import functools

import numpy as np

from keras_psm.budget import Estimate, fraction_grid
from keras_psm.factorize.calibrated import input_norm_scores, whitening_factor
from keras_psm.methods.psm import PSM_PAPER, build_sparse_factor_layer, kernel_matrix
from keras_psm.methods.psm_variants import factorization_from
from keras_psm.methods.registry import Method, register_method
from keras_psm.pruning import (
    IterativePruning,
    check_schedule,
    check_sparsity,
    kept_count,
    top_k_mask,
)


@dataclasses.dataclass(frozen=True)
class HardPruningConfig:
    """Options of ``method="hard-pruning"``.

    Attributes:
        target_sparsity: fraction of each kernel's entries set to zero, in [0, 1).
    """

    target_sparsity: float = 0.9

    def __post_init__(self):
        check_sparsity(self.target_sparsity, "target_sparsity", type(self).__name__)


@dataclasses.dataclass(frozen=True)
class IterativePruningConfig:
    """Options of ``method="iterative-pruning"`` (Zhu & Gupta's schedule).

    Attributes:
        target_sparsity: s_f, fraction of zeros of every kernel at ``end_step``.
        begin_step, end_step: t0 and t0 + n dt, in training steps (batches).
        frequency: dt, steps between two mask updates.
        initial_sparsity: s_i, sparsity of the first update.
    """

    target_sparsity: float = 0.9
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0

    def __post_init__(self):
        check_schedule(type(self).__name__, self.target_sparsity, self.begin_step,
                       self.end_step, self.frequency, self.initial_sparsity)


def fit_hard_pruning(kernel, config, covariance=None):
    """The kernel matrix restricted to its largest magnitudes (one factor).

    With the layer's input ``covariance``, the largest ``|W_ij| ||x_i||`` instead.
    """
    matrix = kernel_matrix(kernel)
    scores = np.abs(matrix) if covariance is None else input_norm_scores(matrix, covariance)
    support = top_k_mask(scores, kept_count(matrix.size, config.target_sparsity))
    return factorization_from(matrix, [matrix * support], [support])


def pruning_sizes(kernel_shape, config):
    """``target_ratio`` ladder: kept fractions on ``fraction_grid`` of the kernel's size."""
    return [[dataclasses.replace(config, target_sparsity=1.0 - kept)
             for kept in fraction_grid(int(np.prod(kernel_shape)))]]


def pruning_estimates(kernel, ladder, covariance=None, limit=np.inf):
    """Exact errors of a ladder's kept fractions from one sort (``Method.size_estimates``).

    Keeping the k largest scores leaves the other entries ``E_k`` of W:
    ``||E_k||_F^2`` is a sum of the sorted squares, all k from one cumulative
    sum; with ``covariance`` (``R^T R``), ``||R E_k||_F`` for each k. Stops
    after the first size past ``limit`` nonzeros.
    """
    matrix = kernel_matrix(kernel).astype(np.float64)
    scores = np.abs(matrix) if covariance is None else input_norm_scores(matrix, covariance)
    order = np.argsort(-scores, axis=None, kind="stable")
    factor = None if covariance is None else whitening_factor(covariance)
    squares = np.square(matrix.ravel()[order])
    dropped = np.append(np.cumsum(squares[::-1])[::-1], 0.0)  # dropped[k]: all but the top k
    total = np.linalg.norm(matrix if factor is None else factor @ matrix) ** 2
    estimates = []
    for config in ladder:
        kept = kept_count(matrix.size, config.target_sparsity)
        if factor is None:
            error = dropped[kept]
        else:
            left = matrix.ravel().copy()
            left[order[:kept]] = 0.0
            error = np.linalg.norm(factor @ left.reshape(matrix.shape)) ** 2
        estimates.append(Estimate(kept, float(np.sqrt(error / max(total, 1e-300)))))
        if kept > limit:
            break
    return estimates


def pruning_target(config, kept_fraction):
    """``target_sparsity`` for a kept fraction of the kernels' values."""
    return dataclasses.replace(config, target_sparsity=max(0.0, 1.0 - kept_fraction))


def fit_full_mask(kernel, config):
    """The kernel matrix itself, with a full mask, for pruning during training."""
    matrix = kernel_matrix(kernel)
    return factorization_from(matrix, [matrix], [np.ones(matrix.shape, dtype=bool)])


def iterative_pruning_callbacks(model, config):
    """The ``IterativePruning`` callback for the model's one-factor prunable layers."""
    return [IterativePruning(
        config.target_sparsity, begin_step=config.begin_step, end_step=config.end_step,
        frequency=config.frequency, initial_sparsity=config.initial_sparsity,
        layers=lambda layer: layer.n_factors == 1,
    )]


HARD_PRUNING = register_method(Method(
    name="hard-pruning",
    description="one-shot magnitude pruning (PSM with one factor)",
    config_class=HardPruningConfig,
    fit=fit_hard_pruning,
    build=build_sparse_factor_layer,
    presets={"small": dict(target_sparsity=0.98), "large": dict(target_sparsity=0.9)},
    paper=PSM_PAPER,
    calibrated=True,
    size_knob=pruning_sizes,
    size_estimates=pruning_estimates,
))

ITERATIVE_PRUNING = register_method(Method(
    name="iterative-pruning",
    description="magnitude pruning during fine-tuning, Zhu & Gupta schedule (callback)",
    config_class=IterativePruningConfig,
    fit=fit_full_mask,
    build=functools.partial(build_sparse_factor_layer, prunable=True),
    callbacks=iterative_pruning_callbacks,
    presets={
        "small": dict(target_sparsity=0.98, end_step=500, frequency=50),
        "large": dict(target_sparsity=0.9, end_step=500, frequency=50),
    },
    paper=PSM_PAPER,
    size_target=pruning_target,
))
