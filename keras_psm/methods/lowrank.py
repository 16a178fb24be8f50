"""``method="svd"`` and ``method="alds"``: low-rank layers by truncated SVD (ALDS seed).

- ``"svd"``: every layer keeps the same fraction of its rank, one chunk,
  scheme 0 (the SVD baseline of the ALDS paper, after Denton et al. 2014).
- ``"alds"``: a global target (the fraction of the compressed layers'
  kernel values to remove) is spread over the layers by ALDS (Algorithm 1):
  each layer gets its own rank j and number of channel chunks k, chosen so
  that the largest relative error over the layers is as small as the
  search finds; ``alds_plus=True`` also picks each Conv2D's flattening
  scheme (ALDS+, supplement A.6).
"""

import dataclasses

import numpy as np

from keras_psm.backend import keras
from keras_psm.budget import Estimate, knob_grid
from keras_psm.factorize.calibrated import whitened_svd, whitening_factor
from keras_psm.factorize.lowrank import (
    NORMS,
    SCHEMES,
    alds_allocation,
    LowRankFactors,
    factor_kernel,
    max_rank,
    rank_for_ratio,
)
from keras_psm.layers.base import common_options, conv_options
from keras_psm.layers.lowrank import LowRankConv, LowRankDense
from keras_psm.methods.registry import Method, register_method
from keras_psm.validation import check_bool, check_choice, check_float, check_int

ALDS_PAPER = (
    "Compressing Neural Networks: Towards Determining the Optimal Layer-wise "
    "Decomposition (ALDS)"
)


@dataclasses.dataclass(frozen=True)
class SVDConfig:
    """Options of ``method="svd"``.

    Attributes:
        rank_ratio: fraction of each layer's full rank kept, in (0, 1]:
            rank ceil(rank_ratio * min(rows, cols)) of the kernel matrix
            (a Conv2D's (kh kw cin, cout)). A factored layer stores
            rank * (rows + cols) values, fewer than the kernel when
            rank_ratio < rows cols / (min(rows, cols) (rows + cols)).
    """

    rank_ratio: float = 0.25

    def __post_init__(self):
        check_float(self.rank_ratio, "rank_ratio", minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, where=type(self).__name__)


@dataclasses.dataclass(frozen=True)
class ALDSConfig:
    """Options of ``method="alds"``.

    Attributes:
        target: fraction of the compressed layers' kernel values removed, in
            (0, 1) (biases are kept as they are).
        alds_plus: also search the flattening schemes 0-3 of each Conv2D (ALDS+).
        n_seeds: starting points of the search (the authors use 15).
        n_iter: alternations of the rank and subspace steps per seed (4).
        norm: relative error equalized across layers: ``"frobenius"`` (the
            error ``compress`` reports) or ``"operator"`` (the authors' measure).
        seed: seed of the random starting points.
    """

    target: float = 0.5
    alds_plus: bool = False
    n_seeds: int = 15
    n_iter: int = 4
    norm: str = "frobenius"
    seed: int = 0

    def __post_init__(self):
        where = type(self).__name__
        check_float(self.target, "target", minimum=0.0, maximum=1.0, exclusive_minimum=True,
                    where=where)
        if self.target >= 1.0:
            raise ValueError(f"{where}: `target` must be < 1, got {self.target}.")
        check_bool(self.alds_plus, "alds_plus", where=where)
        check_int(self.n_seeds, "n_seeds", minimum=1, where=where)
        check_int(self.n_iter, "n_iter", minimum=0, where=where)
        check_choice(self.norm, "norm", NORMS, where=where)
        check_int(self.seed, "seed", minimum=0, where=where)


@dataclasses.dataclass(frozen=True)
class LowRankLayerConfig:
    """One layer's factorization: rank j per chunk, ``groups`` chunks, ``scheme``.

    ``method="alds"`` produces one per layer from its ``ALDSConfig``.
    """

    rank: int
    groups: int = 1
    scheme: int = 0

    def __post_init__(self):
        where = type(self).__name__
        check_int(self.rank, "rank", minimum=1, where=where)
        check_int(self.groups, "groups", minimum=1, where=where)
        check_choice(self.scheme, "scheme", SCHEMES, where=where)


def fit_svd(kernel, config, covariance=None):
    """Truncated SVD keeping ``config.rank_ratio`` of the kernel's rank.

    With the layer's input ``covariance``, the whitened SVD (``||X (W - W_hat)||_F``).
    """
    rank = rank_for_ratio(config.rank_ratio, max_rank(kernel.shape))
    if covariance is None:
        return factor_kernel(kernel, rank)
    encoder, decoder = whitened_svd(kernel.reshape(-1, kernel.shape[-1]),
                                    whitening_factor(covariance), rank)
    encoder = encoder.reshape(kernel.shape[:-1] + (rank,))
    decoder = decoder if kernel.ndim == 2 else decoder[None, None]
    return LowRankFactors(encoder, decoder, rank, 1, 0)


def svd_sizes(kernel_shape, config):
    """``target_ratio`` ladder: ranks on ``knob_grid`` up to where rank (rows + cols) reaches
    rows cols (``rank_ratio`` just under rank / full rank, so the rank is exact)."""
    full = max_rank(kernel_shape)
    rows, cols = int(np.prod(kernel_shape[:-1])), kernel_shape[-1]
    top = min(full, max(1, rows * cols // (rows + cols)))
    return [[dataclasses.replace(config, rank_ratio=(rank - 0.5) / full)
             for rank in knob_grid(top)]]


def svd_estimates(kernel, ladder, covariance=None, limit=None):
    """Exact errors of a ladder's ranks from one SVD (``Method.size_estimates``).

    Truncating ``R W = U S V^T`` (``R = I`` without ``covariance``) to rank j
    leaves ``||R (W - W_j)||_F^2 = sum_{i > j} s_i^2`` (Eckart-Young; the
    whitened SVD of SVD-LLM for ``R^T R = covariance``); a rank-j layer holds
    j (rows + cols) values. ``limit`` is unused: every rank costs the same SVD.
    """
    matrix = kernel.reshape(-1, kernel.shape[-1]).astype(np.float64)
    if covariance is not None:
        matrix = whitening_factor(covariance) @ matrix
    energy = np.square(np.linalg.svd(matrix, compute_uv=False))
    tail = np.append(np.cumsum(energy[::-1])[::-1], 0.0)  # tail[j] = sum_{i >= j} s_i^2
    total = max(tail[0], 1e-300)
    full = max_rank(kernel.shape)
    ranks = [rank_for_ratio(config.rank_ratio, full) for config in ladder]
    return [Estimate(rank * sum(matrix.shape), float(np.sqrt(tail[rank] / total)))
            for rank in ranks]


def alds_target(config, kept_fraction):
    """ALDS's ``target`` (fraction of kernel values removed) for a kept fraction."""
    return dataclasses.replace(config, target=min(max(1.0 - kept_fraction, 1e-6), 1 - 1e-6))


def fit_layer_config(kernel, config):
    """Truncated SVD of each channel chunk as a ``LowRankLayerConfig`` says."""
    return factor_kernel(kernel, config.rank, config.groups, config.scheme)


def allocate_alds(kernels, config):
    """ALDS (or ALDS+) allocation: {layer name: ``LowRankLayerConfig``}."""
    allocation = alds_allocation(
        kernels, config.target, plus=config.alds_plus, n_seeds=config.n_seeds,
        n_iter=config.n_iter, norm=config.norm, random_state=config.seed,
    )
    return {
        name: LowRankLayerConfig(layer.rank, layer.groups, layer.scheme)
        for name, layer in allocation.layers.items()
    }


def build_low_rank_layer(layer, factors, config):
    """``LowRankDense``/``LowRankConv`` from ``LowRankFactors``."""
    bias = layer.get_weights()[1] if layer.use_bias else None
    options = dict(bias=bias, **common_options(layer))
    if isinstance(layer, keras.layers.Conv2D):
        return LowRankConv.from_factors(factors.encoder, factors.decoder, factors.groups,
                                        factors.scheme, **conv_options(layer), **options)
    return LowRankDense.from_factors(factors.encoder, factors.decoder, factors.groups,
                                     **options)


SVD = register_method(Method(
    name="svd",
    description="truncated SVD, the same fraction of the rank in every layer",
    config_class=SVDConfig,
    fit=fit_svd,
    build=build_low_rank_layer,
    presets={"small": dict(rank_ratio=0.1), "large": dict(rank_ratio=0.3)},
    paper=ALDS_PAPER,
    calibrated=True,
    size_knob=svd_sizes,
    size_estimates=svd_estimates,
))

ALDS = register_method(Method(
    name="alds",
    description="SVD of channel chunks, ranks and chunks allocated by ALDS for a global target",
    config_class=ALDSConfig,
    fit=fit_layer_config,
    build=build_low_rank_layer,
    allocate=allocate_alds,
    presets={"small": dict(target=0.9), "large": dict(target=0.6)},
    paper=ALDS_PAPER,
    size_target=alds_target,
))
