"""``psm-reinit``, ``psm-random`` and ``butterfly``: sparse factors whose
supports or weights do not both come from palm4MSA.

PSM paper, section 3.2 and Table 1 (supplement A.7), to test how much of
PSM's accuracy comes from palm4MSA's supports and weights:

- ``psm-reinit``: palm4MSA's supports, weights re-initialised with the sparse
  He (first factor) / Xavier (other factors) initializers of supplement A.3.
- ``psm-random``: supports of a projected centred Gaussian (``splincol``,
  at least K nonzeros per row and column) and fresh sparse He / Xavier weights.

Both take the options of ``method="psm"`` (``PSMConfig``); ``seed`` seeds the
random draws (layers of the same shape get the same random supports). The
layers keep their trained bias.

The butterfly seed's fixed supports:

- ``butterfly``: the supports of the log2(N) radix-2 butterfly factors, or
  of ``n_factors`` products of consecutive ones (``factorize.butterfly``),
  fitted on those supports by the hierarchical algorithm of Le, Zheng,
  Riccietti & Gribonval (2022), which recovers butterfly matrices (e.g.
  Hadamard) exactly. A kernel (in, out) is padded to N x N, N the next power
  of two of max(in, out).
"""

import dataclasses
from typing import Optional

import numpy as np

from keras_psm.factorize.butterfly import butterfly_factorize, butterfly_size
from keras_psm.factorize.palm4msa import Factorization, factor_shapes
from keras_psm.initializers import random_supports, sparse_factor_init
from keras_psm.methods.psm import (
    PSM_PAPER,
    PSM_PRESETS,
    PSMConfig,
    build_sparse_factor_layer,
    fit_psm,
    kernel_matrix,
    psm_sizes,
)
from keras_psm.methods.registry import Method, register_method
from keras_psm.validation import check_int

BUTTERFLY_PAPER = "Pruning Methods with Sparse Factorizations of Neural Networks"


def fit_psm_reinit(kernel, config, covariance=None):
    """palm4MSA's supports (fitted to ``covariance`` if given), fresh sparse He / Xavier weights."""
    supports = fit_psm(kernel, config, covariance).supports
    weights = sparse_factor_init(supports, np.random.default_rng(config.seed))
    return factorization_from(kernel_matrix(kernel), weights, supports)


def fit_psm_random(kernel, config):
    """Random ``splincol`` supports of a centred Gaussian, fresh sparse He / Xavier weights."""
    matrix = kernel_matrix(kernel)
    rng = np.random.default_rng(config.seed)
    shapes = factor_shapes(matrix.shape, config.n_factors, config.rank)
    supports = random_supports(shapes, config.sparsity, rng)
    return factorization_from(matrix, sparse_factor_init(supports, rng), supports)


@dataclasses.dataclass(frozen=True)
class ButterflyConfig:
    """Options of ``method="butterfly"``.

    Attributes:
        n_factors: Q, number of factors; None for log2(N), the radix-2
            butterfly (two nonzeros per row and column of each factor). A
            smaller Q merges consecutive factors (2^g nonzeros per row and
            column for a group of g). N is the next power of two of
            max(in, out) of the kernel matrix.
    """

    n_factors: Optional[int] = None

    def __post_init__(self):
        check_int(self.n_factors, "n_factors", minimum=1, where=type(self).__name__,
                  allow_none=True)


def fit_butterfly(kernel, config):
    """Hierarchical butterfly fit (Le et al. 2022) of the (padded) kernel matrix.

    Returns a ``Factorization`` whose factors are float64
    ``scipy.sparse.csr_array``s storing exactly their supports (boolean
    ``csr_array``s): no ``N x N`` dense array is formed.
    """
    matrix = kernel_matrix(kernel)
    size = butterfly_size(matrix.shape)
    levels = size.bit_length() - 1
    if config.n_factors is not None and config.n_factors > levels:
        raise ValueError(
            f"ButterflyConfig: `n_factors` must be <= log2({size}) = {levels} for a kernel "
            f"matrix of shape {matrix.shape}, got {config.n_factors}."
        )
    return butterfly_factorize(matrix, config.n_factors)


def factorization_from(matrix, factors, supports):
    """A ``Factorization`` whose single error is that of ``factors`` against ``matrix``."""
    product = factors[0]
    for factor in factors[1:]:
        product = product @ factor
    norm = np.linalg.norm(matrix)
    error = np.linalg.norm(matrix - product) / norm if norm > 0 else 0.0
    return Factorization(factors=list(factors), supports=list(supports), errors=np.array([error]))


PSM_REINIT = register_method(Method(
    name="psm-reinit",
    description="palm4MSA supports, weights re-initialised (sparse He / Xavier)",
    config_class=PSMConfig,
    fit=fit_psm_reinit,
    build=build_sparse_factor_layer,
    presets=PSM_PRESETS,
    paper=PSM_PAPER,
    calibrated=True,
    size_knob=psm_sizes,
))

PSM_RANDOM = register_method(Method(
    name="psm-random",
    description="random splincol supports and sparse He / Xavier weights",
    config_class=PSMConfig,
    fit=fit_psm_random,
    build=build_sparse_factor_layer,
    presets=PSM_PRESETS,
    paper=PSM_PAPER,
    size_knob=psm_sizes,
))

BUTTERFLY = register_method(Method(
    name="butterfly",
    description="butterfly supports (padded to a power of two), hierarchical fit (Le et al. 2022)",
    config_class=ButterflyConfig,
    fit=fit_butterfly,
    build=build_sparse_factor_layer,
    presets={"small": dict(n_factors=None), "large": dict(n_factors=2)},
    paper=BUTTERFLY_PAPER,
))
