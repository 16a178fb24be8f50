"""The method registry: a method name -> how to fit and build its layers.

A compression method is four things:

- ``config_class``: a dataclass whose fields are the method's options. It
  validates them in ``__post_init__`` and raises ``ValueError``/``TypeError``
  naming the field and the allowed range.
- ``fit(kernel, config)``: a pure NumPy function from a trained kernel in
  Keras shape ((in, out) for Dense, (kh, kw, cin, cout) for Conv2D) to
  whatever ``build`` needs. It runs in worker processes when ``compress`` is
  given an executor, so it must be a module-level (picklable) function.
- ``build(layer, fitted, config)``: from the original Keras layer and the
  fit result to the new, unbuilt layer (same name, activation, bias, ...).
  ``layer`` is always a ``Dense`` or a ``Conv2D``: ``compress`` presents the
  other layers whose kernel is a matrix (EinsumDense and attention
  projections, separable pointwise kernels as Dense; Conv1D as Conv2D)
  through a stand-in holding the same kernel, bias and activation, and
  wraps the layer ``build`` returns (``keras_psm.layers.adapters``), so a
  method written for Dense and Conv2D covers them with no change.
- optionally ``allocate(kernels, config)``: a global step run before the
  per-layer fits, mapping each layer name to its own config (ALDS shares a
  parameter budget across layers this way).

For ``compress(..., calibration_data=X)``, a method whose fit minimizes
``||X (W - W_hat)||_F`` sets ``calibrated=True``: its ``fit`` then takes an
optional third argument, ``fit(kernel, config, covariance=None)``, the
layer's damped input covariance ``X^T X`` (``keras_psm.calibration``).
For ``target_ratio=``/``target_params=`` (``keras_psm.budget``), a method
declares ``size_knob(kernel_shape, config)``, ladders of per-layer configs
from small to large, or ``size_target(config, kept_fraction)``, its own
global target keeping that fraction of the kernels' values. With
``size_estimates(kernel, ladder, covariance, limit)`` a method prices a
ladder's candidates cheaply (``keras_psm.budget.Estimate``: an SVD's
singular values, one sort, a short palm4MSA) instead of fitting each in full.

``callbacks(model, config)``, when given, returns the callbacks ``model.fit``
needs for the compressed model (iterative pruning updates its masks from
one). ``presets`` holds example options at a small and a large parameter
budget, used by the demo and the benchmarks so a new method appears there
without editing them.

Registering a method makes it available to ``keras_psm.compress`` and to
the ``keras-psm`` command.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional

#: Layer kinds a method can replace: "dense" (Dense, EinsumDense, separable
#: pointwise kernels) and "conv2d" (Conv2D, Conv1D).
LAYER_KINDS = ("dense", "conv2d")


@dataclasses.dataclass(frozen=True)
class Method:
    """How one compression method fits and builds its layers."""

    name: str
    description: str
    config_class: type
    fit: Callable[[Any, Any], Any]
    build: Callable[[Any, Any, Any], Any]
    layer_kinds: tuple = LAYER_KINDS
    allocate: Optional[Callable[[Mapping[str, Any], Any], Mapping[str, Any]]] = None
    callbacks: Optional[Callable[[Any, Any], list]] = None
    calibrated: bool = False
    size_knob: Optional[Callable[[tuple, Any], list]] = None
    size_target: Optional[Callable[[Any, float], Any]] = None
    size_estimates: Optional[Callable[..., list]] = None
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    paper: str = ""

    def make_config(self, config=None, **options):
        """Return a validated config from an instance or from keyword options."""
        if config is not None:
            if options:
                raise TypeError(
                    f"method {self.name!r}: pass either `config` or keyword options, "
                    f"not both (got config and {sorted(options)})."
                )
            if not isinstance(config, self.config_class):
                raise TypeError(
                    f"method {self.name!r}: `config` must be a "
                    f"{self.config_class.__name__}, got {type(config).__name__}."
                )
            return config
        allowed = [f.name for f in dataclasses.fields(self.config_class)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(
                f"method {self.name!r} has no option(s) {unknown}; "
                f"its options are {allowed}."
            )
        return self.config_class(**options)


_METHODS = {}


def register_method(method):
    """Add ``method`` to the registry (its name must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered.")
    unknown = set(method.layer_kinds) - set(LAYER_KINDS)
    if unknown:
        raise ValueError(
            f"method {method.name!r}: unknown layer kinds {sorted(unknown)}; "
            f"allowed are {list(LAYER_KINDS)}."
        )
    _METHODS[method.name] = method
    return method


def get_method(name):
    """Return the registered method called ``name``."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(
            f"`method` must be one of {available_methods()}, got {name!r}."
        )
    return _METHODS[name]


def available_methods():
    """Names of the registered methods, in registration order."""
    return list(_METHODS)
