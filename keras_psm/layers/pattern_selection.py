"""Choosing the block shape in one training run (block-wise sparsity paper, section 5).

``KroneckerPatternDense`` holds K candidate block patterns at once: its
kernel is the sum of K kernels of eq. 3, ``sum_k sum_i (S_k * A_ki) (x) B_ki``,
each with its own block shape. Eq. 7 adds

    group * sum_k ||S_k||_F  +  l1 * sum_k ||S_k||_1

to the loss. The group term (one group per pattern) pushes whole patterns to
zero; raising both strengths during training (``PenaltySchedule``: the
paper starts at 0.01 and adds 0.002 every 5 epochs) makes the patterns fall
away until one remains (the schedule can stop training there), and
``select_pattern`` / ``keep_selected_patterns`` turn the pattern whose
kernel W_k has the largest norm into an ordinary ``KroneckerDense`` to
fine-tune.

``S * A`` does not change under S -> cS, A -> A / c, so without more the
penalties on S are paid down by shrinking every S_k while the A_ki grow,
and no pattern has to fall away: on the MNIST softmax layer of
``examples/kronecker_linear_mnist.py`` two patterns keep kernels of similar
norm for 150 epochs of the paper's schedule. ``factor_decay`` (an l2
penalty on the A_ki and B_ki, ordinary weight decay, which eq. 7 does not
write) fixes that scale, so that a small S_k is a small kernel; the same run
with ``factor_decay=0.03`` ends with one pattern.

Eq. 7 sums per-pattern losses J over the K patterns; here the K candidates
share one loss through the summed kernel, so that they compete for the same
fit and the group penalty decides between them (with K separate losses the
problem would split into K independent trainings). The paper groups pattern
k over all layers of a network (a square root of the sum over layers); here
each layer's penalty groups its own S_k, which is the same for one layer.
"""

import numpy as np

from keras_psm import ops
from keras_psm.backend import keras, register_serializable
from keras_psm.layers.base import (
    CompressedLayer,
    common_options,
    matmul_last_axis,
    normalize_tuple,
)
from keras_psm.layers.kronecker import (
    KroneckerDense,
    KroneckerGeometry,
    l1_norm,
    layer_input_size,
)
from keras_psm.model_layers import clone_replacing
from keras_psm.validation import check_bool, check_float, check_int

# Keeps the gradient of the group norm finite when a pattern's S reaches zero.
_GROUP_NORM_EPSILON = 1e-12


@register_serializable
class KroneckerPatternDense(CompressedLayer):
    """``Dense`` whose kernel sums K candidate block patterns of eq. 3 (eq. 7).

    Args:
        units: output size.
        block_shapes: the K candidate blocks (b_in, b_out) of the (in, units)
            kernel, e.g. ``[(2, 2), (4, 2), (8, 2), (16, 2)]``.
        rank: r, Kronecker terms per pattern.
        group: strength of ``sum_k ||S_k||_F`` (lambda_1 of eq. 7).
        l1: strength of ``sum_k ||S_k||_1`` (lambda_2 of eq. 7).
            Both live in non-trainable weights that ``PenaltySchedule`` raises.
        factor_decay: strength of ``sum_ki ||A_ki||_F^2 + ||B_ki||_F^2`` (weight
            decay on the factors; 0 is eq. 7 as written, see the module docstring).
        seed: seed of the random A_ki, B_ki (every S_k starts at ones).
        activation, use_bias: as in ``Dense``.
    """

    def __init__(self, units, block_shapes, rank=2, group=0.01, l1=0.01, factor_decay=0.0,
                 seed=None, **kwargs):
        super().__init__(**kwargs)
        where = f"KroneckerPatternDense {self.name!r}"
        self.units = check_int(units, "units", minimum=1, where=where)
        if isinstance(block_shapes, (str, bytes)) or not hasattr(block_shapes, "__len__") \
                or len(block_shapes) < 2:
            raise ValueError(
                f"{where}: `block_shapes` must be a list of at least two block shapes "
                f"(b_in, b_out), got {block_shapes!r}."
            )
        self.block_shapes = [normalize_tuple(shape, "block_shapes", where)
                             for shape in block_shapes]
        if len(set(self.block_shapes)) != len(self.block_shapes):
            raise ValueError(f"{where}: `block_shapes` repeats a block shape: "
                             f"{self.block_shapes}.")
        self.rank = check_int(rank, "rank", minimum=1, where=where)
        self.group = check_float(group, "group", minimum=0.0, where=where)
        self.l1 = check_float(l1, "l1", minimum=0.0, where=where)
        self.factor_decay = check_float(factor_decay, "factor_decay", minimum=0.0, where=where)
        self.seed = check_int(seed, "seed", minimum=0, where=where, allow_none=True)

    def build(self, input_shape):
        n_in = layer_input_size(self, input_shape)
        rng = np.random.default_rng(self.seed)
        n_terms = self.rank * len(self.block_shapes)
        self.geometries, self.s, self.a, self.b = [], [], [], []
        for k, block_shape in enumerate(self.block_shapes):
            geometry = KroneckerGeometry(n_in, self.units, block_shape)
            a, b = geometry.random_factors(self.rank, rng, n_terms)
            self._initial_values.setdefault(f"a_{k}", a)
            self._initial_values.setdefault(f"b_{k}", b)
            self.geometries.append(geometry)
            self.s.append(self._add_weight(f"s_{k}", geometry.grid_shape, "ones"))
            self.a.append(self._add_weight(f"a_{k}", (self.rank,) + geometry.grid_shape, "zeros"))
            self.b.append(self._add_weight(f"b_{k}", (self.rank,) + block_shape, "zeros"))
        self._add_bias(self.units)
        self.group_strength = self.add_weight(
            name="group_strength", shape=(), trainable=False,
            initializer=keras.initializers.Constant(self.group))
        self.l1_strength = self.add_weight(
            name="l1_strength", shape=(), trainable=False,
            initializer=keras.initializers.Constant(self.l1))
        self.built = True

    def _patterns(self, dtype):
        """(geometry, stack of S_k * A_ki, stack of B_ki) for each pattern k."""
        return [
            (geometry, ops.cast(s, dtype)[None] * ops.cast(a, dtype), ops.cast(b, dtype))
            for geometry, s, a, b in zip(self.geometries, self.s, self.a, self.b)
        ]

    def call(self, inputs):
        inputs = ops.cast(inputs, self.compute_dtype)

        def apply_all(x):
            return sum([geometry.apply(x, grid_factors, blocks)
                        for geometry, grid_factors, blocks in self._patterns(x.dtype)])

        outputs = matmul_last_axis(inputs, apply_all)
        group_norms = [ops.sqrt(ops.sum(ops.square(ops.cast(s, "float32")))
                                + _GROUP_NORM_EPSILON) for s in self.s]
        penalty = (self.group_strength * sum(group_norms)
                   + self.l1_strength * sum([l1_norm(s) for s in self.s]))
        if self.factor_decay:
            penalty += self.factor_decay * sum(
                [ops.sum(ops.square(ops.cast(w, "float32"))) for w in self.a + self.b])
        self.add_loss(penalty)
        return self._finish(outputs)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)

    @property
    def kernel(self):
        """The (in, units) kernel, the sum of the K patterns' kernels."""
        return sum([geometry.kernel(grid_factors, blocks)
                    for geometry, grid_factors, blocks in self._patterns("float32")])

    def s_l1_norms(self):
        """``||S_k||_1`` for each pattern k, as a NumPy array (the paper's Figure 3)."""
        return np.array([np.abs(ops.convert_to_numpy(s)).sum() for s in self.s])

    def kernel_norms(self):
        """``||W_k||_F``, the norm of each pattern's kernel, as a NumPy array."""
        return np.array([np.linalg.norm(ops.convert_to_numpy(geometry.kernel(grid_factors, blocks)))
                         for geometry, grid_factors, blocks in self._patterns("float32")])

    def surviving_patterns(self, tolerance=0.05):
        """Indices k whose ``||W_k||_F`` exceeds ``tolerance`` times the largest."""
        tolerance = check_float(tolerance, "tolerance", minimum=0.0, maximum=1.0,
                                where=f"KroneckerPatternDense {self.name!r}")
        norms = self.kernel_norms()
        return [k for k, norm in enumerate(norms) if norm > tolerance * norms.max()]

    @property
    def selected_pattern(self):
        """Index of the pattern whose kernel W_k has the largest norm."""
        return int(np.argmax(self.kernel_norms()))

    def set_penalty(self, group, l1):
        """Set the current strengths of the group and l1 penalties."""
        where = f"KroneckerPatternDense {self.name!r}"
        self.group_strength.assign(check_float(group, "group", minimum=0.0, where=where))
        self.l1_strength.assign(check_float(l1, "l1", minimum=0.0, where=where))

    def count_nonzero_params(self):
        """Nonzeros of every pattern's S_k * A_ki and B_ki, plus the bias."""
        count = sum(np.count_nonzero(ops.convert_to_numpy(grid_factors))
                    + np.count_nonzero(ops.convert_to_numpy(b))
                    for _, grid_factors, b in self._patterns("float32"))
        count = int(count)
        return count + (self.units if self.use_bias else 0)

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, block_shapes=[list(s) for s in self.block_shapes],
                      rank=self.rank, group=self.group, l1=self.l1,
                      factor_decay=self.factor_decay, seed=self.seed)
        return config


def select_pattern(layer, l1=0.0):
    """The surviving pattern of ``layer`` as a ``KroneckerDense`` (same name and options).

    The pattern with the largest kernel norm keeps its S_k, A_ki, B_ki and
    the bias; ``l1`` is the new layer's l1 strength for fine-tuning.
    """
    if not isinstance(layer, KroneckerPatternDense) or not layer.built:
        raise TypeError(f"select_pattern needs a built KroneckerPatternDense, got "
                        f"{type(layer).__name__}.")
    k = layer.selected_pattern
    return KroneckerDense.from_factors(
        layer.units, ops.convert_to_numpy(layer.a[k]), ops.convert_to_numpy(layer.b[k]),
        s=ops.convert_to_numpy(layer.s[k]),
        s_mask=np.ones(layer.geometries[k].grid_shape, np.float32),
        bias=ops.convert_to_numpy(layer.bias) if layer.use_bias else None,
        l1=l1, seed=layer.seed, **common_options(layer),
    )


def keep_selected_patterns(model, l1=0.0):
    """A copy of ``model`` where each ``KroneckerPatternDense`` (nested models
    included) is its ``select_pattern``; every other layer keeps a copy of its
    weights.

    ``model`` is not modified; compile the copy before fine-tuning it.
    """
    return clone_replacing(
        model,
        lambda layer: select_pattern(layer, l1=l1) if isinstance(layer, KroneckerPatternDense)
        else None,
    )


class PenaltySchedule(keras.callbacks.Callback):
    """Raise the penalty strengths during ``fit`` (the paper's pattern-selection schedule).

    At the start of epoch e every ``KroneckerPatternDense`` (group and l1) and
    ``KroneckerDense`` (l1) of the model gets ``start + step * (e // every)``.
    ``history[layer_name]`` collects each pattern layer's ``||S_k||_1`` after
    every epoch (the paper's Figure 3).

    With ``stop_when_one_remains`` training ends after the first epoch at
    which every pattern layer has one surviving pattern (every other kernel
    norm at most ``tolerance`` times the largest): section 5 raises the
    strengths "until only one group of parameters remains non-zero".
    ``stopped_epoch`` is that epoch (counted from 1), or None.
    """

    def __init__(self, start=0.01, step=0.002, every=5, stop_when_one_remains=False,
                 tolerance=0.01):
        super().__init__()
        self.start = check_float(start, "start", minimum=0.0, where="PenaltySchedule")
        self.step = check_float(step, "step", minimum=0.0, where="PenaltySchedule")
        self.every = check_int(every, "every", minimum=1, where="PenaltySchedule")
        self.stop_when_one_remains = check_bool(stop_when_one_remains, "stop_when_one_remains",
                                                where="PenaltySchedule")
        self.tolerance = check_float(tolerance, "tolerance", minimum=0.0, maximum=1.0,
                                     where="PenaltySchedule")
        self.history = {}
        self.stopped_epoch = None

    def strength(self, epoch):
        return self.start + self.step * (epoch // self.every)

    def on_epoch_begin(self, epoch, logs=None):
        value = self.strength(epoch)
        for layer in _nested_layers(self.model):
            if isinstance(layer, KroneckerPatternDense):
                layer.set_penalty(value, value)
            elif isinstance(layer, KroneckerDense):
                layer.set_penalty(value)

    def on_epoch_end(self, epoch, logs=None):
        pattern_layers = [layer for layer in _nested_layers(self.model)
                          if isinstance(layer, KroneckerPatternDense)]
        for layer in pattern_layers:
            self.history.setdefault(layer.name, []).append(layer.s_l1_norms())
        if self.stop_when_one_remains and pattern_layers and all(
                len(layer.surviving_patterns(self.tolerance)) == 1 for layer in pattern_layers):
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True


def _nested_layers(model):
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from _nested_layers(layer)
