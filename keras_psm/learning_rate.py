"""The PSM paper's learning-rate pick: the best of a few rates after a few steps.

PSM paper, section 3.1: "for each compression method and configuration, the
best learning rate is chosen using the classification error on a validation
sample after 10 iterations, with learning rate values in {1e-3, 1e-4, 1e-5}".
``pick_learning_rate`` does that for any compiled-and-fitted Keras model (a
compressed model, a ``Distiller``): from the same starting weights, each rate
trains ``steps`` batches, the held-out split is scored, the weights are put
back, and ``best_rate`` keeps the rate with the lowest error.

Two choices the paper leaves open make the pick hold for models that start
near chance or start dense and are pruned as they train:

- 30 steps by default, not 10: after 10 steps a model that starts near chance
  is least disturbed by the lowest rate, which then barely moves it in the
  whole fine-tuning (LeNet-5, TT R=6: 1e-5 picked, 0.223 after 3 epochs;
  1e-3 gives 0.920). ``steps=PAPER_STEPS`` is the paper's.
- Errors within one standard error of the lowest, ``sqrt(e (1 - e) / n)``
  on ``n`` held-out samples, are a tie, and the highest of the tied rates
  wins: the held-out sample cannot tell them apart, and at equal error the
  higher rate goes further in the many steps that follow. (Breaking ties by
  the loss sent a VGG-style CNN pruned to 95% to 1e-4 or 1e-5, where it
  stays at chance.)

    pick = keras_psm.pick_learning_rate(small, x_train, y_train,
                                        "sparse_categorical_crossentropy")
    small.compile(keras.optimizers.Adam(pick.learning_rate), ...)
"""

import dataclasses

import numpy as np

from keras_psm.backend import keras
from keras_psm.validation import check_choice, check_float, check_int

#: The rates the PSM paper tries.
PAPER_LEARNING_RATES = (1e-3, 1e-4, 1e-5)

#: The paper's number of training iterations before the rates are compared.
PAPER_STEPS = 10

#: ``pick_learning_rate``'s default number of steps (see the module docstring).
DEFAULT_STEPS = 30


@dataclasses.dataclass(frozen=True)
class LearningRatePick:
    """The chosen ``learning_rate`` and, for each rate tried, its validation ``scores``.

    ``scores[rate]`` is ``(error, loss)`` with ``by="error"`` (error = 1 -
    accuracy), ``(loss,)`` with ``by="loss"``, on the held-out samples; lower
    is better.
    """

    learning_rate: float
    scores: dict


def pick_learning_rate(model, x, y, loss, *, optimizer=keras.optimizers.Adam,
                       candidates=PAPER_LEARNING_RATES, steps=DEFAULT_STEPS, batch_size=32,
                       validation_fraction=0.1, validation_data=None, by="error",
                       callbacks=(), seed=0):
    """Try each rate of ``candidates`` for ``steps`` batches; keep the best on held-out data.

    Args:
        model: a built Keras model (a ``Distiller`` too). It is compiled and
            trained here, and given back with its starting weights; compile it
            again with the chosen rate to fine-tune.
        x, y: training data (arrays). Without ``validation_data``, the last
            ``validation_fraction`` of them is held out (as Keras's
            ``validation_split``) and the steps train on the rest.
        loss: the loss ``model.compile`` takes.
        optimizer: called as ``optimizer(learning_rate=rate)`` for each rate.
        candidates: the rates to try (default: the paper's 1e-3, 1e-4, 1e-5).
        steps: training batches per rate (the paper: 10, ``PAPER_STEPS``).
        batch_size: samples per batch.
        validation_data: ``(x_val, y_val)`` to score on instead of a split.
        by: ``"error"`` (classification error, the paper's criterion; see
            ``keras_psm.learning_rate.best_rate`` for ties) or ``"loss"``.
        callbacks: passed to ``fit`` (``report.callbacks`` of iterative pruning).
        seed: seeds each rate's run, so that all rates see the same batches.

    Returns:
        A ``LearningRatePick``.

    Raises:
        ValueError: if the loss is not finite after ``steps`` at every rate.
    """
    where = "pick_learning_rate"
    candidates = tuple(check_float(rate, "candidates", minimum=0.0, exclusive_minimum=True,
                                   where=where) for rate in candidates)
    if not candidates:
        raise ValueError(f"{where}: `candidates` must hold at least one learning rate.")
    check_int(steps, "steps", minimum=1, where=where)
    check_int(batch_size, "batch_size", minimum=1, where=where)
    check_choice(by, "by", ("error", "loss"), where=where)
    if validation_data is None:
        check_float(validation_fraction, "validation_fraction", minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, where=where)
        held_out = int(round(len(x) * validation_fraction))
        if not 1 <= held_out < len(x):
            raise ValueError(f"{where}: `validation_fraction` {validation_fraction} of "
                             f"{len(x)} samples leaves no training or no validation sample.")
        x, x_val = x[:len(x) - held_out], x[len(x) - held_out:]
        y, y_val = y[:len(y) - held_out], y[len(y) - held_out:]
    else:
        x_val, y_val = validation_data
    x, y = x[:steps * batch_size], y[:steps * batch_size]

    start = model.get_weights()
    scores = {}
    for rate in candidates:
        keras.utils.set_random_seed(seed)
        # Eagerly: tracing a training step costs more than running a few.
        model.compile(optimizer=optimizer(learning_rate=rate), loss=loss,
                      metrics=["accuracy"] if by == "error" else None, run_eagerly=True)
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False,
                  callbacks=list(callbacks), verbose=0)
        evaluated = np.atleast_1d(model.evaluate(x_val, y_val, batch_size=batch_size,
                                                 verbose=0))
        scores[rate] = ((1.0 - float(evaluated[1]), float(evaluated[0])) if by == "error"
                        else (float(evaluated[0]),))
        model.set_weights(start)
    return LearningRatePick(best_rate(scores, len(x_val)), scores)


def best_rate(scores, n_held_out):
    """The rate ``pick_learning_rate`` keeps, from its ``scores`` on ``n_held_out`` samples.

    Rates whose loss is not finite diverged and are left out. With ``(loss,)``
    scores the lowest loss wins. With ``(error, loss)`` scores, every rate
    whose error is within one binomial standard error of the lowest error
    ``e``, ``e + sqrt(e (1 - e) / n_held_out)``, ties, and the highest of them
    wins.
    """
    finite = {rate: score for rate, score in scores.items() if np.isfinite(score[-1])}
    if not finite:
        raise ValueError(
            f"pick_learning_rate: the loss is not finite at any of the `candidates` "
            f"{sorted(scores)}; try lower learning rates.")
    if len(next(iter(finite.values()))) == 1:
        return min(finite, key=lambda rate: finite[rate][0])
    lowest = min(error for error, _ in finite.values())
    tied = lowest + np.sqrt(lowest * (1.0 - lowest) / n_held_out)
    return max(rate for rate, (error, _) in finite.items() if error <= tied)
