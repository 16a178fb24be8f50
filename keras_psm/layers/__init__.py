"""Keras layers that replace Dense/Conv2D with structured factorizations, and
the wrappers that put them in place of EinsumDense, Conv1D, SeparableConv1D/2D
and MultiHeadAttention's projections."""

from keras_psm.layers.adapters import (
    CompressedConv1D,
    CompressedEinsumDense,
    CompressedSeparableConv,
)
from keras_psm.layers.attention import CompressedMultiHeadAttention
from keras_psm.layers.base import CompressedLayer
from keras_psm.layers.kronecker import KroneckerDense
from keras_psm.layers.lowrank import LowRankConv, LowRankDense
from keras_psm.layers.pattern_selection import (
    KroneckerPatternDense,
    PenaltySchedule,
    keep_selected_patterns,
    select_pattern,
)
from keras_psm.layers.sparse_factor import SparseFactorConv2D, SparseFactorDense
from keras_psm.layers.tensor import TTConv2D, TTDense, TuckerConv

__all__ = [
    "CompressedConv1D",
    "CompressedEinsumDense",
    "CompressedLayer",
    "CompressedMultiHeadAttention",
    "CompressedSeparableConv",
    "KroneckerDense",
    "KroneckerPatternDense",
    "LowRankConv",
    "LowRankDense",
    "PenaltySchedule",
    "SparseFactorConv2D",
    "SparseFactorDense",
    "TTConv2D",
    "TTDense",
    "TuckerConv",
    "keep_selected_patterns",
    "select_pattern",
]
