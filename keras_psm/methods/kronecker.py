"""``method="kpd"``: each Dense kernel as a block-wise sparse sum of Kronecker products.

Block-wise sparsity paper, eqs. 2-3: the trained kernel (in, out) is
approximated by ``sum_i A_i (x) B_i`` (nearest Kronecker product sum, by a
truncated SVD of its Van Loan-Pitsianis rearrangement), and the layer becomes
a ``KroneckerDense`` with S at ones, or at a block mask that drops the blocks
of smallest norm for a target block sparsity. Fine-tuning with ``l1 > 0``
then drives more blocks to zero (eq. 4). Conv2D layers are left alone.
"""

import dataclasses
from typing import Optional, Tuple

import numpy as np

from keras_psm.budget import knob_grid
from keras_psm.factorize.kronecker import (
    block_mask,
    fewest_params_block_shape,
    kronecker_rank_bound,
    nearest_kronecker_sum,
    pad_to_blocks,
    padded_shape,
)
from keras_psm.layers.base import common_options, normalize_tuple
from keras_psm.layers.kronecker import KroneckerDense
from keras_psm.methods.registry import Method, register_method
from keras_psm.validation import check_bool, check_float, check_int

KPD_PAPER = "An Efficient Training Algorithm for Models with Block-wise Sparsity"


@dataclasses.dataclass(frozen=True)
class KPDConfig:
    """Options of ``method="kpd"``.

    Attributes:
        block_shape: (b_in, b_out), the block of the (in, out) kernel; ``None``
            picks, per layer, the block with the fewest training parameters
            (the paper's eq. 5, at this rank) among those that tile the kernel.
        rank: r, Kronecker terms per layer (the paper uses 2 to 5). Capped per
            layer at min(g_in g_out, b_in b_out), where the fit is exact.
        block_sparsity: fraction of blocks set to zero at the start (those of
            smallest norm); 0 keeps S at ones.
        l1: strength of the l1 penalty on S during fine-tuning (eq. 4).
        pad: pad kernels whose sizes ``block_shape`` does not divide with zero
            rows/columns; with False such a layer raises ValueError.
    """

    block_shape: Optional[Tuple[int, int]] = None
    rank: int = 2
    block_sparsity: float = 0.0
    l1: float = 0.0
    pad: bool = True

    def __post_init__(self):
        where = type(self).__name__
        if self.block_shape is not None:
            object.__setattr__(self, "block_shape",
                               normalize_tuple(self.block_shape, "block_shape", where))
        check_int(self.rank, "rank", minimum=1, where=where)
        check_float(self.block_sparsity, "block_sparsity", minimum=0.0, maximum=1.0,
                    where=where)
        if self.block_sparsity >= 1.0:
            raise ValueError(f"{where}: `block_sparsity` must be < 1 (1 zeroes every block), "
                             f"got {self.block_sparsity}.")
        check_float(self.l1, "l1", minimum=0.0, where=where)
        check_bool(self.pad, "pad", where=where)


@dataclasses.dataclass
class KPDFit:
    """What ``fit_kpd`` hands to ``build``: the factors on the (padded) grid and S."""

    grid_factors: np.ndarray
    blocks: np.ndarray
    s: np.ndarray


def fit_kpd(kernel, config):
    """Nearest sum of Kronecker products of the Dense kernel, with its block mask."""
    block_shape = config.block_shape or fewest_params_block_shape(kernel.shape, config.rank)
    if padded_shape(kernel.shape, block_shape) != kernel.shape and not config.pad:
        raise ValueError(
            f"KPDConfig: block_shape {block_shape} does not divide the kernel shape "
            f"{kernel.shape}; choose a block whose sizes divide (in, out), or pad=True."
        )
    padded = pad_to_blocks(kernel, block_shape)
    mask = block_mask(padded, block_shape, config.block_sparsity)
    rank = min(config.rank, kronecker_rank_bound(padded.shape, block_shape))
    fit = nearest_kronecker_sum(padded, block_shape, rank, mask=mask)
    return KPDFit(grid_factors=fit.grid_factors, blocks=fit.blocks, s=mask)


def kpd_sizes(kernel_shape, config):
    """``target_ratio`` ladder: Kronecker ranks r on ``knob_grid`` up to the smaller kernel side."""
    return [[dataclasses.replace(config, rank=rank) for rank in knob_grid(min(kernel_shape))]]


def build_kronecker_layer(layer, fitted, config):
    """``KroneckerDense`` from a ``KPDFit``, with the Dense layer's name, activation and bias."""
    bias = layer.get_weights()[1] if layer.use_bias else None
    return KroneckerDense.from_factors(
        layer.units, fitted.grid_factors, fitted.blocks, s=fitted.s, s_mask=fitted.s,
        bias=bias, l1=config.l1, **common_options(layer),
    )


KPD = register_method(Method(
    name="kpd",
    description="block-wise sparse sum of Kronecker products (S * A_i) (x) B_i per Dense layer",
    config_class=KPDConfig,
    fit=fit_kpd,
    build=build_kronecker_layer,
    layer_kinds=("dense",),
    presets={"small": dict(rank=1), "large": dict(block_shape=(4, 4), rank=4)},
    paper=KPD_PAPER,
    size_knob=kpd_sizes,
))
