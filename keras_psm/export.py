"""TFLite export that keeps the compression, checked with LiteRT.

TensorFlow's TFLite converter folds constant sub-expressions: a layer that
multiplies its factors into one kernel before using it reaches the file as
one dense weight. ``to_tflite`` therefore converts an export copy of the
model in which

- pruning wrappers (tfmot's ``PruneLowMagnitude``) are replaced by the layer
  they wrap, with each mask multiplied into its weight;
- every layer with an ``export_form`` attribute (None in training; wrapped
  layers included) gets an ``ExportForm``, which makes its ``call`` apply
  the factors to the input one at a time, so that each factor stays its
  own constant (fully connected ops for a Dense product, a convolution by
  the first factor and fully connected ops for the others in a Conv2D
  product). A layer whose ``call`` already applies its factors in sequence
  needs none. Masks (``weight * mask``) are constant products that the
  converter folds into the weights.

The sequence keeps the file smallest, but it is not always fastest: LiteRT
runs most sparse weights densified (``keras_psm.litert_cost``), so a Conv2D
layer's first factor, reshaped to (kh, kw, cin, r) with r = filters, costs
as much as the whole dense convolution and every further factor adds to
it. A sparse-factor layer (PSM) therefore has these export forms, chosen
by ``factor_form``:

- ``"sequence"`` (the default: the file keeps the compression). A factor
  that the converter would store in 1x4 blocks in more bytes than plainly
  (below about 3% density) becomes a 1x1 convolution, whose weight is
  stored plainly and densified when LiteRT loads the file
  (``ExportForm.apply``): 3 to 4 times fewer bytes for that factor. So does
  a factor whose 1x4 blocks would leave out its last ``in % 4`` inputs
  (``litert_cost.drops_inputs``: TensorFlow 2.21's converter encodes such
  weights wrongly, typically small ones such as a 6 x 6 factor).
- ``"product"``: one op with the product kernel, still sparse-encoded where
  that is smaller: the dense layer's speed and nearly its size.
- ``"auto"``: per layer, whichever LiteRT is predicted to run faster: the
  factors as fully connected ops (1x4-block sparse ones on LiteRT's sparse
  kernel, in the bytes the converter gives them) or the product. In
  practice the product for convolutions, the factors for Dense layers.

A float32 file is converted with and without TFLite's sparse encoding of
constants (``Optimize.EXPERIMENTAL_SPARSITY``). LiteRT 2.3 cannot use that
encoding once quantized (sparse int8 weights fail to prepare in XNNPACK,
float16 weights stored in 1x4 sparse blocks reach the op undecoded and give
NaN), so a quantized ``"sequence"`` file stores the factors of sparse-factor
layers as ``CompactFactors``: quantized nonzero values and their positions,
unpacked by the graph before the ops that use them. That keeps the file
small but not fast: XNNPACK delegates ops with constant weights only, and
LiteRT's builtin kernels run the others several times slower.

Each candidate file is run by the LiteRT interpreter with its default
(XNNPACK) delegate, in a separate process so that a crash cannot take the
caller down, on check samples, and compared with the Keras model; the
smallest one that runs and agrees is written. ``to_tflite`` never writes a
file that does not run or that disagrees with the model. A float32
``"sequence"`` file whose sparse encoding is rejected falls back to the
smaller of the densely encoded sequence and the ``"product"`` form, with a
warning: the file is then never much larger than the uncompressed model's.
"""

import dataclasses
import functools
import os
import subprocess
import sys
import tempfile
import typing
import warnings
from typing import List, Optional

import numpy as np

import tensorflow as tf
from keras_psm.backend import require_tensorflow_backend
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils
from keras_psm.files import write_atomically
from keras_psm.litert_cost import blocks_take_more_bytes, cost_per_row, drops_inputs
from keras_psm.model_layers import check_graph_model, clone_replacing, is_graph_model, leaf_layers
from keras_psm.validation import check_choice, check_float, check_int

#: ``quantization`` options -> default ``tolerance`` of the LiteRT check.
#: The maximum absolute difference from the Keras outputs must stay below
#: ``tolerance * max(1, max |Keras output|)``.
DEFAULT_TOLERANCES = {None: 1e-4, "float16": 1e-2, "dynamic_int8": 5e-2}

SPARSE_CHOICES = ("auto", True, False)
FACTOR_FORMS = ("auto", "sequence", "product")


def _pruning_wrapper_class():
    """tfmot's ``PruneLowMagnitude`` if tfmot is loaded (importing it would set
    ``TF_USE_LEGACY_KERAS`` for the whole process, so it is never imported here)."""
    module = sys.modules.get(
        "tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper")
    return None if module is None else module.PruneLowMagnitude


def strip_for_export(layer):
    """``(layer to copy, its weights)`` with any pruning wrapper removed.

    The wrapped layer's weights come back with each pruning mask multiplied
    in, so a layer that was not trained since it was wrapped is exported
    pruned too.
    """
    wrapper = _pruning_wrapper_class()
    if wrapper is None or not isinstance(layer, wrapper):
        return layer, layer.get_weights()
    masked = {id(weight): (weight * mask).numpy() for weight, mask, _ in layer.pruning_vars}
    inner = layer.layer
    return inner, [masked.get(id(weight), weight.numpy()) for weight in inner.weights]


class _Buffer(typing.NamedTuple):
    """Flat factors laid end to end: their nonzero ``unit``-entry units' positions
    and values (one array per factor) and each factor's number of entries."""

    unit: int
    positions: list
    values: list
    sizes: list

    @property
    def size(self):
        return sum(self.sizes)


class CompactFactors:
    """The sparse factors of an export copy as quantized nonzero values and
    their positions, unpacked by the graph (``quantization`` exports).

    TFLite's sparse encoding fails LiteRT's check once quantized (float16
    weights in 1x4 blocks reach the op undecoded; XNNPACK cannot prepare a
    sparse int8 weight), and the dense encoding stores every zero. Here the
    factors F (m x n) of all layers are laid end to end, each as F^T (the
    layout of a fully connected op's weight, so that ``x @ F`` converts to
    one), in flat buffers of at most 2**24 entries (positions are exact in
    float32). The buffers are cut into units of 1 entry, or of ``BLOCK``
    consecutive entries (1x4 blocks along the input axis) where that stores
    all factors in fewer bytes, and stored as

    - the values of their nonzero units: float32 constants, which the
      converter stores in float16 under ``"float16"``; under
      ``"dynamic_int8"``, int8 ``q = round(v / s)`` with one scale
      ``s = max |v| / 127`` per factor;
    - their unit positions p_0 < p_1 < ... as uint8 steps
      ``d_i = p_i - p_{i-1}`` (``d_0 = p_0``); a step over 255 is cut by zero
      units in between.

    The graph rebuilds a buffer, ``B = scatter(cumsum(d), q)``, and splits it
    into the factors, each reshaped: ``F_i = B_i.reshape(n, m)^T``. Under
    int8 the last factor of each layer carries the product ``s_1 ... s_Q`` of
    its factors' scales (one multiplication a layer). The converter folds a
    constant expression whose result is at most 8 KiB or twice its
    operands; a few large buffers keep the uint8 -> float32 conversions
    (4 times the bytes) from being folded back into float32 constants, and
    the graph small: its size counts in a small model's file.
    """

    MAX_BUFFER_SIZE = 2 ** 24
    #: The most float32 entries in a constant expression the converter folds (8 KiB).
    FOLDED_UNITS = 2048
    #: About the bytes a slice op and its constants add to a file.
    SLICE_BYTES = 200
    MAX_STEP = 255
    INT8_LEVELS = 127
    BLOCK = 4

    def __init__(self, quantization):
        self.quantization = quantization
        self._layers = {}  # id(layer) -> its (m, n) float32 factors
        self._buffers = None  # the _Buffers, packed once
        self._pieces = {}  # id(layer) -> [(buffer index, piece index, shape, scale)]
        self._unpacked = {}  # graph -> each buffer's factors as flat tensors

    @classmethod
    def fits(cls, factors):
        """Whether every factor fits in one buffer."""
        return all(np.asarray(f).size <= cls.MAX_BUFFER_SIZE for f in factors)

    def add(self, key, factors):
        """Store (m, n) NumPy factors under ``key``; ``factors(key, dtype)`` rebuilds them."""
        self._layers[id(key)] = [np.asarray(f, dtype=np.float32) for f in factors]

    def _unit(self):
        """``BLOCK`` if storing whole blocks of every flat factor takes fewer bytes
        (a value and a step byte per unit), else 1."""
        flat = [f.T.reshape(-1) for factors in self._layers.values() for f in factors]
        if any(f.size % self.BLOCK for f in flat):
            return 1
        value_bytes = 1 if self.quantization == "dynamic_int8" else 2
        nonzero = sum(np.count_nonzero(f) for f in flat)
        blocks = sum(np.count_nonzero(f.reshape(-1, self.BLOCK).any(axis=1)) for f in flat)
        return self.BLOCK if blocks * (self.BLOCK * value_bytes + 1) < nonzero * (
            value_bytes + 1) else 1

    def _pack(self):
        """Lay every stored factor into the buffers (once)."""
        unit, self._buffers = self._unit(), []
        for key, factors in self._layers.items():
            pieces = []
            for factor in factors:
                units = factor.T.reshape(-1, unit)
                positions = np.flatnonzero(units.any(axis=1))
                values = units[positions].reshape(-1)
                scale = None
                if self.quantization == "dynamic_int8":
                    scale = max(float(np.max(np.abs(values), initial=0.0)), 1e-30) / \
                        self.INT8_LEVELS
                    values = np.round(values / scale).astype(np.int8)
                if not self._buffers or self._buffers[-1].size + factor.size > \
                        self.MAX_BUFFER_SIZE:
                    self._buffers.append(_Buffer(unit, [], [], []))
                buffer = self._buffers[-1]
                buffer.positions.append(buffer.size // unit + positions)
                buffer.values.append(values)
                buffer.sizes.append(factor.size)
                pieces.append((len(self._buffers) - 1, len(buffer.sizes) - 1, factor.shape, scale))
            self._pieces[key] = pieces

    @classmethod
    def steps(cls, positions):
        """``(steps, index)``: uint8 steps whose running sum visits ``positions``
        (increasing) and the extra positions between them, and the index of
        each of ``positions`` among the visited ones."""
        gaps = np.diff(positions, prepend=0)
        extra = np.maximum(0, (gaps - 1) // cls.MAX_STEP)  # zero units before each position
        index = np.cumsum(extra + 1) - 1
        visited = np.zeros(index[-1] + 1 if index.size else 0, dtype=np.int64)
        visited[index] = gaps - extra * cls.MAX_STEP
        visited[np.setdiff1d(np.arange(visited.size), index)] = cls.MAX_STEP
        return visited.astype(np.uint8), index

    @classmethod
    def _running_sum(cls, steps):
        """``cumsum(steps)`` in the graph, as int32 scatter indices of shape (n, 1).

        The converter folds a running sum of at most ``FOLDED_UNITS`` steps
        into a constant of positions: 4 bytes a step, not 1. Where
        it costs fewer bytes, the steps are padded with zeros beyond that
        and the sum cut back to its first ``len(steps)`` entries, which the
        converter leaves to the graph.
        """
        count = steps.size
        padding = cls.FOLDED_UNITS + 1 - count
        if padding <= 0 or padding + cls.SLICE_BYTES >= 3 * count:
            return cls._positions(steps)
        return cls._positions(np.pad(steps, (0, padding)))[:count]

    @staticmethod
    def _positions(steps):
        """``cumsum(steps)`` as int32 of shape (n, 1), summed in float32 (exact below
        2**24), since the converter folds an int32 running sum whatever its size."""
        summed = tf.cumsum(tf.cast(tf.constant(steps.reshape(-1, 1)), tf.float32), axis=0)
        return tf.cast(summed, tf.int32)

    def _unpack(self):
        """Each buffer's factors, flat, as tensors of the graph being traced (built
        once per graph): one split of each unpacked buffer."""
        if self._buffers is None:
            self._pack()
        graph = tf.compat.v1.get_default_graph()
        if graph not in self._unpacked:
            pieces = []
            for unit, positions, values, sizes in self._buffers:
                size = sum(sizes)
                steps, index = self.steps(np.concatenate(positions))
                stored = np.zeros((steps.size, unit), dtype=values[0].dtype)
                stored[index] = np.concatenate(values).reshape(-1, unit)
                visited = self._running_sum(steps)
                shape = [size] if unit == 1 else [size // unit, unit]
                units = tf.scatter_nd(visited, tf.cast(tf.constant(
                    stored.reshape([-1] + shape[1:])), tf.float32), shape)
                pieces.append(tf.split(tf.reshape(units, [size]) if unit > 1 else units, sizes))
            self._unpacked[graph] = pieces
        return self._unpacked[graph]

    def factors(self, key, dtype):
        """The factors stored under ``key``, rebuilt from their buffers in ``dtype``
        (int8: the last one also scaled by the product of the factors' scales)."""
        pieces = self._unpack()
        stored = self._pieces[id(key)]
        factors = [tf.reshape(pieces[buffer][piece], (cols, rows))
                   for buffer, piece, (rows, cols), _ in stored]
        scales = [scale for *_, scale in stored if scale is not None]
        if scales:
            factors[-1] = factors[-1] * float(np.prod(scales))
        return [tf.cast(tf.transpose(factor), dtype) for factor in factors]


class ExportForm:
    """How the export copy of a layer applies its factors in the file: the
    value ``export_model`` sets as the layer's ``export_form`` (None in training).

    ``kind`` is ``"sequence"`` (one op per factor, each stored in the fewest
    bytes), ``"fully_connected"`` (one op per factor, fully connected after
    a convolution's first one, so that LiteRT runs 1x4-block sparse weights
    on its sparse kernel) or ``"product"`` (one op with the product kernel).
    A layer with sparse factors takes them from ``factors(dtype)`` and
    applies them with ``apply``; a layer given no factors (Kronecker,
    tensor-train convolution) only applies its own in sequence.
    """

    def __init__(self, kind, factors=(), compact=None):
        self.kind = kind
        self.arrays = [np.asarray(f) for f in factors]  # the factors, as NumPy arrays
        self.compact = compact
        if compact is not None:
            compact.add(self, self.arrays)

    # tf_keras traces ``call`` with AutoGraph, which would convert the Python
    # loops that build the graph here; they need no conversion.
    @tf.autograph.experimental.do_not_convert
    def factors(self, dtype):
        """The factors as constants of the graph being traced, in ``dtype``: each
        one (unpacked by the graph when stored as ``CompactFactors``), or for
        ``"product"`` their product. Computed before tracing, so that the
        converter never sees the scatter of values onto supports."""
        if self.compact is not None:
            return self.compact.factors(self, dtype)
        factors = self.arrays
        if self.kind == "product":
            factors = [functools.reduce(np.matmul, factors)]
        return [tf.constant(factor, dtype=dtype) for factor in factors]

    @tf.autograph.experimental.do_not_convert
    def apply(self, inputs, factors):
        """``inputs @ F_1 @ ... @ F_Q``, one op per factor.

        A constant factor is applied as a 1x1 convolution, whose weight the
        converter stores plainly and LiteRT densifies once when it loads the
        file, where a fully connected op would compute wrong numbers
        (``litert_cost.drops_inputs``: 1x4 blocks that leave out the last
        ``in % 4`` inputs) or, in the ``"sequence"`` form, store it in 1x4
        blocks in more bytes than plainly (``litert_cost.blocks_take_more_bytes``:
        sparse factors of random support below about 3% density); the
        others as fully connected ops.
        """
        outputs = inputs
        for factor in factors:
            matrix = tf.get_static_value(factor) if self.kind != "product" else None
            if matrix is not None and (drops_inputs(matrix) or (
                    self.kind == "sequence" and blocks_take_more_bytes(matrix))):
                n_in, n_out = matrix.shape
                outputs = tf.nn.conv2d(tf.reshape(outputs, [-1, 1, 1, n_in]),
                                       tf.reshape(factor, [1, 1, n_in, n_out]), 1, "VALID")
                outputs = tf.reshape(outputs, [-1, n_out])
            else:
                outputs = tf.matmul(outputs, factor)
        return outputs


def cheaper_kind(factors, first_factor_convolves):
    """``"fully_connected"``, or ``"product"`` where LiteRT runs the product faster.

    Compares the multiply-adds per output row ``litert_cost`` predicts for
    the (NumPy) factors applied one at a time and for their product. When
    the first factor convolves (a Conv2D layer), it and the product are
    convolution kernels, which LiteRT always runs dense.
    """
    sequence = sum(cost_per_row(factor, fully_connected=not (first_factor_convolves and index == 0))
                   for index, factor in enumerate(factors))
    product = cost_per_row(functools.reduce(np.matmul, factors),
                           fully_connected=not first_factor_convolves)
    return "fully_connected" if sequence <= product else "product"


def export_model(model, factor_form="sequence", quantization=None):
    """A copy of ``model`` for conversion; ``model`` itself is not touched.

    Every layer is rebuilt from its config with a copy of its weights;
    pruning wrappers are stripped (``strip_for_export``). Every layer of the
    copy with an ``export_form`` attribute, wrapped layers included, gets an
    ``ExportForm``: for the sparse-factor layers, of kind ``factor_form``, or
    with ``"auto"`` the ``cheaper_kind``. With a ``quantization``, their
    factors are applied in sequence and stored as ``CompactFactors``.
    """
    check_graph_model(model, "export")
    check_choice(factor_form, "factor_form", FACTOR_FORMS, where="export")
    check_choice(quantization, "quantization", tuple(DEFAULT_TOLERANCES), where="export")
    copies = []

    def replace(layer):
        layer, weights = strip_for_export(layer)
        new_layer = type(layer).from_config(layer.get_config())
        copies.append((new_layer, weights))
        return new_layer

    exported = clone_replacing(model, replace)
    for new_layer, weights in copies:
        new_layer.set_weights(weights)
    compact = None if quantization is None else CompactFactors(quantization)
    for layer in leaf_layers(exported):
        if hasattr(layer, "export_form"):
            layer.export_form = _export_form(layer, factor_form, compact)
    return exported


def _export_form(layer, factor_form, compact):
    """The ``ExportForm`` of ``layer`` in an export copy (see ``export_model``)."""
    if not hasattr(layer, "factors"):  # factors it applies in sequence itself
        return ExportForm("sequence")
    factors = [np.asarray(factor) for factor in layer.factors]
    if compact is not None and CompactFactors.fits(factors):
        return ExportForm("sequence", factors, compact)
    if factor_form == "auto":
        return ExportForm(cheaper_kind(factors, layer.first_factor_convolves), factors)
    return ExportForm(factor_form, factors)


def factor_forms(exported):
    """The ``ExportForm`` of every layer of the export copy that has sparse factors."""
    return [layer.export_form for layer in leaf_layers(exported)
            if getattr(layer, "export_form", None) is not None and layer.export_form.arrays]


def _input_specs(model, batch_size):
    return [
        tf.TensorSpec((batch_size,) + tuple(tensor.shape[1:]), tf.as_dtype(tensor.dtype))
        for tensor in model.inputs
    ]


def _concrete_function(model, batch_size):
    """``model(inputs, training=False)`` traced for inputs with ``batch_size`` rows."""
    specs = _input_specs(model, batch_size)

    def serve(*inputs):
        return model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)

    return tf.function(serve).get_concrete_function(*specs)


def convert(model, quantization=None, sparse_encoding=True, batch_size=1):
    """TFLite bytes of ``model`` as it stands (no export copy, no check).

    Variables are frozen into constants, so constant products (masks, and
    factor products a layer forms itself) are folded by the converter.
    ``sparse_encoding`` turns on TFLite's sparse encoding of constants
    (``Optimize.EXPERIMENTAL_SPARSITY``); ``quantization`` is None,
    ``"float16"`` or ``"dynamic_int8"`` (post-training dynamic-range
    quantization: int8 weights, float activations).
    """
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [_concrete_function(model, batch_size)])
    optimizations = []
    if quantization is not None:
        optimizations.append(tf.lite.Optimize.DEFAULT)
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if sparse_encoding:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    return compacted(converter.convert())


def compacted(content):
    """The TFLite file ``content`` without the bytes LiteRT does not use.

    - The converter names every tensor after the ops it came from; the names
      only label the graph for debugging tools, and in a compressed file with
      a few ops per layer they can take a fifth of the bytes. The inputs and
      outputs keep theirs (signatures refer to tensors by index).
    - A reshape to a constant shape keeps the shape in its options instead of
      a constant tensor (``ReshapeOptions.new_shape``, which LiteRT reads when
      the op has one input): the factors unpacked by ``CompactFactors`` are
      reshaped one by one.
    - Every tensor without data (activations) refers to the empty buffer 0
      instead of an empty buffer of its own; unused tensors and buffers go,
      and so does the converter's record of its options
      (``CONVERSION_METADATA``).
    """
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
    reshape = schema.BuiltinOperator.RESHAPE
    reshapes = {index for index, code in enumerate(model.operatorCodes)
                if max(code.builtinCode, code.deprecatedBuiltinCode) == reshape}
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            shape = model.buffers[subgraph.tensors[op.inputs[1]].buffer].data if (
                op.opcodeIndex in reshapes and len(op.inputs) == 2) else None
            if shape is not None and len(shape):
                op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
                op.builtinOptions = schema.ReshapeOptionsT()
                op.builtinOptions.newShape = np.frombuffer(bytes(shape), np.int32).tolist()
                op.inputs = op.inputs[:1]
        named = set(subgraph.inputs) | set(subgraph.outputs)
        used = named | {i for op in subgraph.operators for i in [*op.inputs, *op.outputs]}
        index = {old: new for new, old in enumerate(sorted(used - {-1}))}
        subgraph.tensors = [subgraph.tensors[old] for old in sorted(index)]
        for op in subgraph.operators:
            op.inputs = [index.get(i, -1) for i in op.inputs]
            op.outputs = [index[i] for i in op.outputs]
        subgraph.inputs = [index[i] for i in subgraph.inputs]
        subgraph.outputs = [index[i] for i in subgraph.outputs]
        for position, tensor in enumerate(subgraph.tensors):
            if position not in subgraph.inputs and position not in subgraph.outputs:
                tensor.name = None
            data = model.buffers[tensor.buffer].data
            if data is None or not len(data):
                tensor.buffer = 0
    model.metadata = [entry for entry in model.metadata or []
                      if entry.name != b"CONVERSION_METADATA"]
    used = sorted({0} | {tensor.buffer for subgraph in model.subgraphs
                         for tensor in subgraph.tensors}
                  | {entry.buffer for entry in model.metadata})
    index = {old: new for new, old in enumerate(used)}
    model.buffers = [model.buffers[old] for old in used]
    for tensor in (tensor for subgraph in model.subgraphs for tensor in subgraph.tensors):
        tensor.buffer = index[tensor.buffer]
    for entry in model.metadata:
        entry.buffer = index[entry.buffer]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _as_input_list(model, inputs):
    arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    if len(arrays) != len(model.inputs):
        raise ValueError(
            f"`inputs`: model {model.name!r} has {len(model.inputs)} input(s), "
            f"got {len(arrays)} array(s)."
        )
    arrays = [np.asarray(a, dtype=tf.as_dtype(t.dtype).as_numpy_dtype)
              for a, t in zip(arrays, model.inputs)]
    for array, tensor in zip(arrays, model.inputs):
        expected = tuple(tensor.shape[1:])
        if array.ndim != len(expected) + 1 or any(
                e is not None and e != d for e, d in zip(expected, array.shape[1:])):
            raise ValueError(
                f"`inputs`: expected a batch of shape (n,) + {expected} for model "
                f"{model.name!r}, got {array.shape}."
            )
    if len({a.shape[0] for a in arrays}) != 1:
        raise ValueError("`inputs`: every input array must have the same number of samples.")
    return arrays


def _flat_outputs(outputs):
    return [np.asarray(o) for o in tf.nest.flatten(outputs)]


# Runs a .tflite file in a fresh Python process that imports only numpy and
# ai_edge_litert, so that LiteRT crashing on a file cannot take the caller
# down. argv: the file, an .npz of inputs ("0", "1", ... in the model's input
# order; none: one standard-normal sample), the .npz to write the outputs to
# ("0", "1", ...) and the median seconds of ``runs`` more invocations on the
# last slice ("latency"), the number of threads, runs.
_LITERT_RUNNER = """
import sys
import time
import numpy as np
from ai_edge_litert.interpreter import Interpreter

path, inputs_file, outputs_file, threads, runs = sys.argv[1:]
data = np.load(inputs_file)
interpreter = Interpreter(model_path=path, num_threads=int(threads))
inputs = interpreter.get_input_details()
arrays = [data[str(i)] for i in range(len(data.files))] or [
    np.random.default_rng(0).standard_normal(d["shape"]).astype(d["dtype"]) for d in inputs]
if inputs[0]["shape_signature"][0] == -1:
    step = arrays[0].shape[0]
    for detail, array in zip(inputs, arrays):
        interpreter.resize_tensor_input(detail["index"], array.shape)
else:
    step = int(inputs[0]["shape"][0])
interpreter.allocate_tensors()
outputs = interpreter.get_output_details()
results = [[] for _ in outputs]
for start in range(0, arrays[0].shape[0], step):
    for detail, array in zip(inputs, arrays):
        interpreter.set_tensor(detail["index"], array[start:start + step])
    interpreter.invoke()
    for result, detail in zip(results, outputs):
        result.append(interpreter.get_tensor(detail["index"]))
times = []
for _ in range(int(runs) + 10 * (int(runs) > 0)):
    begin = time.perf_counter()
    interpreter.invoke()
    times.append(time.perf_counter() - begin)
np.savez(outputs_file, latency=np.median(times[10:]) if times else np.nan,
         **{str(i): np.concatenate(r) for i, r in enumerate(results)})
"""


def _run_litert(path, arrays, num_threads, runs):
    """``(outputs, median seconds of runs invocations)`` of the file, in a subprocess."""
    with tempfile.TemporaryDirectory() as directory:
        inputs_file = os.path.join(directory, "inputs.npz")
        outputs_file = os.path.join(directory, "outputs.npz")
        np.savez(inputs_file, **{str(i): np.asarray(a) for i, a in enumerate(arrays)})
        done = subprocess.run(
            [sys.executable, "-c", _LITERT_RUNNER, os.fspath(path), inputs_file,
             outputs_file, str(num_threads), str(runs)],
            capture_output=True, text=True, check=False,
        )
        if done.returncode != 0:
            how = (f"was killed by signal {-done.returncode}" if done.returncode < 0
                   else f"exited with status {done.returncode}")
            detail = done.stderr.strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"LiteRT {how} running {os.fspath(path)!r}: {detail[0]}")
        with np.load(outputs_file) as outputs:
            return ([outputs[str(i)] for i in range(len(outputs.files) - 1)],
                    float(outputs["latency"]))


def run_tflite(path, inputs, num_threads=1):
    """Outputs of the .tflite file at ``path`` for a batch of inputs, run by LiteRT.

    ``inputs`` is an array, or a list with one array per file input, in the
    model's input order. The file runs with LiteRT's default (XNNPACK)
    delegate in a separate process; a file with a fixed batch size runs one
    slice of that size at a time. Returns the list of outputs, stacked over
    the samples.

    Raises:
        RuntimeError: LiteRT could not load, prepare or run the file.
    """
    arrays = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    return _run_litert(path, arrays, num_threads, runs=0)[0]


def litert_latency(path, runs=100, num_threads=1):
    """Median seconds of one LiteRT invocation of the .tflite file at ``path``
    on one standard-normal input of the file's shape (a single sample when
    the batch size is chosen at run time), after 10 warm-up invocations."""
    check_int(runs, "runs", minimum=1, where="litert_latency")
    return _run_litert(path, [], num_threads, runs)[1]


def verify_tflite(path, model, inputs, num_threads=1):
    """Maximum absolute difference between the file's and the Keras model's outputs.

    Runs the .tflite file at ``path`` with the LiteRT interpreter
    (``ai_edge_litert``, see ``run_tflite``) on ``inputs`` (a batch: an array,
    or a list with one array per model input) and compares every output
    with ``model(inputs, training=False)``.
    """
    arrays = _as_input_list(model, inputs)
    return _max_difference(run_tflite(path, arrays, num_threads), _keras_outputs(model, arrays))


def _keras_outputs(model, arrays):
    outputs = model(arrays[0] if len(arrays) == 1 else arrays, training=False)
    return [np.asarray(output) for output in tf.nest.flatten(outputs)]


def _max_difference(actual, expected):
    if len(actual) != len(expected):
        raise ValueError(
            f"the file has {len(actual)} output(s), the model {len(expected)}."
        )
    return max(float(np.max(np.abs(a.astype(np.float64) - e.reshape(a.shape))))
               for a, e in zip(actual, expected))


def _random_inputs(model, n_samples, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((n_samples,) + tuple(t.shape[1:])).astype(
            tf.as_dtype(t.dtype).as_numpy_dtype)
        for t in model.inputs
    ]


def _smallest_agreeing(candidates, arrays, expected, allowed, quantization, batch_size):
    """``(content, label, rejected)``: the smallest converted candidate that runs in
    LiteRT and agrees with ``expected`` within ``allowed`` (None and None if
    none does), and the reason each rejected candidate was rejected."""
    kept, kept_label, rejected = None, None, []
    with tempfile.TemporaryDirectory() as directory:
        for index, (label, exported, sparse_encoding) in enumerate(candidates):
            content = convert(exported, quantization, sparse_encoding, batch_size)
            candidate = os.path.join(directory, f"{index}.tflite")
            with open(candidate, "wb") as handle:
                handle.write(content)
            try:
                difference = _max_difference(run_tflite(candidate, arrays), expected)
            except RuntimeError as error:
                rejected.append(f"{label} does not run: {error}")
                continue
            if not difference <= allowed:
                rejected.append(
                    f"{label} differs from the Keras model by up to "
                    f"{difference:.3g}, more than the tolerance {allowed:.3g}")
            elif kept is None or len(content) < len(kept):
                kept, kept_label = content, label
    return kept, kept_label, rejected


def to_tflite(model, path, *, quantization=None, sparse="auto", factor_form="sequence",
              inputs=None, tolerance=None, batch_size=1):
    """Write ``model`` as a .tflite file that keeps its compression; returns ``path``.

    The model is converted through an export copy (``export_model``):
    pruning wrappers stripped with their masks folded in, factors applied to
    the input one at a time (or, for sparse-factor layers, as ``factor_form``
    says). Each candidate file (with and without TFLite's sparse encoding, as
    ``sparse`` asks, and for a quantized file in the ``"sequence"`` form
    with the factors stored as ``CompactFactors``) is run by LiteRT on the
    check inputs and compared with ``model``; the smallest one that runs and
    agrees is written.

    Args:
        model: a functional or Sequential Keras model (compressed or not).
            It is not modified.
        path: where to write the file.
        quantization: None (float32 weights), ``"float16"`` (half-precision
            weights) or ``"dynamic_int8"`` (dynamic-range quantization: int8
            weights, float activations).
        sparse: ``"auto"`` (the smallest of the sparse candidates and the
            dense encoding), True (sparse storage only: TFLite's sparse
            encoding, and ``CompactFactors`` when quantized) or False (dense
            constants only). LiteRT 2.3 runs no quantized weight in TFLite's
            sparse encoding (XNNPACK cannot prepare a fully connected op with
            a sparse int8 weight; a float16 weight stored in 1x4 sparse
            blocks reaches the op undecoded), so a quantized layer without
            factors stays dense: ``"auto"`` keeps the dense file with a
            warning, True raises.
        factor_form: how sparse-factor (PSM) layers apply their factors:
            ``"sequence"`` (the default: one op per factor, the smallest
            file), ``"product"`` (one op with the product kernel: the dense
            layer's speed and nearly its size) or ``"auto"`` (per layer, the
            faster of the factors as fully connected ops and the product, as
            LiteRT is predicted to run them; see the module docstring). A
            quantized ``"sequence"`` file stores the factors as
            ``CompactFactors``, whose ops run in LiteRT's builtin kernels
            (XNNPACK takes constant weights only): several
            times slower than the dense file; quantized ``"product"`` and
            ``"auto"`` files store dense quantized weights and keep the
            dense file's speed.
            ``size_report`` gives a file's size and LiteRT latency against
            the dense original's, to choose by.
        inputs: samples for the check (an array, or one per model input);
            by default 8 standard-normal samples. Real samples make the check
            meaningful for the model's actual range.
        tolerance: largest allowed ``max |tflite - keras| / max(1, max |keras|)``;
            by default ``DEFAULT_TOLERANCES[quantization]`` (1e-4 float32,
            1e-2 float16, 5e-2 dynamic int8).
        batch_size: the file's fixed batch size (1: single samples, as on a
            phone), or None for a batch size chosen at run time.

    Raises:
        RuntimeError: no candidate file runs in LiteRT and agrees with the
            model within the tolerance (nothing is written; the message
            gives each candidate's reason).
    """
    where = "to_tflite"
    require_tensorflow_backend(where, "save the model (model.save('m.keras')) and export it "
                               "with KERAS_BACKEND=tensorflow keras-psm export m.keras m.tflite.")
    check_graph_model(model, "export")
    check_choice(quantization, "quantization", tuple(DEFAULT_TOLERANCES), where=where)
    check_choice(sparse, "sparse", SPARSE_CHOICES, where=where)
    check_choice(factor_form, "factor_form", FACTOR_FORMS, where=where)
    check_int(batch_size, "batch_size", minimum=1, where=where, allow_none=True)
    tolerance = check_float(
        DEFAULT_TOLERANCES[quantization] if tolerance is None else tolerance, "tolerance",
        minimum=0.0, where=where)
    arrays = (_random_inputs(model, 8 if batch_size is None else 8 * batch_size)
              if inputs is None else _as_input_list(model, inputs))
    if batch_size is not None and arrays[0].shape[0] % batch_size:
        raise ValueError(
            f"{where}: the number of check samples ({arrays[0].shape[0]}) must be a "
            f"multiple of `batch_size` ({batch_size})."
        )
    expected = _keras_outputs(model, arrays)
    allowed = tolerance * max(1.0, max(float(np.max(np.abs(e))) for e in expected))

    encodings = {"auto": (True, False), True: (True,), False: (False,)}[sparse]
    exported = export_model(model, factor_form)
    candidates = [(f"the {'sparse' if encoding else 'dense'} encoding", exported, encoding)
                  for encoding in encodings]
    if quantization is not None and sparse is not False and factor_form == "sequence":
        compact = export_model(model, factor_form, quantization)
        if any(form.compact is not None for form in factor_forms(compact)):
            candidates.insert(0, ("the compact factors", compact, False))
    check = functools.partial(_smallest_agreeing, arrays=arrays, expected=expected,
                              allowed=allowed, quantization=quantization, batch_size=batch_size)
    kept, kept_label, rejected = check(candidates)
    if (quantization is None and factor_form == "sequence" and sparse is not False
            and kept_label != "the sparse encoding" and factor_forms(exported)):
        # Densely encoded, the factors hold more than the kernels they factor:
        # the product form is about the uncompressed model's size.
        product = export_model(model, "product")
        candidates = [(f"the product form in the {'sparse' if encoding else 'dense'} encoding",
                       product, encoding) for encoding in encodings]
        product_kept, product_label, product_rejected = check(candidates)
        rejected += product_rejected
        if product_kept is not None and (kept is None or len(product_kept) < len(kept)):
            kept, kept_label = product_kept, product_label
    summary = (f"model {model.name!r} (quantization={quantization!r}, sparse={sparse!r}, "
               f"factor_form={factor_form!r})")
    if kept is None:
        raise RuntimeError(
            f"{where}: no TFLite file of {summary} runs in LiteRT and agrees with the "
            f"model; nothing was written. " + "; ".join(rejected) + ". Try sparse='auto' "
            "or another quantization; pass real samples as `inputs` or a larger "
            "`tolerance` if only the tolerance is exceeded."
        )
    if kept_label.startswith("the product form"):
        warnings.warn(f"{where}: {summary}: " + "; ".join(rejected + [
            f"the file keeps {kept_label} (one kernel per layer, about the uncompressed "
            "size), since the sequence of factors could not be stored sparsely in fewer "
            "bytes."]), RuntimeWarning, stacklevel=2)
    elif rejected and kept_label != "the compact factors":
        warnings.warn(f"{where}: {summary}: " + "; ".join(rejected)
                      + f"; the file keeps {kept_label}.", RuntimeWarning, stacklevel=2)
    with write_atomically(path) as temporary, open(temporary, "wb") as handle:
        handle.write(kept)
    return path


@dataclasses.dataclass
class LayerSize:
    """Parameters of one layer with weights.

    ``params`` counts Keras's stored values (masks included), ``nonzero``
    the values a sparse encoding keeps (masks folded into their weights),
    ``dense_params`` the parameters of the layer of the same name in the
    dense original, when given.
    """

    name: str
    layer_type: str
    params: int
    nonzero: int
    dense_params: Optional[int] = None


@dataclasses.dataclass
class SizeReport:
    """File bytes, LiteRT latency and per-layer parameters of an exported
    model against its dense original (latencies: median seconds of one
    single-threaded invocation, ``litert_latency``)."""

    file_bytes: int
    dense_file_bytes: Optional[int] = None
    layers: List[LayerSize] = dataclasses.field(default_factory=list)
    latency: Optional[float] = None
    dense_latency: Optional[float] = None

    @property
    def nonzero(self):
        return sum(row.nonzero for row in self.layers)

    @property
    def dense_params(self):
        counts = [row.dense_params for row in self.layers if row.dense_params is not None]
        return sum(counts) if counts else None

    @property
    def file_ratio(self):
        """Dense file bytes / file bytes (None without a dense original)."""
        return None if self.dense_file_bytes is None else self.dense_file_bytes / self.file_bytes

    @property
    def latency_ratio(self):
        """Latency / dense latency (None without both)."""
        if self.latency is None or self.dense_latency is None:
            return None
        return self.latency / self.dense_latency

    def as_dicts(self):
        return [dataclasses.asdict(row) for row in self.layers]

    def __str__(self):
        header = ("layer", "type", "dense params", "params", "nonzero")
        lines = [header] + [
            (row.name, row.layer_type,
             "" if row.dense_params is None else f"{row.dense_params:,}",
             f"{row.params:,}", f"{row.nonzero:,}")
            for row in self.layers
        ]
        total_dense = self.dense_params
        lines.append(("total", "", "" if total_dense is None else f"{total_dense:,}",
                      f"{sum(r.params for r in self.layers):,}", f"{self.nonzero:,}"))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "-" * len(text[0]))
        text.insert(len(text) - 1, "-" * len(text[0]))
        text.append(f"file: {self.file_bytes:,} bytes")
        if self.dense_file_bytes is not None:
            text[-1] += (f", dense original: {self.dense_file_bytes:,} bytes "
                         f"(x{self.file_ratio:.1f} smaller)")
        if self.latency is not None:
            text.append(f"LiteRT latency (one sample, 1 thread, median): "
                        f"{1e6 * self.latency:,.0f} us")
        if self.latency_ratio is not None:
            text[-1] += (f", dense original: {1e6 * self.dense_latency:,.0f} us "
                         f"(x{self.latency_ratio:.2f})")
        return "\n".join(text)


def _layer_sizes(model):
    """``name -> (layer type, stored values, nonzero values)`` of the layers with weights."""
    sizes = {}
    for layer in model.layers:
        if is_graph_model(layer):
            sizes.update(_layer_sizes(layer))
            continue
        if not layer.weights:
            continue
        inner, weights = strip_for_export(layer)
        if hasattr(inner, "count_nonzero_params"):
            nonzero = inner.count_nonzero_params()
        else:
            nonzero = sum(int(np.count_nonzero(w)) for w in weights)
        sizes[layer.name] = (type(inner).__name__, int(inner.count_params()), nonzero)
    return sizes


def size_report(model, path, dense_model=None, dense_path=None, latency_runs=100):
    """Bytes and LiteRT latency of the .tflite file at ``path`` and the
    parameters of each layer of ``model``, against the dense original.

    ``dense_model`` (the model before compression) gives each layer's dense
    parameter count; its file comes from ``dense_path`` if given, else from
    exporting it with ``to_tflite(dense_model, ..., sparse=False)``.
    ``latency_runs`` invocations time each file (``litert_latency``); 0
    skips the timing.
    """
    check_int(latency_runs, "latency_runs", minimum=0, where="size_report")
    report = SizeReport(file_bytes=os.path.getsize(path))
    dense_sizes = {} if dense_model is None else _layer_sizes(dense_model)
    for name, (layer_type, params, nonzero) in _layer_sizes(model).items():
        dense = dense_sizes.get(name)
        report.layers.append(LayerSize(name, layer_type, params, nonzero,
                                       None if dense is None else dense[1]))
    if latency_runs:
        report.latency = litert_latency(path, latency_runs)
    with tempfile.TemporaryDirectory() as directory:
        if dense_path is None and dense_model is not None:
            dense_path = to_tflite(dense_model, os.path.join(directory, "dense.tflite"),
                                   sparse=False)
        if dense_path is not None:
            report.dense_file_bytes = os.path.getsize(dense_path)
            if latency_runs:
                report.dense_latency = litert_latency(dense_path, latency_runs)
    return report
