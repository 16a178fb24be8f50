"""Distillation from the original model and the paper's learning-rate pick."""

import numpy as np
import pytest

import keras_psm
from keras_psm import demo, ops
from keras_psm.backend import keras
from keras_psm.distill import Distiller, output_kind
from keras_psm.learning_rate import best_rate, pick_learning_rate


def softened(logits, temperature):
    z = logits / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def mean_correlation(a, b):
    """Mean over rows of the Pearson correlation of a's and b's rows (np.corrcoef)."""
    return np.mean([np.corrcoef(row_a, row_b)[0, 1] for row_a, row_b in zip(a, b)])


def reference_loss(teacher_logits, student_logits, student_probabilities, y, temperature,
                   alpha, objective):
    """NumPy float64: cross-entropy + alpha * T^2 * D(p_t^T, p_s^T), batch means; D is
    KL(p_t || p_s) or DIST's (1 - correlation per sample) + (1 - correlation per class)."""
    task = -np.mean(np.log(student_probabilities[np.arange(len(y)), y]))
    p_t, p_s = softened(teacher_logits, temperature), softened(student_logits, temperature)
    if objective == "kl":
        distance = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1))
    else:
        distance = (1 - mean_correlation(p_s, p_t)) + (1 - mean_correlation(p_s.T, p_t.T))
    return task + alpha * temperature ** 2 * distance


def logits_lenet(seed):
    """The demo's LeNet-5 with a linear last layer (it outputs logits)."""
    model = demo.lenet5(seed=seed)
    outputs = keras.layers.Dense(10, name="logits")(model.get_layer("fc2").output)
    return keras.Model(model.inputs, outputs)


@pytest.mark.parametrize("objective", ["correlation", "kl"])
@pytest.mark.parametrize("outputs", ["probabilities", "logits"])
def test_loss_matches_numpy(outputs, objective):
    rng = np.random.default_rng(0)
    x = rng.random((16, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 16)
    make = demo.lenet5 if outputs == "probabilities" else logits_lenet
    teacher, student = make(seed=1), make(seed=2)
    distiller = Distiller(student, teacher, temperature=3.0, alpha=0.5, objective=objective)
    assert (distiller.student_outputs, distiller.teacher_outputs) == (outputs, outputs)
    loss_name = ("sparse_categorical_crossentropy" if outputs == "probabilities" else
                 keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    distiller.compile("adam", loss_name)
    x_tensor, y_tensor = ops.convert_to_tensor(x), ops.convert_to_tensor(y)
    loss = float(ops.convert_to_numpy(
        distiller.compute_loss(x_tensor, y_tensor, distiller(x_tensor), None)))

    t_out = ops.convert_to_numpy(teacher(x)).astype(np.float64)
    s_out = ops.convert_to_numpy(student(x)).astype(np.float64)
    if outputs == "probabilities":
        expected = reference_loss(np.log(t_out), np.log(s_out), s_out, y, 3.0, 0.5, objective)
    else:
        expected = reference_loss(t_out, s_out, softened(s_out, 1.0), y, 3.0, 0.5, objective)
    # float32 softmax, logarithms and means over 16 x 10 values: ~1e-6 relative.
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_arguments_are_validated(trained_lenet):
    student = demo.lenet5(seed=3)
    with pytest.raises(ValueError, match="temperature"):
        Distiller(student, trained_lenet, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        Distiller(student, trained_lenet, alpha=-1.0)
    with pytest.raises(ValueError, match="outputs"):
        Distiller(student, trained_lenet, outputs="scores")
    with pytest.raises(ValueError, match="`objective` must be one of 'correlation', 'kl'"):
        Distiller(student, trained_lenet, objective="mse")
    with pytest.raises(TypeError, match="teacher"):
        Distiller(student, "lenet.keras")
    with pytest.raises(ValueError, match="`distill_epochs` must be >= 1, got 0"):
        Distiller(student, trained_lenet, distill_epochs=0)
    with pytest.raises(TypeError, match="`distill_epochs` must be an integer"):
        Distiller(student, trained_lenet, distill_epochs=1.5)
    other = demo.lenet5(n_classes=5)
    with pytest.raises(ValueError, match="output shape"):
        Distiller(other, trained_lenet)


def test_correlation_of_a_one_sample_batch_trains():
    """A batch of one sample has no spread over the batch: its per-class correlation is 0
    (not 0 / 0), so the loss and the updated weights stay finite."""
    rng = np.random.default_rng(0)
    x = rng.random((2, 28, 28, 1)).astype("float32")
    y = np.array([3, 7])
    student = demo.lenet5(seed=2)
    distiller = Distiller(student, demo.lenet5(seed=1))
    distiller.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    history = distiller.fit(x, y, batch_size=1, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(weight).all() for weight in student.get_weights())


def test_distillation_stops_after_distill_epochs(trained_lenet):
    """Plain SGD keeps no state between fits, so one fit of 2 epochs that distils in the
    first is two fits: 1 epoch distilled, then 1 on the labels alone."""
    rng = np.random.default_rng(0)
    x = rng.random((64, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 64)

    def fitted(epochs, distill_epochs, then_labels=0):
        student = demo.lenet5(seed=2)
        distiller = Distiller(student, trained_lenet, alpha=0.5, distill_epochs=distill_epochs)
        for model, n in ((distiller, epochs), (student, then_labels)):
            if n:
                model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
                model.fit(x, y, batch_size=32, epochs=n, shuffle=False, verbose=0)
        return student.get_weights(), distiller

    stopped, distiller = fitted(2, distill_epochs=1)
    in_two_fits, _ = fitted(1, distill_epochs=None, then_labels=1)
    distilled_throughout, _ = fitted(2, distill_epochs=None)
    # The same float32 steps in other compiled graphs: ~1e-6 relative after 4 steps.
    for a, b in zip(stopped, in_two_fits):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(stopped, distilled_throughout)) > 1e-3
    # After fit the weight is alpha again: the next fit distils in its first epoch.
    assert float(ops.convert_to_numpy(distiller.distillation_weight)) == 0.5


def test_output_kind_is_detected():
    assert output_kind(demo.lenet5()) == "probabilities"
    assert output_kind(logits_lenet(0)) == "logits"
    model = logits_lenet(0)
    with_layer = keras.Model(model.inputs, keras.layers.Softmax()(model.outputs[0]))
    assert output_kind(with_layer) == "probabilities"


@pytest.mark.slow
def test_fits_with_iterative_pruning_and_round_trips(trained_lenet, mnist_small, tmp_path):
    (x, y), (x_test, y_test) = mnist_small
    teacher_weights = [w.copy() for w in trained_lenet.get_weights()]
    student, report = keras_psm.compress(trained_lenet, "iterative-pruning",
                                         target_sparsity=0.8, end_step=20, frequency=5,
                                         verbose=0)
    distiller = Distiller(student, trained_lenet, temperature=4.0, alpha=1.0)
    assert len(distiller.trainable_variables) == len(student.trainable_variables)
    distiller.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    history = distiller.fit(x, y, epochs=1, batch_size=32, callbacks=report.callbacks,
                            verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # The pruning callbacks pruned the student through the Distiller: 80% of each kernel.
    fc1 = student.get_layer("fc1")
    assert fc1.count_nonzero_params() < 0.25 * trained_lenet.get_layer("fc1").count_params()
    # The teacher is neither trained nor changed.
    for before, after in zip(teacher_weights, trained_lenet.get_weights()):
        np.testing.assert_array_equal(before, after)
    agreement = np.mean(np.argmax(student.predict(x_test, verbose=0), -1)
                        == np.argmax(trained_lenet.predict(x_test, verbose=0), -1))
    assert agreement > 0.3  # it follows its teacher (chance: 0.1) after one epoch at 80% pruned
    student.save(tmp_path / "student.keras")
    reloaded = keras.models.load_model(tmp_path / "student.keras")
    # Same weights; kernels may differ per graph: float32 rounding far below 1e-5.
    np.testing.assert_allclose(reloaded.predict(x_test[:16], verbose=0),
                               student.predict(x_test[:16], verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_trains_under_mixed_float16(trained_lenet, mnist_small):
    (x, y), _ = mnist_small
    student, _ = keras_psm.compress(trained_lenet, "psm", n_factors=2, sparsity=4,
                                    max_iter=10, verbose=0)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        distiller = Distiller(student, trained_lenet)
        distiller.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        history = distiller.fit(x[:256], y[:256], epochs=2, batch_size=32, verbose=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    loss = history.history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]


def test_learning_rate_pick_finds_the_known_best():
    """Least squares w * c ~ c from w = 0 with SGD: each step multiplies w - 1 by
    1 - 2 lr c^2, so after n steps the loss is c^2 (1 - 2 lr c^2)^(2n). With
    c^2 = 6000, 1e-3 diverges (factor -11), 1e-5 is slow (0.88) and 1e-4 best (-0.2)."""
    c, steps, batch_size = np.sqrt(6000.0), 3, 4
    x = np.full((steps * batch_size, 1), c, dtype="float32")
    model = keras.Sequential([keras.Input((1,)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    pick = pick_learning_rate(model, x, x, "mse", optimizer=keras.optimizers.SGD, steps=steps,
                              batch_size=batch_size, validation_data=(x[:4], x[:4]), by="loss")
    assert pick.learning_rate == 1e-4
    for rate, (loss,) in pick.scores.items():
        # float32 updates: at 1e-4, w - 1 shrinks to 8e-3, so w's rounding (6e-8) is ~1e-5
        # of it, doubled by the square (measured 3.3e-5); the rates' losses differ by
        # orders of magnitude.
        np.testing.assert_allclose(loss, c ** 2 * (1 - 2 * rate * c ** 2) ** (2 * steps),
                                   rtol=3e-4)
    np.testing.assert_array_equal(model.get_weights()[0], [[0.0]])  # starting weights back


def test_learning_rate_pick_ties_within_a_standard_error_go_to_the_highest_rate():
    # Scores measured on a VGG-style CNN whose start is at chance (400 held-out
    # samples): every rate is still at chance after the steps, and the loss
    # differs by 4e-5 relative; the highest rate is the one that later trains it.
    assert best_rate({1e-3: (0.9, 25.888), 1e-4: (0.9, 25.887), 1e-5: (0.9, 25.887)},
                     400) == 1e-3
    # Lowest error 0.1 on 100 samples: one standard error is 0.03, so 0.12 ties
    # and 0.14 does not, whatever the losses.
    assert best_rate({1e-3: (0.12, 9.0), 1e-4: (0.1, 1.0), 1e-5: (0.11, 0.5)}, 100) == 1e-3
    assert best_rate({1e-3: (0.14, 0.1), 1e-4: (0.1, 1.0), 1e-5: (0.11, 0.5)}, 100) == 1e-4
    # A perfect score has no spread: only equal errors tie.
    assert best_rate({1e-3: (0.01, 0.1), 1e-4: (0.0, 1.0)}, 100) == 1e-4
    # A diverged rate (loss not finite) is never kept, even with the lowest error.
    assert best_rate({1e-3: (0.05, float("nan")), 1e-4: (0.3, 1.0)}, 100) == 1e-4
    assert best_rate({1e-3: (float("inf"),), 1e-4: (2.0,), 1e-5: (1.0,)}, 100) == 1e-5
    with pytest.raises(ValueError, match="not finite .*lower learning rates"):
        best_rate({1e-3: (0.9, float("nan")), 1e-4: (0.9, float("inf"))}, 100)


def test_learning_rate_pick_validates():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    x = np.zeros((10, 1), "float32")
    with pytest.raises(ValueError, match="by"):
        pick_learning_rate(model, x, x, "mse", by="accuracy")
    with pytest.raises(ValueError, match="candidates"):
        pick_learning_rate(model, x, x, "mse", candidates=(1e-3, -1.0))
    with pytest.raises(ValueError, match="validation_fraction"):
        pick_learning_rate(model, x, x, "mse", validation_fraction=0.01)
