"""Checking models, walking their layers and cloning them with some layers replaced.

Functional and Sequential models (nested ones included) are walked and
cloned here; every other module that rebuilds a model goes through
``clone_replacing``.
"""

from keras_psm.backend import keras


def is_graph_model(layer):
    """True for functional and Sequential models: models whose graph of layers
    ``keras.models.clone_model`` can rebuild (a subclassed model is not one)."""
    return isinstance(layer, keras.Model) and (
        isinstance(layer, keras.Sequential)
        or getattr(layer, "_is_graph_network", False)
        or type(layer).__name__ == "Functional"
    )


def leaf_layers(model, wrapped=True):
    """The layers of ``model``, descending into nested functional/Sequential models.

    With ``wrapped`` (the default) each layer is followed by the layers it
    wraps (``layer.wrapped_layers``: the compressed layer inside a
    ``CompressedConv1D`` or ``CompressedEinsumDense``, the projections of a
    ``CompressedMultiHeadAttention``), so a walk for sparse factors finds
    them wherever they sit.
    """
    for layer in model.layers:
        if is_graph_model(layer):
            yield from leaf_layers(layer, wrapped)
            continue
        yield layer
        if wrapped:
            yield from _wrapped(layer)


def _wrapped(layer):
    for inner in getattr(layer, "wrapped_layers", ()):
        yield inner
        yield from _wrapped(inner)


def is_operation(layer):
    """True for a graph node that is not a layer: a Keras 3 operation such as
    the ``Add`` that ``x + y`` creates, or ``keras.ops.*`` applied to a tensor."""
    return not isinstance(layer, keras.layers.Layer)


def clone_replacing(model, replace):
    """A copy of ``model`` in which ``replace`` chooses new layers.

    ``replace(layer)`` is called once for each layer of the graph (nested
    models are descended into, never passed): it returns the new layer, or
    None to keep a copy of ``layer`` (rebuilt from its config, with a copy
    of its weights). Operations that are not layers (Keras 3 ``x + y`` and
    ``keras.ops`` nodes) are rebuilt from their config, as Keras's own
    ``clone_model`` does; tf_keras's ``TFOpLambda`` is a layer without
    weights and is copied. A layer shared by several nodes, in one model or
    across nested ones, stays one shared layer. ``model`` is not modified.
    """
    clones = {}
    copies = []

    def clone_function(layer):
        if id(layer) in clones:
            return clones[id(layer)]
        if is_graph_model(layer):
            new_layer = keras.models.clone_model(layer, clone_function=clone_function)
        elif is_operation(layer):
            new_layer = type(layer).from_config(layer.get_config())
        else:
            new_layer = replace(layer)
            if new_layer is None:
                new_layer = type(layer).from_config(layer.get_config())
                copies.append((layer, new_layer))
        clones[id(layer)] = new_layer
        return new_layer

    cloned = keras.models.clone_model(model, clone_function=clone_function)
    for old, new in copies:
        new.set_weights(old.get_weights())
    return cloned


def check_graph_model(model, purpose):
    """Raise unless ``model`` is a built functional or Sequential Keras model.

    ``purpose`` names the caller in the messages (``"compress"``, ``"export"``).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a Keras model ({keras.__name__}.Model), got "
            f"{type(model).__name__}. keras_psm runs on {keras.__name__}; set or "
            "unset TF_USE_LEGACY_KERAS to match the Keras that built the model."
        )
    if not is_graph_model(model):
        raise ValueError(
            f"`model` {model.name!r} is a subclassed model ({type(model).__name__}); "
            f"{purpose} needs a functional or Sequential model, whose graph of "
            "layers can be cloned. Rebuild it with the functional API."
        )
    if not model.built or not model.weights:
        raise ValueError(
            f"`model` {model.name!r} has no weights yet: build or train it first."
        )
