"""Compression methods, each registered under its name.

Importing this package registers every method family below.
"""

from keras_psm.methods.registry import (
    LAYER_KINDS,
    Method,
    available_methods,
    get_method,
    register_method,
)
from keras_psm.methods import psm  # noqa: F401  (registers "psm")
from keras_psm.methods.psm import PSMConfig

__all__ = [
    "LAYER_KINDS",
    "Method",
    "PSMConfig",
    "available_methods",
    "get_method",
    "register_method",
]
