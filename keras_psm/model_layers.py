"""Checking models and walking the layers of functional and Sequential models,
nested ones included."""

from keras_psm.backend import keras


def is_graph_model(layer):
    """True for functional and Sequential models: models whose graph of layers
    ``keras.models.clone_model`` can rebuild (a subclassed model is not one)."""
    return isinstance(layer, keras.Model) and (
        isinstance(layer, keras.Sequential)
        or getattr(layer, "_is_graph_network", False)
        or type(layer).__name__ == "Functional"
    )


def leaf_layers(model):
    """The layers of ``model``, descending into nested functional/Sequential models."""
    for layer in model.layers:
        if is_graph_model(layer):
            yield from leaf_layers(layer)
        else:
            yield layer


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
