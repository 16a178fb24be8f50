"""The tensor operations keras_psm's layers, losses and callbacks are written in.

On Keras 3 this module is ``keras.ops`` (TensorFlow, JAX and PyTorch backends
alike). tf_keras has no ``keras.ops``; there the same names, with the same
signatures and semantics, come from :mod:`keras_psm.tf_ops`, a thin
TensorFlow implementation of the subset keras_psm uses.

    from keras_psm import ops
    y = ops.matmul(x, ops.reshape(w, (n_in, n_out)))
"""

from keras_psm.backend import LEGACY_KERAS

if LEGACY_KERAS:
    from keras_psm.tf_ops import *  # noqa: F401,F403
else:
    from keras.ops import *  # noqa: F401,F403
