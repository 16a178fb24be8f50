"""``keras.ops`` names for tf_keras, which has none: thin TensorFlow versions.

Each function has the name, the signature and the semantics of its
``keras.ops`` namesake, so that :mod:`keras_psm.ops` gives layers one
vocabulary on Keras 3 and on tf_keras. Only the subset keras_psm uses is here.
"""

import tensorflow as tf


def abs(x):  # noqa: A001 (keras.ops.abs's name)
    return tf.abs(x)


def arange(start, stop=None, step=1, dtype=None):
    if stop is None:
        start, stop = 0, start
    return tf.range(start, stop, step, dtype=dtype or "int32")


def argmin(x, axis=None, keepdims=False):
    if axis is None:
        x, axis = tf.reshape(x, [-1]), 0
    result = tf.argmin(x, axis=axis, output_type=tf.int32)
    return tf.expand_dims(result, axis) if keepdims else result


def cast(x, dtype):
    return tf.cast(x, dtype)


def concatenate(xs, axis=0):
    return tf.concat(xs, axis=axis)


def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
    channels_first = data_format == "channels_first"
    return tf.nn.convolution(inputs, kernel, strides=strides, padding=padding.upper(),
                             dilations=dilation_rate, data_format="NCHW" if channels_first
                             else "NHWC")


def convert_to_numpy(x):
    return tf.convert_to_tensor(x).numpy()


def convert_to_tensor(x, dtype=None, sparse=None):
    return tf.convert_to_tensor(x, dtype=dtype)


def einsum(subscripts, *operands, **kwargs):
    return tf.einsum(subscripts, *operands)


def exp(x):
    return tf.exp(x)


def expand_dims(x, axis):
    return tf.expand_dims(x, axis)


def log(x):
    return tf.math.log(x)


def log_softmax(x, axis=-1):
    return tf.nn.log_softmax(x, axis=axis)


def matmul(x1, x2):
    return tf.matmul(x1, x2)


def maximum(x1, x2):
    return tf.maximum(x1, x2)


def mean(x, axis=None, keepdims=False):
    return tf.reduce_mean(x, axis=axis, keepdims=keepdims)


def ones(shape, dtype=None):
    return tf.ones(shape, dtype=dtype or "float32")


def pad(x, pad_width, mode="constant", constant_values=None):
    return tf.pad(x, pad_width, mode=mode.upper(), constant_values=constant_values or 0)


def reshape(x, newshape):
    return tf.reshape(x, newshape)


def scatter(indices, values, shape):
    return tf.scatter_nd(indices, values, shape)


def segment_sum(data, segment_ids, num_segments=None, sorted=False):  # noqa: A002
    if num_segments is None:
        num_segments = tf.reduce_max(segment_ids) + 1
    return tf.math.unsorted_segment_sum(data, segment_ids, num_segments)


def shape(x):
    dynamic = tf.shape(x)
    return tuple(dim if dim is not None else dynamic[i] for i, dim in enumerate(x.shape))


def softmax(x, axis=-1):
    return tf.nn.softmax(x, axis=axis)


def split(x, indices_or_sections, axis=0):
    if isinstance(indices_or_sections, int):
        return tf.split(x, indices_or_sections, axis=axis)
    bounds = [0, *indices_or_sections, x.shape[axis]]
    return tf.split(x, [end - start for start, end in zip(bounds, bounds[1:])], axis=axis)


def sqrt(x):
    return tf.sqrt(x)


def square(x):
    return tf.square(x)


def squeeze(x, axis=None):
    return tf.squeeze(x, axis)


def stack(x, axis=0):
    return tf.stack(x, axis=axis)


def stop_gradient(variable):
    return tf.stop_gradient(variable)


def sum(x, axis=None, keepdims=False):  # noqa: A001 (keras.ops.sum's name)
    return tf.reduce_sum(x, axis=axis, keepdims=keepdims)


def switch(index, branches, *operands):
    return tf.switch_case(index, [lambda branch=branch: branch(*operands)
                                  for branch in branches])


def take(x, indices, axis=None):
    if axis is None:
        x, axis = tf.reshape(x, [-1]), 0
    return tf.gather(x, indices, axis=axis)


def transpose(x, axes=None):
    return tf.transpose(x, perm=axes)


__all__ = [
    "abs",
    "arange",
    "argmin",
    "cast",
    "concatenate",
    "conv",
    "convert_to_numpy",
    "convert_to_tensor",
    "einsum",
    "exp",
    "expand_dims",
    "log",
    "log_softmax",
    "matmul",
    "maximum",
    "mean",
    "ones",
    "pad",
    "reshape",
    "scatter",
    "segment_sum",
    "shape",
    "softmax",
    "split",
    "sqrt",
    "square",
    "squeeze",
    "stack",
    "stop_gradient",
    "sum",
    "switch",
    "take",
    "transpose",
]
