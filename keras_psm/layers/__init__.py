"""Keras layers that replace Dense/Conv2D with structured factorizations."""

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
    "CompressedLayer",
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
