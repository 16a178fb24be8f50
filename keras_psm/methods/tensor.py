"""``method="tucker-svd"`` and ``method="tt"``: the PSM paper's low-rank baselines.

PSM paper, section 3.1:

- Tucker-SVD: Conv2D layers by a Tucker-2 decomposition whose ranks are
  found by VBMF (Kim et al., 2016), Dense layers by a truncated SVD keeping a
  fraction of the singular values (the paper keeps 10% and 20%).
- TT: Dense and Conv2D layers as tensor-train matrices with M = 4 cores and
  maximum TT rank R (the paper uses R = 6, 10, 14). Sizes are factored by
  ``dimension_factors`` (zero-padded when they do not factor evenly).
"""

import dataclasses
from typing import Optional

import numpy as np

from keras_psm.backend import keras
from keras_psm.budget import knob_grid
from keras_psm.factorize.lowrank import factor_kernel, rank_for_ratio
from keras_psm.factorize.tensor import (
    Tucker2,
    dimension_factors,
    tt_matrix,
    tucker2,
    vbmf_tucker_ranks,
)
from keras_psm.layers.base import common_options, conv_options
from keras_psm.layers.tensor import TTConv2D, TTDense, TuckerConv
from keras_psm.methods.lowrank import build_low_rank_layer
from keras_psm.methods.psm import PSM_PAPER
from keras_psm.methods.registry import Method, register_method
from keras_psm.validation import check_float, check_int


@dataclasses.dataclass(frozen=True)
class TuckerSVDConfig:
    """Options of ``method="tucker-svd"``.

    Attributes:
        dense_rank_ratio: fraction of a Dense kernel's singular values kept,
            in (0, 1] (rank ceil(ratio * min(in, out))).
        conv_rank_ratio: ``None`` (the paper) to take the Tucker ranks from
            VBMF of the channel unfoldings; or a fraction in (0, 1] of the input
            and output channels kept (r1 = ceil(ratio cin), r2 = ceil(ratio cout)).
        n_iter_max, tol: HOOI iterations of tensorly's ``partial_tucker``.
    """

    dense_rank_ratio: float = 0.1
    conv_rank_ratio: Optional[float] = None
    n_iter_max: int = 100
    tol: float = 1e-4

    def __post_init__(self):
        where = type(self).__name__
        check_float(self.dense_rank_ratio, "dense_rank_ratio", minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, where=where)
        check_float(self.conv_rank_ratio, "conv_rank_ratio", minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, where=where, allow_none=True)
        check_int(self.n_iter_max, "n_iter_max", minimum=1, where=where)
        check_float(self.tol, "tol", minimum=0.0, where=where)


def fit_tucker_svd(kernel, config):
    """Tucker-2 (Conv2D kernel) or truncated SVD (Dense kernel)."""
    if kernel.ndim == 2:
        return factor_kernel(kernel, rank_for_ratio(config.dense_rank_ratio, min(kernel.shape)))
    if config.conv_rank_ratio is None:
        ranks = vbmf_tucker_ranks(kernel)
    else:
        ranks = tuple(rank_for_ratio(config.conv_rank_ratio, n) for n in kernel.shape[2:])
    return tucker2(kernel, ranks, n_iter_max=config.n_iter_max, tol=config.tol)


def build_tucker_svd_layer(layer, fitted, config):
    """``TuckerConv`` from a ``Tucker2``, ``LowRankDense`` from ``LowRankFactors``."""
    if isinstance(fitted, Tucker2):
        bias = layer.get_weights()[1] if layer.use_bias else None
        return TuckerConv.from_factors(*fitted, bias=bias, **conv_options(layer),
                                       **common_options(layer))
    return build_low_rank_layer(layer, fitted, config)


@dataclasses.dataclass(frozen=True)
class TTConfig:
    """Options of ``method="tt"``.

    Attributes:
        n_cores: M, cores per layer (the paper: 4). A Conv2D uses one core for
            its kh x kw window and M - 1 for its channels.
        max_rank: R, the largest TT rank (the paper: 6, 10, 14).
    """

    n_cores: int = 4
    max_rank: int = 6

    def __post_init__(self):
        where = type(self).__name__
        check_int(self.n_cores, "n_cores", minimum=2, where=where)
        check_int(self.max_rank, "max_rank", minimum=1, where=where)


def _zero_padded(array, shape):
    padded = np.zeros(shape)
    padded[tuple(slice(0, n) for n in array.shape)] = array
    return padded


def fit_tt(kernel, config):
    """TT-matrix cores of the (zero-padded) kernel matrix.

    Dense (in, out): modes ``dimension_factors`` of in and out, M each.
    Conv2D: rows (kh kw, c_1..c_{M-1}), columns (1, f_1..f_{M-1}), the channels
    padded to prod c_k and the filters to prod f_k.
    """
    n_cores = config.n_cores
    if kernel.ndim == 2:
        rows, cols = (dimension_factors(n, n_cores) for n in kernel.shape)
        matrix = _zero_padded(kernel, (int(np.prod(rows)), int(np.prod(cols))))
        return tt_matrix(matrix, rows, cols, config.max_rank)
    kh, kw, cin, cout = kernel.shape
    channels, filters = (dimension_factors(n, n_cores - 1) for n in (cin, cout))
    padded = _zero_padded(kernel.reshape(kh * kw, cin, cout),
                          (kh * kw, int(np.prod(channels)), int(np.prod(filters))))
    return tt_matrix(padded.reshape(-1, padded.shape[-1]), (kh * kw,) + channels,
                     (1,) + filters, config.max_rank)


def build_tt_layer(layer, cores, config):
    """``TTDense``/``TTConv2D`` from fitted cores."""
    bias = layer.get_weights()[1] if layer.use_bias else None
    options = dict(bias=bias, **common_options(layer))
    if isinstance(layer, keras.layers.Conv2D):
        return TTConv2D.from_cores(cores, layer.filters, layer.kernel_size,
                                   **conv_options(layer), **options)
    return TTDense.from_cores(cores, layer.units, **options)


def tucker_svd_sizes(kernel_shape, config):
    """``target_ratio`` ladder: one rank ratio (Dense and Conv2D alike) per ``knob_grid`` step,
    just under rank / min(in, out) so that a Dense layer's rank is exact."""
    full = min(kernel_shape[-2:])
    return [[dataclasses.replace(config, dense_rank_ratio=(rank - 0.5) / full,
                                 conv_rank_ratio=(rank - 0.5) / full)
             for rank in knob_grid(full)]]


def tt_sizes(kernel_shape, config):
    """``target_ratio`` ladder: maximum TT ranks on ``knob_grid`` up to the smaller matrix side."""
    rows = int(np.prod(kernel_shape[:-1]))
    return [[dataclasses.replace(config, max_rank=rank)
             for rank in knob_grid(min(rows, kernel_shape[-1]))]]


TUCKER_SVD = register_method(Method(
    name="tucker-svd",
    description="Tucker-2 of Conv2D kernels (VBMF ranks), truncated SVD of Dense kernels",
    config_class=TuckerSVDConfig,
    fit=fit_tucker_svd,
    build=build_tucker_svd_layer,
    presets={"small": dict(dense_rank_ratio=0.1), "large": dict(dense_rank_ratio=0.2)},
    paper=PSM_PAPER,
    size_knob=tucker_svd_sizes,
))

TT = register_method(Method(
    name="tt",
    description="tensor-train matrices with M cores and maximum rank R",
    config_class=TTConfig,
    fit=fit_tt,
    build=build_tt_layer,
    presets={"small": dict(max_rank=6), "large": dict(max_rank=14)},
    paper=PSM_PAPER,
    size_knob=tt_sizes,
))
