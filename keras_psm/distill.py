"""Fine-tuning that learns from the original model: knowledge distillation.

A compressed model (the student) is fine-tuned against the outputs of the
model it came from (the teacher). With ``z_s``, ``z_t`` the two models'
logits and ``p^T = softmax(z / T)`` row by row, the loss is

    loss = task_loss(y, student(x)) + alpha * T^2 * D(p_t^T, p_s^T)

with one of two distances ``D`` (``objective``):

- ``"kl"`` (default; Hinton et al. 2015, "Distilling the Knowledge in a
  Neural Network"): ``KL(p_t || p_s) = sum_c p_t,c (log p_t,c - log p_s,c)``,
  averaged over the batch;
- ``"correlation"`` (DIST, Huang et al. 2022, "Knowledge Distillation from A
  Stronger Teacher", section 3.3): one minus the Pearson correlation of the
  two models' probabilities, over the classes of each sample (the
  inter-class relation) plus over the samples of a batch for each class
  (the intra-class relation),

      D = (1 - mean_i rho(p_s[i, :], p_t[i, :])) + (1 - mean_c rho(p_s[:, c], p_t[:, c])).

A correlation asks the student to rank and relate the classes as the
teacher does, not to reproduce its exact probabilities: a student that
starts close to its teacher but cannot match its probabilities, such as a
calibrated compression at a fortieth of the teacher's weights, gains from it
where the KL divergence costs it accuracy. A student whose outputs start
near chance can fail to train with it, so the KL divergence is the default.

``T^2`` keeps the soft term's gradient on the scale of the task loss's as
``T`` changes (Hinton et al., section 2). With ``distill_epochs=E`` the
soft term counts only in the first ``E`` epochs of each ``fit``, and the
student trains on the task loss alone after them: early-stopped distillation
(Cho & Hariharan 2019, "On the Efficacy of Knowledge Distillation",
section 5), for a student that the teacher's outputs would otherwise hold
back once it has learnt what they teach. The teacher only runs forward
(``training=False``); its weights are never trained nor changed.

    distiller = keras_psm.Distiller(small, model, temperature=4.0, alpha=1.0)
    distiller.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    distiller.fit(x_train, y_train, epochs=5, callbacks=report.callbacks)
    small.save("small.keras")          # the student: the Distiller is a training wrapper

The loss is written with :mod:`keras_psm.ops` in ``compute_loss``, so the
Distiller trains on every Keras 3 backend and on tf_keras with ``fit``'s own
training step (mixed precision loss scaling, callbacks, distribution).
"""

from keras_psm import ops
from keras_psm.backend import LEGACY_KERAS, keras
from keras_psm.validation import check_choice, check_float, check_int

#: What a model's output can be: class probabilities (a softmax output layer,
#: like the demo's LeNet-5) or logits.
OUTPUT_KINDS = ("probabilities", "logits")

#: Added under the square root of a correlation's denominator: a batch of one
#: sample has no spread over the samples, and its correlation is then 0
#: rather than 0 / 0.
CORRELATION_EPSILON = 1e-24

#: Probabilities are floored here before their logarithm: float32 softmax
#: outputs underflow to exactly 0 for very unlikely classes.
PROBABILITY_FLOOR = 1e-7


def output_kind(model):
    """``"probabilities"`` if ``model`` ends in a softmax, else ``"logits"``.

    A softmax is recognised as the ``activation`` of the output layer (Dense,
    Conv2D and keras_psm's compressed layers) or as a ``Softmax`` layer or an
    ``Activation("softmax")`` layer. Anything else is taken for logits; pass
    ``outputs=`` to the Distiller to say otherwise.
    """
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return "probabilities"
    activation = getattr(last, "activation", None)
    name = getattr(activation, "__name__", "")
    return "probabilities" if name == "softmax" else "logits"


def as_logits(outputs, kind):
    """Outputs as float32 logits: ``log p`` for probabilities (softmax-equivalent logits)."""
    outputs = ops.cast(outputs, "float32")
    if kind == "probabilities":
        return ops.log(ops.maximum(outputs, PROBABILITY_FLOOR))
    return outputs


def kl_loss(teacher_logits, student_logits, temperature):
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`` over the last axis, batch mean."""
    log_p_teacher = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_p_student = ops.log_softmax(student_logits / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return temperature ** 2 * ops.mean(kl)


def correlation_loss(teacher_logits, student_logits, temperature):
    """DIST's ``T^2 * ((1 - mean_i rho_i) + (1 - mean_c rho_c))`` for a ``(batch, classes)``
    pair: Pearson correlations of the softened probabilities per sample and per class."""
    p_teacher = ops.softmax(teacher_logits / temperature, axis=-1)
    p_student = ops.softmax(student_logits / temperature, axis=-1)
    inter = 1.0 - ops.mean(_pearson(p_student, p_teacher, axis=-1))
    intra = 1.0 - ops.mean(_pearson(p_student, p_teacher, axis=0))
    return temperature ** 2 * (inter + intra)


def _pearson(a, b, axis):
    """Pearson correlation of ``a`` and ``b`` along ``axis``."""
    a = a - ops.mean(a, axis=axis, keepdims=True)
    b = b - ops.mean(b, axis=axis, keepdims=True)
    spread = ops.sum(a * a, axis=axis) * ops.sum(b * b, axis=axis)
    return ops.sum(a * b, axis=axis) / ops.sqrt(spread + CORRELATION_EPSILON)


def describe(objective, temperature, alpha, distill_epochs=None):
    """The settings of a distillation as text: ``"kl, T=4, alpha=1"``, and
    ``", in the first E epoch(s)"`` after it with ``distill_epochs=E``."""
    text = f"{objective}, T={temperature:g}, alpha={alpha:g}"
    return text + (f", in the first {distill_epochs} epoch(s)" if distill_epochs else "")


#: The distances ``D`` the Distiller can compare the softened outputs with, by name.
DISTANCES = {"correlation": correlation_loss, "kl": kl_loss}
OBJECTIVES = tuple(DISTANCES)


class Distiller(keras.Model):
    """Trains ``student`` on its task loss plus a distillation term from ``teacher``.

    ``Distiller(x)`` is ``student(x)``; ``compile`` and ``fit`` as usual (the
    compiled loss and metrics apply to the student's outputs). Only the
    student's weights are trained; the teacher is neither trained nor changed
    (its weights count as the Distiller's non-trainable state). Save
    ``distiller.student``.

    Args:
        student: the model to train (a compressed copy of ``teacher``), one output.
        teacher: the trained model whose outputs the student learns; same
            input and output shapes as ``student``.
        temperature: T > 0, softens both distributions; 1 leaves them as they are.
        alpha: weight >= 0 of the distillation term added to the task loss;
            0 is plain fine-tuning.
        outputs: ``"probabilities"`` or ``"logits"``, what both models output;
            None (default) detects it for each model (``output_kind``).
        objective: ``"kl"`` (Hinton et al., the default) or ``"correlation"``
            (DIST), the distance between the softened outputs.
        distill_epochs: the distillation term counts in the first
            ``distill_epochs`` epochs of each ``fit`` and the task loss alone
            in the epochs after them; None (default): in every epoch.
    """

    def __init__(self, student, teacher, temperature=4.0, alpha=1.0, outputs=None,
                 objective="kl", distill_epochs=None, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{student.name}_distiller"), **kwargs)
        where = "Distiller"
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise TypeError(f"{where}: `{role}` must be a Keras model, "
                                f"got {type(model).__name__}.")
            if len(model.outputs or ()) != 1:
                raise ValueError(f"{where}: `{role}` must have exactly one output, "
                                 f"{model.name!r} has {len(model.outputs or ())}.")
        if tuple(student.outputs[0].shape[1:]) != tuple(teacher.outputs[0].shape[1:]):
            raise ValueError(
                f"{where}: `student` and `teacher` must have the same output shape, got "
                f"{tuple(student.outputs[0].shape)} and {tuple(teacher.outputs[0].shape)}.")
        self.temperature = check_float(temperature, "temperature", minimum=0.0,
                                       exclusive_minimum=True, where=where)
        self.alpha = check_float(alpha, "alpha", minimum=0.0, where=where)
        self.objective = check_choice(objective, "objective", OBJECTIVES, where=where)
        self.distill_epochs = check_int(distill_epochs, "distill_epochs", minimum=1,
                                        where=where, allow_none=True)
        if outputs is not None:
            check_choice(outputs, "outputs", OUTPUT_KINDS, where=where)
        self.student_outputs = outputs or output_kind(student)
        self.teacher_outputs = outputs or output_kind(teacher)
        self.student = student
        self.teacher = teacher
        # alpha, or 0 after distill_epochs: a variable, so that the compiled
        # training step reads the value the epoch sets (_DistillFor).
        self.distillation_weight = self.add_weight(
            name="distillation_weight", shape=(), dtype="float32", trainable=False,
            initializer=keras.initializers.Constant(self.alpha))

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled (task) loss plus ``alpha * T^2 * D`` against the teacher."""
        if LEGACY_KERAS:  # tf_keras's compute_loss has no ``training``
            task = super().compute_loss(x, y, y_pred, sample_weight)
        else:
            task = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if self.alpha == 0.0:
            return task
        teacher = ops.stop_gradient(
            as_logits(self.teacher(x, training=False), self.teacher_outputs))
        student = as_logits(y_pred, self.student_outputs)
        soft = DISTANCES[self.objective](teacher, student, self.temperature)
        return task + ops.cast(self.distillation_weight * soft, task.dtype)

    def fit(self, *args, callbacks=None, **kwargs):
        """``keras.Model.fit``, which stops the distillation after ``distill_epochs``."""
        if self.distill_epochs is not None:
            callbacks = [*(callbacks or ()), _DistillFor(self.distill_epochs)]
        return super().fit(*args, callbacks=callbacks, **kwargs)

    # Only the student trains: the teacher's variables are state the training
    # step carries (JAX passes them in) but never differentiates nor updates.
    @property
    def trainable_weights(self):
        return self.student.trainable_weights

    @property
    def non_trainable_weights(self):
        return (self.student.non_trainable_weights + self.teacher.weights
                + [self.distillation_weight])

    @property
    def trainable_variables(self):
        return self.student.trainable_variables

    @property
    def non_trainable_variables(self):
        return (self.student.non_trainable_variables + self.teacher.variables
                + [self.distillation_weight])


class _DistillFor(keras.callbacks.Callback):
    """Sets the Distiller's weight to ``alpha`` in the first ``epochs`` epochs of
    the ``fit`` it is made for and to 0 in the others; ``alpha`` again at the end.

    Set at the start of an epoch, where every backend's ``fit`` reads its
    variables anew (JAX carries them through an epoch's steps as state).
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs
        self.epochs_begun = 0

    def on_epoch_begin(self, epoch, logs=None):
        weight = self.model.alpha if self.epochs_begun < self.epochs else 0.0
        self.model.distillation_weight.assign(weight)
        self.epochs_begun += 1

    def on_train_end(self, logs=None):
        self.model.distillation_weight.assign(self.model.alpha)
