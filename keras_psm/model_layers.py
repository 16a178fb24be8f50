"""Walking the layers of functional and Sequential models, nested ones included."""

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
