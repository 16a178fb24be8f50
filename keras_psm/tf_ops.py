"""``keras.ops`` names for tf_keras, which has none: thin TensorFlow versions.

Each function has the name, the signature and the semantics of its
``keras.ops`` namesake, so that :mod:`keras_psm.ops` gives layers one
vocabulary on Keras 3 and on tf_keras. Only the subset keras_psm uses is here.
"""

import tensorflow as tf


def cast(x, dtype):
    return tf.cast(x, dtype)


def convert_to_tensor(x, dtype=None, sparse=None):
    return tf.convert_to_tensor(x, dtype=dtype)


def convert_to_numpy(x):
    return tf.convert_to_tensor(x).numpy()


def log(x):
    return tf.math.log(x)


def matmul(x1, x2):
    return tf.matmul(x1, x2)


def mean(x, axis=None, keepdims=False):
    return tf.reduce_mean(x, axis=axis, keepdims=keepdims)


def reshape(x, newshape):
    return tf.reshape(x, newshape)


def shape(x):
    dynamic = tf.shape(x)
    return tuple(dim if dim is not None else dynamic[i] for i, dim in enumerate(x.shape))


def sum(x, axis=None, keepdims=False):  # noqa: A001 (keras.ops.sum's name)
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def softmax(x, axis=-1):
    return tf.nn.softmax(x, axis=axis)


def log_softmax(x, axis=-1):
    return tf.nn.log_softmax(x, axis=axis)


def transpose(x, axes=None):
    return tf.transpose(x, perm=axes)


__all__ = [
    "cast", "convert_to_numpy", "convert_to_tensor", "log", "log_softmax", "matmul", "mean",
    "reshape", "shape", "softmax", "sum", "transpose",
]


def exp(x):
    return tf.exp(x)


def maximum(x1, x2):
    return tf.maximum(x1, x2)


def stop_gradient(variable):
    return tf.stop_gradient(variable)


__all__ += ["exp", "maximum", "stop_gradient"]
