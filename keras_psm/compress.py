"""``compress(model, method, ...)``: replace the layers whose kernel is a matrix
by fitted ones.

The model is rebuilt with ``keras_psm.model_layers.clone_replacing``:
selected layers are replaced by the method's layers, built from factors
fitted to their trained kernels; every other layer is cloned from its
config and given a copy of its weights, and operations are carried over.
Dense and Conv2D kernels go to the method as they are; EinsumDense
(attention projections included), Conv1D and separable pointwise kernels
through a stand-in Dense or Conv2D, and the method's layer is then wrapped
(``keras_psm.layers.adapters``). The input model is never modified.
"""

import time

import numpy as np
from tqdm.auto import tqdm

from keras_psm import budget as budgets
from keras_psm import ops
from keras_psm.backend import keras
from keras_psm.calibration import correct_biases, layer_covariances
from keras_psm.layers.adapters import (
    CompressedConv1D,
    CompressedEinsumDense,
    CompressedSeparableConv,
)
from keras_psm.layers.attention import PROJECTIONS, CompressedMultiHeadAttention
from keras_psm.layers.base import CompressedLayer
from keras_psm.methods import available_methods, get_method
from keras_psm.model_layers import check_graph_model, clone_replacing, leaf_layers
from keras_psm.report import COMPRESSED, SKIPPED, CompressionReport, LayerReport
from keras_psm.validation import check_choice, check_finite_array

#: Kind -> (its name, the layers a method of that kind replaces).
_KIND_NAMES = {"dense": ("Dense", "Dense, EinsumDense, SeparableConv pointwise kernels"),
               "conv2d": ("Conv2D", "Conv2D, Conv1D")}


def compress(model, method="psm", layers=None, *, config=None, executor=None,
             verbose=1, target_ratio=None, target_params=None, calibration_data=None,
             score_fn=None, **options):
    """Compress the layers of a trained model whose kernel is a matrix.

    Args:
        model: a built functional or Sequential Keras model (nested models
            inside it are compressed too). It is not modified.
        method: a registered method name (``keras_psm.available_methods()``):
            ``"psm"`` fits each kernel as a product of sparse factors with
            palm4MSA.
        layers: which layers to replace: ``None`` (every Dense, EinsumDense,
            Conv1D, Conv2D, separable and attention projection the method
            supports), a list of layer names (an attention projection is
            ``"<attention layer>/<projection>"``), or a predicate
            ``layer -> bool``.
        config: the method's config dataclass (e.g. ``PSMConfig``), instead of
            keyword ``options``.
        executor: an optional ``concurrent.futures.Executor`` (a process
            pool, or a Dask/Ray executor) to fit layers in parallel.
        verbose: 1 shows a progress bar per layer, 0 is silent.
        target_ratio, target_params: a parameter budget for the selected
            layers (nonzero parameters, biases included): their dense total
            divided by ``target_ratio``, or ``target_params``. The method's
            size knob is chosen per layer (``keras_psm.budget``): the
            method's options set everything else. Methods without a knob
            (butterfly) raise ValueError.
        calibration_data: inputs of the model (an array, one array per
            input, or a ``tf.data.Dataset``; a few hundred samples): fits
            minimize ``||X_l (W - W_hat)||_F`` over each layer's inputs
            ``X_l`` (``keras_psm.calibration``), for the methods that can
            (psm, psm-reinit, svd, hard-pruning); with a target, every
            method's allocation weighs errors by them.
        score_fn: with a target, an optional ``score_fn(model) -> float``
            (higher is better, e.g. held-out accuracy) that the allocation
            uses instead of layer errors. It costs ``1 + n_layers *
            score_candidates`` (4) calls, each on a model with one layer
            compressed (and refitted), besides the candidate fits.
        **options: the method's options, e.g. ``n_factors=3, sparsity=14``.

    Returns:
        ``(compressed_model, report)``. The compressed model is not compiled:
        compile it before ``fit``. ``report`` lists each layer's parameters
        before and after, its relative error ``||W - W_hat||_F / ||W||_F`` and
        fit seconds; ``report.callbacks`` holds the callbacks ``fit`` needs.
    """
    spec = get_method(method)
    config = spec.make_config(config, **options)
    check_choice(verbose, "verbose", (0, 1, 2, True, False))
    check_graph_model(model, "compress")

    candidates, skipped = _classify(model, spec)
    targets = _select(candidates, layers, model)
    presented = {name: _presented(layer) for name, layer in targets.items()}
    kernels = {
        name: check_finite_array(fitted_layer.get_weights()[0], "kernel",
                                 where=f"layer {name!r}")
        for name, (fitted_layer, _) in presented.items()
    }
    covariances, means = _covariances(model, spec, targets, calibration_data, target_ratio,
                                      target_params)
    budget = budgets.budget_params(target_ratio, target_params, targets, spec, score_fn)
    configs = None
    if budget is not None:
        stand_ins = {name: fitted_layer for name, (fitted_layer, _) in presented.items()}
        config, configs, fits = budgets.budgeted_fits(
            model, spec, stand_ins, kernels, config, budget,
            lambda *job: _fit_all(spec, *job[:2], executor, 0, job[2]),
            covariances=covariances, calibration_data=calibration_data, score_fn=score_fn,
            verbose=verbose,
        )
    knobs = {} if configs is None else {
        name: budgets.knob_label(configs[name], config) for name in configs}
    if configs is None:
        configs = (
            dict(spec.allocate(kernels, config)) if spec.allocate is not None
            else {name: config for name in targets}
        )
        fits = _fit_all(spec, kernels, configs, executor, verbose,
                        covariances if spec.calibrated else None)
        if spec.allocate is not None:
            knobs = {name: budgets.knob_label(configs[name], config) for name in configs}

    replaced = {}
    attention = []

    def replacement(name):
        fitted_layer, wrap = presented[name]
        replaced[name] = wrap(spec.build(fitted_layer, fits[name][0], configs[name]))
        return replaced[name]

    def replace(layer):
        if type(layer) is keras.layers.MultiHeadAttention:
            projections = {
                role: replacement(f"{layer.name}/{getattr(layer, attribute).name}")
                for role, attribute in PROJECTIONS.items()
                if f"{layer.name}/{getattr(layer, attribute).name}" in fits
            }
            if not projections:
                return None
            new_layer = CompressedMultiHeadAttention.replacing(layer, projections)
            attention.append((layer, new_layer))
            return new_layer
        return replacement(layer.name) if layer.name in fits else None

    compressed = clone_replacing(model, replace)
    for old, new in attention:
        new.copy_kept_projections(old)
    if spec.calibrated:
        correct_biases(replaced, kernels, means)

    report = CompressionReport(method=spec.name)
    for name, layer in _kernel_layers(model):
        before = int(layer.count_params())
        if name in replaced:
            new_layer = replaced[name]
            report.rows.append(LayerReport(
                name=name, layer_type=type(layer).__name__, method=spec.name,
                params_before=before, params_after=int(new_layer.count_nonzero_params()),
                relative_error=_relative_error(kernels[name], new_layer.kernel),
                seconds=fits[name][1], status=COMPRESSED, note=knobs.get(name, ""),
            ))
        elif name in skipped or (name in candidates and before):
            note = skipped.get(name, "not selected")
            report.rows.append(LayerReport(
                name=name, layer_type=type(layer).__name__, method=spec.name,
                params_before=before, params_after=before, status=SKIPPED, note=note,
            ))
    if spec.callbacks is not None:
        report.callbacks = list(spec.callbacks(compressed, config))
    if verbose:
        print(report)
        if budget is not None:
            print(_budget_line(report, budget))
    return compressed, report


#: Layer types whose kernel is fitted through a stand-in Dense or Conv2D, and
#: the wrapper that then takes their place (``keras_psm.layers.adapters``).
_WRAPPERS = {
    keras.layers.EinsumDense: CompressedEinsumDense,
    keras.layers.Conv1D: CompressedConv1D,
    keras.layers.SeparableConv1D: CompressedSeparableConv,
    keras.layers.SeparableConv2D: CompressedSeparableConv,
}

_NOT_MATRICES = {
    keras.layers.DepthwiseConv2D: "DepthwiseConv2D holds one small filter per channel, not "
                                  "a matrix",
    keras.layers.Conv2DTranspose: "Conv2DTranspose scatters each input position over a "
                                  "window of outputs, not one matrix per position",
}


def _covariances(model, spec, targets, calibration_data, target_ratio, target_params):
    """Damped input covariances and mean inputs of the selected layers (``{}`` without data)."""
    if calibration_data is None:
        return {}, {}
    if not spec.calibrated and target_ratio is None and target_params is None:
        calibrated = [name for name in available_methods() if get_method(name).calibrated]
        raise ValueError(
            f"method {spec.name!r} does not fit to calibration data; `calibration_data` "
            f"only weighs its layer errors when allocating a `target_ratio`/`target_params`. "
            f"Methods that fit to it: {calibrated}."
        )
    others = sorted(name for name, layer in targets.items()
                    if type(layer) not in (keras.layers.Dense, keras.layers.Conv2D))
    if others:
        raise ValueError(
            f"`calibration_data`: layers {others} are not Dense or Conv2D layers, whose "
            "inputs calibration collects; leave them out with `layers=[...]` or compress "
            "without calibration data."
        )
    return layer_covariances(model, targets, calibration_data)


def _budget_line(report, budget):
    before = sum(row.params_before for row in report.compressed)
    after = sum(row.params_after for row in report.compressed)
    return (f"budget {budget:,} parameters: compressed layers {before:,} -> {after:,} "
            f"(x{before / max(after, 1):.1f})")


def _layer_kind(layer):
    """``(kind, None)`` for a layer whose kernel a method can replace, where
    kind is ``"dense"`` (Dense, EinsumDense, the pointwise kernel of
    SeparableConv1D/2D) or ``"conv2d"`` (Conv2D, Conv1D), else ``(None, reason)``."""
    kind = type(layer)
    if isinstance(layer, (CompressedLayer, CompressedMultiHeadAttention)):
        return None, "already compressed"
    if getattr(layer, "quantization_mode", None):
        return None, f"quantized {kind.__name__}"
    if kind in (keras.layers.Dense, keras.layers.EinsumDense):
        if kind is keras.layers.EinsumDense and CompressedEinsumDense.matrix_dims(layer) is None:
            return None, (f"EinsumDense equation {layer.equation!r} does not contract the "
                          "trailing input axes into the trailing output axes")
        return "dense", None
    if kind in (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D):
        if layer.data_format == "channels_first":
            return None, (f"channels_first {kind.__name__} (its pointwise kernel is "
                          "compressed on channels_last inputs only)")
        return "dense", None
    if kind in (keras.layers.Conv2D, keras.layers.Conv1D):
        if getattr(layer, "groups", 1) != 1:
            return None, f"grouped convolution (groups={layer.groups})"
        return "conv2d", None
    if kind in _NOT_MATRICES:
        return None, _NOT_MATRICES[kind]
    return None, (f"{kind.__name__} is not a Dense, EinsumDense, Conv1D, Conv2D or "
                  "SeparableConv layer")


def _kernel_layers(model):
    """``(name, layer)`` for every layer of ``model`` (nested models included,
    each layer once) and, in place of a ``MultiHeadAttention``, its four projections, named
    ``"<attention layer>/<projection>"``."""
    seen = set()
    for layer in leaf_layers(model, wrapped=False):
        if id(layer) in seen:  # a layer shared by a nested model and its parent
            continue
        seen.add(id(layer))
        if type(layer) is keras.layers.MultiHeadAttention:
            for attribute in PROJECTIONS.values():
                projection = getattr(layer, attribute)
                yield f"{layer.name}/{projection.name}", projection
        else:
            yield layer.name, layer


def _classify(model, spec):
    """Split the layers with weights into replaceable candidates and skipped ones."""
    candidates, skipped = {}, {}
    for name, layer in _kernel_layers(model):
        kind, reason = _layer_kind(layer)
        if kind is not None and kind not in spec.layer_kinds:
            supported = " and ".join(_KIND_NAMES[k][0] for k in spec.layer_kinds)
            layer_types = "; ".join(_KIND_NAMES[k][1] for k in spec.layer_kinds)
            kind, reason = None, (f"method {spec.name!r} replaces {supported} layers only "
                                  f"({layer_types})")
        if kind is not None:
            if name in candidates:
                raise ValueError(
                    f"two layers are named {name!r} (in nested models); "
                    "give them distinct names before compressing."
                )
            candidates[name] = layer
        elif layer.weights:
            skipped[name] = reason
    return candidates, skipped


def _presented(layer):
    """The Dense or Conv2D whose kernel a method fits for ``layer`` (the layer
    itself, or a stand-in) and the function from the method's new layer to the
    layer that takes ``layer``'s place."""
    wrapper = _WRAPPERS.get(type(layer))
    if wrapper is None:
        return layer, lambda new_layer: new_layer
    return wrapper.stand_in(layer), lambda new_layer: wrapper.wrapping(layer, new_layer)


def _select(candidates, layers, model):
    """The candidate layers chosen by ``layers`` (None, names or a predicate)."""
    if layers is None:
        return dict(candidates)
    if callable(layers):
        return {name: layer for name, layer in candidates.items() if layers(layer)}
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, (list, tuple, set, frozenset)):
        raise TypeError(
            "`layers` must be None, a list of layer names or a predicate "
            f"layer -> bool, got {type(layers).__name__}."
        )
    known = dict(_kernel_layers(model))
    unknown = sorted(name for name in layers if name not in known)
    if unknown:
        raise ValueError(
            f"`layers` names {unknown}, which model {model.name!r} does not have; "
            f"its layers are {sorted(known)}."
        )
    for name in layers:
        if name not in candidates:
            _, reason = _layer_kind(known[name])
            raise ValueError(f"`layers`: layer {name!r} cannot be replaced: {reason}.")
    return {name: candidates[name] for name in layers}


def _timed_fit(fit, kernel, config, covariance=None):
    start = time.perf_counter()
    fitted = fit(kernel, config) if covariance is None else fit(kernel, config, covariance)
    return fitted, time.perf_counter() - start


def _fit_all(spec, kernels, configs, executor, verbose, covariances=None):
    """Fit every kernel, in parallel through ``executor`` when given.

    ``covariances`` (by the same keys) go to the calibrated fits.
    """
    covariances = covariances or {}
    futures = {} if executor is None else {
        name: executor.submit(_timed_fit, spec.fit, kernel, configs[name], covariances.get(name))
        for name, kernel in kernels.items()
    }
    results = {}
    with tqdm(total=len(kernels), desc=spec.name, unit="layer", disable=not verbose) as bar:
        for name, kernel in kernels.items():
            bar.set_postfix_str(name)
            try:
                results[name] = (
                    futures[name].result() if futures
                    else _timed_fit(spec.fit, kernel, configs[name], covariances.get(name))
                )
            except ValueError as error:
                layer_name = name[0] if isinstance(name, tuple) else name
                raise ValueError(f"layer {layer_name!r}: {error}") from error
            bar.update()
    return results


def _relative_error(kernel, approximation):
    """``||W - W_hat||_F / ||W||_F``, ``W_hat`` in the original layer's kernel shape."""
    approximation = np.asarray(ops.convert_to_numpy(approximation), dtype=np.float64)
    approximation = approximation.reshape(kernel.shape)
    return float(np.linalg.norm(kernel - approximation) / max(np.linalg.norm(kernel), 1e-300))
