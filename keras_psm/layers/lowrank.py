"""Low-rank layers (ALDS supplement, A.1-A.6): ``LowRankDense`` and ``LowRankConv``.

A rank-j factorization W ~ U V replaces one layer by two applied in
sequence: the encoder V (j filters per channel chunk) and the decoder U.
With ``groups`` = k the input channels are cut into k consecutive chunks,
each with its own j encoder filters (channel slicing, A.2), and the
decoder reads the k j encoder outputs. Layouts (Keras orientation):

    LowRankDense  encoder (in / k, k j)                 decoder (k j, units)
    LowRankConv   encoder (kh_e, kw_e, cin / k, k j)    decoder (kh_d, kw_d, k j, filters)

``LowRankConv``'s ``scheme`` (A.6) splits the kh x kw window between them:
0: kh x kw then 1 x 1; 1: 1 x kw then kh x 1; 2: kh x 1 then 1 x kw;
3: 1 x 1 then kh x kw. Along each axis the convolution that holds the window
gets the original stride and dilation and the other one stride 1, and both
use the original padding, so the output has the original shape and, at full
rank, the original values.

Grouped encoder on CPU: TensorFlow's CPU convolution runs grouped kernels
forward but has no gradient for them ("Gradients for grouped convolutions
are not supported on CPU"). A block-diagonal kernel would multiply the
encoder's work and its stored size by k, so the encoder instead splits the
input channels into k tensors, convolves each with its j filters and
concatenates: exactly the grouped convolution's arithmetic, with gradients
everywhere. The Dense layer does the same with one einsum.
"""

import numpy as np

from keras_psm import ops
from keras_psm.backend import register_serializable
from keras_psm.factorize.lowrank import SCHEMES, factor_kernel, split_kernel_size
from keras_psm.layers.base import (
    CompressedLayer,
    ConvOptions,
    common_options,
    conv_options,
    fitted_values,
    matmul_last_axis,
)
from keras_psm.validation import check_choice, check_int

#: Per scheme, whether the encoder holds the window along (height, width); the
#: decoder holds it along the other axes.
ENCODER_HOLDS = {0: (True, True), 1: (False, True), 2: (True, False), 3: (False, False)}


class DenseFactorsLayer(CompressedLayer):
    """A compressed layer whose factors are dense: every stored value is a parameter."""

    def count_nonzero_params(self):
        """All stored values (factors and bias): dense factors have no zeros to skip."""
        return int(self.count_params())


class DenseReplacement(DenseFactorsLayer):
    """A ``Dense`` replacement with dense factors: ``_apply`` maps (n, in) to
    (n, units); inputs of any rank >= 2 are accepted, like ``Dense``."""

    def call(self, inputs):
        inputs = ops.cast(inputs, self.compute_dtype)
        return self._finish(matmul_last_axis(inputs, self._apply))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.units,)


class ConvFactorsLayer(ConvOptions, DenseFactorsLayer):
    """A ``Conv2D`` replacement with dense factors.

    ``call`` implementations work in channels_last: ``_to_channels_last``
    transposes a channels_first input once and ``_from_channels_last``
    transposes the output back (TensorFlow's CPU convolutions run NHWC only).
    """


@register_serializable
class LowRankDense(DenseReplacement):
    """``Dense`` whose kernel is the rank-j product ``encoder @ decoder`` per input chunk.

    ``outputs = activation(concat_g(x_g @ E_g) @ decoder + bias)``, where x_g is
    the g-th of ``groups`` consecutive input chunks and E_g its (in / k, j)
    block of the encoder. With ``groups=1`` it is ``x @ encoder @ decoder``.

    Args:
        units: output size.
        rank: j, the rank of each chunk's factorization.
        groups: k, the number of input chunks (must divide the input size).
        activation, use_bias: as in ``Dense``.
    """

    def __init__(self, units, rank, groups=1, **kwargs):
        super().__init__(**kwargs)
        where = f"LowRankDense {self.name!r}"
        self.units = check_int(units, "units", minimum=1, where=where)
        self.rank = check_int(rank, "rank", minimum=1, where=where)
        self.groups = check_int(groups, "groups", minimum=1, where=where)

    def build(self, input_shape):
        where = f"LowRankDense {self.name!r}"
        in_dim = input_shape[-1]
        if in_dim is None or int(in_dim) % self.groups:
            raise ValueError(
                f"{where}: the last input dimension must be known and divisible by "
                f"`groups` = {self.groups}, got input shape {tuple(input_shape)}."
            )
        width = self.groups * self.rank
        self.encoder_kernel = self._add_weight(
            "encoder_kernel", (int(in_dim) // self.groups, width), "glorot_uniform")
        self.decoder_kernel = self._add_weight(
            "decoder_kernel", (width, self.units), "glorot_uniform")
        self._add_bias(self.units)
        self.built = True

    def _apply(self, inputs):
        encoder = ops.cast(self.encoder_kernel, inputs.dtype)
        decoder = ops.cast(self.decoder_kernel, inputs.dtype)
        if self.groups == 1:
            return ops.matmul(ops.matmul(inputs, encoder), decoder)
        chunk = encoder.shape[0]
        hidden = ops.einsum(
            "ngc,cgr->ngr",
            ops.reshape(inputs, (-1, self.groups, chunk)),
            ops.reshape(encoder, (chunk, self.groups, self.rank)),
        )
        return ops.matmul(ops.reshape(hidden, (-1, self.groups * self.rank)), decoder)

    @property
    def kernel(self):
        """The (in, units) kernel: block g of rows is ``E_g @ D_g``."""
        chunk = self.encoder_kernel.shape[0]
        encoder = ops.reshape(ops.cast(self.encoder_kernel, "float32"),
                             (chunk, self.groups, self.rank))
        decoder = ops.reshape(ops.cast(self.decoder_kernel, "float32"),
                             (self.groups, self.rank, self.units))
        return ops.reshape(ops.einsum("cgr,gro->gco", encoder, decoder),
                          (self.groups * chunk, self.units))

    def get_config(self):
        config = super().get_config()
        config.update(units=self.units, rank=self.rank, groups=self.groups)
        return config

    @classmethod
    def from_factors(cls, encoder, decoder, groups=1, bias=None, **kwargs):
        """A layer starting from fitted factors (``factor_kernel`` of a Dense kernel)."""
        width, units = np.shape(decoder)
        kwargs.setdefault("use_bias", bias is not None)
        return cls(
            units=units, rank=width // groups, groups=groups,
            initial_values=fitted_values(bias, encoder_kernel=encoder, decoder_kernel=decoder),
            **kwargs,
        )

    @classmethod
    def from_layer(cls, layer, rank, groups=1):
        """Factor a trained ``Dense`` by truncated SVD and return its replacement."""
        kernel, *bias = layer.get_weights()
        factors = factor_kernel(kernel, rank, groups)
        return cls.from_factors(factors.encoder, factors.decoder, groups,
                                bias[0] if bias else None, **common_options(layer))


@register_serializable
class LowRankConv(ConvFactorsLayer):
    """``Conv2D`` as a grouped encoder convolution followed by a decoder convolution.

    The encoder has ``groups`` = k groups of ``rank`` = j filters over
    consecutive chunks of cin / k input channels; the decoder maps the k j
    channels to ``filters``. ``scheme`` (0-3, ALDS+) sets the two windows,
    see the module docstring; ``strides``, ``padding``, ``dilation_rate``,
    ``data_format``, ``activation`` and ``use_bias`` are those of the
    replaced ``Conv2D``.
    """

    def __init__(self, filters, kernel_size, rank, groups=1, scheme=0, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        where = f"LowRankConv {self.name!r}"
        self.rank = check_int(rank, "rank", minimum=1, where=where)
        self.groups = check_int(groups, "groups", minimum=1, where=where)
        self.scheme = check_choice(scheme, "scheme", SCHEMES, where=where)
        self.encoder_size, self.decoder_size = split_kernel_size(self.kernel_size, self.scheme)
        encoder_holds = ENCODER_HOLDS[self.scheme]
        self._encoder_options = self._stage_options(encoder_holds)
        self._decoder_options = self._stage_options([not held for held in encoder_holds])

    def _stage_options(self, holds):
        """Strides and dilation of a stage holding the window along ``holds`` axes."""
        return dict(
            strides=tuple(s if held else 1 for s, held in zip(self.strides, holds)),
            dilation_rate=tuple(d if held else 1 for d, held in zip(self.dilation_rate, holds)),
        )

    def build(self, input_shape):
        channels = self._input_channels(input_shape)
        if channels % self.groups:
            raise ValueError(
                f"LowRankConv {self.name!r}: `groups` = {self.groups} must divide the "
                f"{channels} input channels."
            )
        self.in_channels = channels
        width = self.groups * self.rank
        self.encoder_kernel = self._add_weight(
            "encoder_kernel", self.encoder_size + (channels // self.groups, width),
            "glorot_uniform")
        self.decoder_kernel = self._add_weight(
            "decoder_kernel", self.decoder_size + (width, self.filters), "glorot_uniform")
        self._add_bias(self.filters)
        self.built = True

    def _encode(self, inputs):
        """The grouped encoder convolution, one ordinary convolution per chunk."""
        if self.groups == 1:
            return self._conv(inputs, self.encoder_kernel, **self._encoder_options)
        chunks = ops.split(inputs, self.groups, axis=-1)
        kernels = ops.split(self.encoder_kernel, self.groups, axis=-1)
        return ops.concatenate([
            self._conv(chunk, kernel, **self._encoder_options)
            for chunk, kernel in zip(chunks, kernels)
        ], axis=-1)

    def call(self, inputs):
        hidden = self._encode(self._to_channels_last(inputs))
        outputs = self._conv(hidden, self.decoder_kernel, **self._decoder_options)
        return self._from_channels_last(self._finish(outputs))

    @property
    def kernel(self):
        """The (kh, kw, cin, filters) kernel the two convolutions compose to."""
        (kh_e, kw_e), (kh_d, kw_d) = self.encoder_size, self.decoder_size
        chunk = self.in_channels // self.groups
        encoder = ops.reshape(ops.cast(self.encoder_kernel, "float32"),
                             (kh_e, kw_e, chunk, self.groups, self.rank))
        decoder = ops.reshape(ops.cast(self.decoder_kernel, "float32"),
                             (kh_d, kw_d, self.groups, self.rank, self.filters))
        kernel = ops.einsum("xycgr,uvgro->xuyvgco", encoder, decoder)
        return ops.reshape(kernel, self.kernel_size + (self.in_channels, self.filters))

    def get_config(self):
        config = super().get_config()
        config.update(rank=self.rank, groups=self.groups, scheme=self.scheme)
        return config

    @classmethod
    def from_factors(cls, encoder, decoder, groups=1, scheme=0, bias=None, **kwargs):
        """A layer starting from fitted factors (``factor_kernel`` of a Conv2D kernel)."""
        kh_e, kw_e, _, width = np.shape(encoder)
        kh_d, kw_d, _, filters = np.shape(decoder)
        kwargs.setdefault("use_bias", bias is not None)
        return cls(
            filters=filters, kernel_size=(kh_e * kh_d, kw_e * kw_d), rank=width // groups,
            groups=groups, scheme=scheme,
            initial_values=fitted_values(bias, encoder_kernel=encoder, decoder_kernel=decoder),
            **kwargs,
        )

    @classmethod
    def from_layer(cls, layer, rank, groups=1, scheme=0):
        """Factor a trained ``Conv2D`` by truncated SVD and return its replacement."""
        kernel, *bias = layer.get_weights()
        factors = factor_kernel(kernel, rank, groups, scheme)
        return cls.from_factors(factors.encoder, factors.decoder, groups, scheme,
                                bias[0] if bias else None,
                                **conv_options(layer), **common_options(layer))
