"""Compression methods, each registered under its name.

Importing this package registers every method family below, in the order
``available_methods()`` lists them.
"""

from keras_psm.methods.registry import (
    LAYER_KINDS,
    Method,
    available_methods,
    get_method,
    register_method,
)
from keras_psm.methods.psm import PSMConfig  # "psm"
# "psm-reinit", "psm-random", "butterfly"
from keras_psm.methods.psm_variants import ButterflyConfig
# "hard-pruning", "iterative-pruning"
from keras_psm.methods.pruning import HardPruningConfig, IterativePruningConfig
from keras_psm.methods.lowrank import ALDSConfig, LowRankLayerConfig, SVDConfig  # "svd", "alds"
from keras_psm.methods.tensor import TTConfig, TuckerSVDConfig  # "tucker-svd", "tt"
from keras_psm.methods.kronecker import KPDConfig  # "kpd"

__all__ = [
    "LAYER_KINDS",
    "ALDSConfig",
    "ButterflyConfig",
    "HardPruningConfig",
    "IterativePruningConfig",
    "KPDConfig",
    "LowRankLayerConfig",
    "Method",
    "PSMConfig",
    "SVDConfig",
    "TTConfig",
    "TuckerSVDConfig",
    "available_methods",
    "get_method",
    "register_method",
]
