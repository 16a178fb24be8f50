"""Input covariances ``X_l^T X_l`` of selected layers, from calibration data.

``compress(..., calibration_data=X)`` fits each selected layer to minimize
``||X_l (W - W_hat)||_F`` (``keras_psm.factorize.calibrated``), with ``X_l``
the inputs the layer sees in the original model. One pass over the data
runs a model whose outputs are those inputs and keeps, per layer, only the
``d_in x d_in`` matrix ``X_l^T X_l / n`` (``n`` rows) and the mean input
``mu_l``, never the activations.

A layer with a bias absorbs the mean of its output error: with the bias
``b + mu^T (W - W_hat)`` the error is ``||(X - 1 mu^T) (W - W_hat)||_F``, so
its fit uses the centred covariance ``X^T X / n - mu mu^T`` and its bias is
corrected afterwards (``correct_biases``; the bias correction of Nagel et al.,
"Data-Free Quantization", 2019, section 4.2, with the calibration mean). The
uncentred covariance is dominated by the mean input of a ReLU network, and
a fit to it spends the budget on the mean output, which the bias carries
anyway. A Dense layer's rows are its input vectors (every leading axis
flattened); a Conv2D's rows are its im2col patches (``patches``: the layer's
window, strides, dilation and padding, in NumPy), ordered ``(kh, kw, cin)``
like the rows of its kernel matrix. The matrices are
damped as GPTQ does (``damped_covariance``) so that they are invertible.
"""

import sys

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from keras_psm import ops
from keras_psm.backend import LEGACY_KERAS, keras
from keras_psm.factorize.calibrated import DAMPING, damped_covariance
from keras_psm.model_layers import is_graph_model, leaf_layers

#: Samples per forward pass when the data are arrays.
BATCH_SIZE = 64


def calibration_batches(model, data, batch_size=BATCH_SIZE):
    """Checked ``data`` as a list of batches, each a list of one array per model input.

    ``data`` is an array (one-input model), a list/tuple of arrays or a dict
    keyed by input name (one per model input), or a ``tf.data.Dataset``
    yielding such inputs, batched or not. Raises ValueError naming the
    input whose samples do not match its shape, TypeError for other types.
    """
    names = input_names(model)
    shapes = [tuple(tensor.shape)[1:] for tensor in model.inputs]
    if _is_tf_dataset(data):
        batches = [_as_inputs(element, names) for element in data]
        if batches and all(
            len(array.shape) == len(shape) for array, shape in zip(batches[0], shapes)
        ):
            batches = [[array[None] for array in batch] for batch in batches]
            batches = [[np.concatenate(column) for column in zip(*batches)]]
    else:
        batches = [_as_inputs(data, names)]
    if not batches:
        raise ValueError("`calibration_data` is an empty dataset.")
    for batch in batches:
        for array, name, shape in zip(batch, names, shapes):
            _check_shape(array, name, shape, model.name)
    split = []
    for batch in batches:
        count = len(batch[0])
        if any(len(array) != count for array in batch):
            raise ValueError(
                f"`calibration_data`: the inputs {names} have different numbers of samples "
                f"({[len(array) for array in batch]})."
            )
        split.extend([array[start:start + batch_size] for array in batch]
                     for start in range(0, count, batch_size))
    return split


def layer_covariances(model, layers, data, damping=DAMPING, batch_size=BATCH_SIZE):
    """``(covariances, means)`` for the Dense/Conv2D ``layers`` (a dict name -> layer) of ``model``.

    ``covariances[name]`` is the damped ``X^T X / n``, centred for a layer with
    a bias; ``means[name]`` the mean input ``mu`` of each layer with a bias.
    One pass over ``data`` (see ``calibration_batches``); layers inside
    nested functional/Sequential models are reached through those models'
    inputs. Raises ValueError for a layer called more than once (its inputs
    are ambiguous).
    """
    batches = calibration_batches(model, data, batch_size)
    plan = _Plan(model, set(layers))
    sums, totals, counts = {}, {}, {}
    for batch in batches:
        plan.accumulate(batch, sums, totals, counts)
    covariances, means = {}, {}
    for name, layer in layers.items():
        second, mean = sums[name] / counts[name], totals[name] / counts[name]
        if getattr(layer, "use_bias", False):
            second = second - np.outer(mean, mean)
            means[name] = mean
        covariances[name] = damped_covariance(second, damping)
    return covariances, means


def correct_biases(replaced, kernels, means):
    """Add ``mu^T (W - W_hat)`` to the bias of each replaced layer named in ``means``.

    ``replaced``: name -> the built compressed layer (``kernel`` its ``W_hat``);
    ``kernels``: name -> the original kernel ``W``.
    """
    for name, mean in means.items():
        layer = replaced[name]
        kernel = kernels[name].reshape(-1, kernels[name].shape[-1])
        approximation = np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float64)
        approximation = approximation.reshape(kernel.shape)
        bias = np.asarray(layer.bias)
        layer.bias.assign((bias + mean @ (kernel - approximation)).astype(bias.dtype))


class _Plan:
    """A model from a graph model's inputs to its selected layers' inputs and to
    the inputs of its nested models that hold selected layers."""

    def __init__(self, model, names):
        self.layers = [layer for layer in model.layers
                       if not is_graph_model(layer) and layer.name in names]
        self.nested = [_Plan(layer, names) for layer in model.layers
                       if is_graph_model(layer)
                       and any(leaf.name in names for leaf in leaf_layers(layer))]
        outputs = [_layer_input(layer) for layer in self.layers]
        outputs += [_call_inputs(plan.model) for plan in self.nested]
        self.model = model
        self.features = keras.Model(model.inputs, [tensor for group in outputs for tensor in
                                                   (group if isinstance(group, list) else [group])])

    def accumulate(self, inputs, sums, totals, counts):
        values = self.features(list(inputs), training=False)
        values = [ops.convert_to_numpy(value) for value in
                  (values if isinstance(values, (list, tuple)) else [values])]
        for layer, value in zip(self.layers, values):
            rows = _rows(layer, value)
            sums[layer.name] = sums.get(layer.name, 0.0) + rows.T @ rows
            totals[layer.name] = totals.get(layer.name, 0.0) + rows.sum(axis=0)
            counts[layer.name] = counts.get(layer.name, 0) + len(rows)
        start = len(self.layers)
        for plan in self.nested:
            width = len(plan.model.inputs)
            plan.accumulate(values[start:start + width], sums, totals, counts)
            start += width


def _rows(layer, value):
    """The layer's input as rows ``(n, d_in)`` in float64: patches for a Conv2D."""
    if isinstance(layer, keras.layers.Conv2D):
        if layer.data_format == "channels_first":
            value = np.transpose(value, (0, 2, 3, 1))
        value = patches(np.asarray(value), layer.kernel_size, layer.strides,
                        layer.dilation_rate, layer.padding)
    value = np.asarray(value, dtype=np.float64)
    return value.reshape(-1, value.shape[-1])


def patches(images, kernel_size, strides, dilation_rate, padding):
    """The im2col patches of NHWC ``images`` a Conv2D multiplies by its kernel matrix:
    (n, h_out, w_out, kh * kw * cin), ordered (kh, kw, cin).

    ``"same"`` padding pads as TensorFlow does: the total ``(out - 1) * stride +
    (k - 1) * dilation + 1 - size``, its smaller half before.
    """
    if padding == "same":
        pads = []
        for size, k, stride, dilation in zip(images.shape[1:3], kernel_size, strides,
                                             dilation_rate):
            total = max((-(-size // stride) - 1) * stride + (k - 1) * dilation + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        images = np.pad(images, [(0, 0), *pads, (0, 0)])
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation_rate
    windows = sliding_window_view(images, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    windows = windows[:, ::sh, ::sw, :, ::dh, ::dw]  # (n, h_out, w_out, cin, kh, kw)
    n, h_out, w_out, channels = windows.shape[:4]
    return windows.transpose(0, 1, 2, 4, 5, 3).reshape(n, h_out, w_out, kh * kw * channels)


def _layer_input(layer):
    try:
        return layer.input
    except (AttributeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"calibration_data: layer {layer.name!r} is called more than once or not "
            "connected, so its inputs are ambiguous; leave it out of `layers`."
        ) from error


def _call_inputs(model):
    """The tensors a nested model is called on in the enclosing graph."""
    own = {id(tensor) for tensor in model.inputs}
    calls = [_flatten(node.input_tensors) for node in model._inbound_nodes]
    calls = [call for call in calls if not {id(tensor) for tensor in call} <= own]
    if len(calls) != 1:
        raise ValueError(
            f"calibration_data: nested model {model.name!r} is called {len(calls)} times, "
            "so the inputs of its layers are ambiguous; leave its layers out of `layers`."
        )
    return calls[0]


def _flatten(structure):
    """The tensors of a nested structure, in order (``keras.tree`` has no tf_keras twin)."""
    if LEGACY_KERAS:
        from keras_psm.backend import tf  # tf_keras runs on TensorFlow

        return tf.nest.flatten(structure)
    return keras.tree.flatten(structure)


def _is_tf_dataset(data):
    """Whether ``data`` is a ``tf.data.Dataset`` (only possible once TensorFlow is loaded)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def input_names(model):
    """The names of the model's inputs (their ``InputLayer`` names), in order."""
    return [_input_name(tensor, index) for index, tensor in enumerate(model.inputs)]


def _input_name(tensor, index):
    """The name of the ``InputLayer`` behind a model input tensor."""
    history = getattr(tensor, "_keras_history", None)
    name = getattr(history[0], "name", None) if history else None
    return (name or getattr(tensor, "name", None) or f"input {index}").split(":")[0]


def _as_inputs(data, names):
    """One array per model input from an array, a list/tuple or a dict keyed by input name."""
    if isinstance(data, dict):
        missing = sorted(set(names) - set(data))
        if missing:
            raise ValueError(
                f"`calibration_data` has no array for input(s) {missing}; "
                f"the model's inputs are {names}."
            )
        data = [data[name] for name in names]
    elif isinstance(data, (list, tuple)):
        if len(data) != len(names):
            raise ValueError(
                f"`calibration_data` holds {len(data)} arrays, but the model has "
                f"{len(names)} input(s) {names}: give one array per input."
            )
    elif hasattr(data, "shape") and hasattr(data, "dtype"):  # an array or a tensor
        if len(names) != 1:
            raise ValueError(
                f"`calibration_data` is one array, but the model has {len(names)} inputs "
                f"{names}: give a list of one array per input."
            )
        data = [data]
    else:
        raise TypeError(
            "`calibration_data` must be an array, a list of arrays (one per model input), "
            f"a dict keyed by input name or a tf.data.Dataset, got {type(data).__name__}."
        )
    return [np.asarray(array, dtype=np.float32) for array in data]


def _check_shape(array, name, shape, model_name):
    known = [dim is None or dim == got for dim, got in zip(shape, array.shape[1:])]
    if array.ndim != len(shape) + 1 or not all(known):
        expected = "(n, " + ", ".join("?" if dim is None else str(dim) for dim in shape) + ")"
        raise ValueError(
            f"`calibration_data` for input {name!r} of model {model_name!r} must have "
            f"shape {expected}, got {array.shape}."
        )
    if len(array) == 0:
        raise ValueError(f"`calibration_data` for input {name!r} holds no samples.")
