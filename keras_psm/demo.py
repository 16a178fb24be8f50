"""Train, compress with every method, fine-tune, compare: the demo and experiment pipeline.

``run_demo`` is what ``keras-psm demo`` runs. A LeNet-5 is trained on the
bundled MNIST digits (or another of ``keras_psm.datasets.DATASETS``), then
compressed by every registered method at each of its presets (a "small"
and a "large" parameter budget), each compressed model is fine-tuned with
``model.fit`` (same optimizer and epochs for all; by default distilled from
the uncompressed model, ``keras_psm.Distiller``, at the learning rate the PSM
paper's protocol picks, ``pick_learning_rate``), and the results are
compared in a table, a CSV file and a plot of accuracy against parameters on
a log scale (as in Figure 1 of the PSM paper). The most accurate model
among those compressed at least ``MIN_RATIO`` times is exported to TFLite.

The steps are separate functions (``lenet5``, ``preset_trials``,
``run_trials``, ``format_table``, ``write_csv``, ``plot_tradeoff``,
``best_result``), reused by ``benchmarks/tradeoff.py`` and the examples. A
method registered with ``keras_psm.register_method`` appears in the demo
with no change here: the trials come from the registry's ``presets``.
"""

import csv
import dataclasses
import json
import os
import sys
import time
from typing import Any, Mapping, Optional

import numpy as np
from tqdm.auto import tqdm

from keras_psm import ops
from keras_psm.backend import keras
from keras_psm.compress import compress
from keras_psm.datasets import DATASETS, load_dataset
from keras_psm.distill import OBJECTIVES, Distiller, describe
from keras_psm.files import write_atomically
from keras_psm.learning_rate import DEFAULT_STEPS, pick_learning_rate
from keras_psm.methods import available_methods, get_method
from keras_psm.validation import check_bool, check_choice, check_float, check_int

#: The demo exports the most accurate model among those with at least this
#: many times fewer parameters in their Conv2D and Dense layers.
MIN_RATIO = 5.0

#: The parameter budgets of ``Method.presets`` that the demo and the benchmarks run.
BUDGETS = ("small", "large")

BASE = "base"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run: data, training, fine-tuning.

    Attributes:
        dataset: one of ``keras_psm.datasets.DATASETS``; ``"mnist_5k"`` and
            ``"fashion_mnist_5k"`` are bundled, the others come from
            ``keras.datasets`` (network; ``"mnist"`` and ``"fashion_mnist"``
            fall back to the bundled subset offline).
        train_samples, test_samples: how many samples of each split are used.
        train_epochs: epochs of training of the uncompressed model.
        finetune_epochs: epochs of ``model.fit`` after compression, the same
            for every method.
        batch_size, learning_rate: of the Adam optimizer used for both
            (``compile_for_training``); fine-tuning uses ``learning_rate``
            only if ``pick_rate`` is False.
        distill: fine-tune each compressed model as the student of the
            uncompressed one (``keras_psm.Distiller`` with ``temperature``,
            ``alpha``, ``objective`` and ``distill_epochs``) instead of on the
            labels alone.
        pick_rate: fine-tune each compressed model at the learning rate
            ``pick_learning_rate`` picks (the PSM paper's protocol).
        pick_steps: the steps each rate trains before the pick compares them
            (``pick_learning_rate``'s ``steps``; the paper's: 10).
        ema_momentum: fine-tune with an exponential moving average of the
            weights (Keras's optimizer option ``use_ema``), which replaces
            the weights at the end of ``fit``; None: no average.
        max_iter: caps the ``max_iter`` option (palm4MSA iterations) of the
            methods that have one; None keeps each method's own.
        seed: seeds the data split, the initial weights and every fit.
    """

    dataset: str = "mnist_5k"
    train_samples: int = 4000
    test_samples: int = 1000
    train_epochs: int = 10
    finetune_epochs: int = 3
    batch_size: int = 32
    learning_rate: float = 1e-3
    max_iter: Optional[int] = None
    seed: int = 0
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 1.0
    objective: str = "kl"
    distill_epochs: Optional[int] = None
    pick_rate: bool = True
    pick_steps: int = DEFAULT_STEPS
    ema_momentum: Optional[float] = None

    def __post_init__(self):
        where = type(self).__name__
        check_choice(self.dataset, "dataset", DATASETS, where=where)
        check_int(self.train_samples, "train_samples", minimum=1, where=where)
        check_int(self.test_samples, "test_samples", minimum=1, where=where)
        check_int(self.train_epochs, "train_epochs", minimum=1, where=where)
        check_int(self.finetune_epochs, "finetune_epochs", minimum=0, where=where)
        check_int(self.batch_size, "batch_size", minimum=1, where=where)
        check_float(self.learning_rate, "learning_rate", minimum=0.0,
                    exclusive_minimum=True, where=where)
        check_int(self.max_iter, "max_iter", minimum=1, where=where, allow_none=True)
        check_int(self.seed, "seed", minimum=0, where=where)
        check_bool(self.distill, "distill", where=where)
        check_float(self.temperature, "temperature", minimum=0.0, exclusive_minimum=True,
                    where=where)
        check_float(self.alpha, "alpha", minimum=0.0, where=where)
        check_choice(self.objective, "objective", OBJECTIVES, where=where)
        check_int(self.distill_epochs, "distill_epochs", minimum=1, where=where, allow_none=True)
        check_bool(self.pick_rate, "pick_rate", where=where)
        check_int(self.pick_steps, "pick_steps", minimum=1, where=where)
        check_float(self.ema_momentum, "ema_momentum", minimum=0.0, maximum=1.0,
                    exclusive_minimum=True, where=where, allow_none=True)


#: ``keras-psm demo``: all 4,000 training digits of the bundled set.
FULL = Settings()
#: ``keras-psm demo --quick``: fewer samples and epochs, 30 palm4MSA iterations.
#: (Sample counts are multiples of the batch size: a last, smaller batch would
#: cost every ``fit`` a second trace of its training step.)
QUICK = Settings(train_samples=1600, test_samples=500, train_epochs=5, finetune_epochs=1,
                 max_iter=30)

#: A pruning schedule given in training steps (options ``end_step``,
#: ``frequency``) is scaled to the fine-tuning: the target sparsity is reached
#: after this fraction of the steps, in ``SCHEDULE_UPDATES`` mask updates.
SCHEDULE_FRACTION = 2 / 3
SCHEDULE_UPDATES = 10


@dataclasses.dataclass(frozen=True)
class Trial:
    """One compression to run: a method, a budget label and the method's options."""

    method: str
    budget: str
    options: Mapping[str, Any]


@dataclasses.dataclass
class Result:
    """What one trial gave; ``error`` is set (one line) when it failed.

    ``params`` counts the parameters of the Conv2D and Dense layers (the
    nonzero ones of their compressed replacements) after fine-tuning,
    ``compression_ratio`` the uncompressed count over it. Accuracies are on the test split, right
    after compression and after fine-tuning, ``learning_rate`` the fine-tuning's. ``model``
    is the fine-tuned Keras model (not written to CSV).
    """

    model_name: str
    method: str
    budget: str
    options: Mapping[str, Any]
    params: Optional[int] = None
    compression_ratio: Optional[float] = None
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    compress_seconds: Optional[float] = None
    fit_seconds: Optional[float] = None
    learning_rate: Optional[float] = None
    error: str = ""
    model: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def failed(self):
        return bool(self.error)

    @property
    def label(self):
        return self.method if not self.budget else f"{self.method} ({self.budget})"


@dataclasses.dataclass
class DemoOutcome:
    """Everything ``run_demo`` produced: results, the printed table, the files."""

    results: list
    table: str
    csv_path: str
    plot_path: str
    best: Optional[Result] = None
    tflite_path: Optional[str] = None
    size: Any = None


def lenet5(input_shape=(28, 28, 1), n_classes=10, seed=0):
    """LeNet-5 (LeCun et al., 1998) with ReLU and max pooling, as in the PSM paper."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(6, 5, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(name="pool1")(x)
    x = keras.layers.Conv2D(16, 5, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(120, activation="relu", name="fc1")(x)
    x = keras.layers.Dense(84, activation="relu", name="fc2")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="fc3")(x)
    return keras.Model(inputs, outputs, name="lenet5")


def vgg_small(input_shape=(32, 32, 3), n_classes=10, widths=(16, 32, 64), units=128, seed=0):
    """A small VGG-style CNN: per width, two 3x3 convolutions and a max pooling.

    The PSM paper's VGG19 shape (3x3 convolution stacks, then Dense layers)
    at a size that trains on a CPU in minutes.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(input_shape)
    x = inputs
    for block, width in enumerate(widths, start=1):
        for index in (1, 2):
            x = keras.layers.Conv2D(width, 3, padding="same", activation="relu",
                                    name=f"block{block}_conv{index}")(x)
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(units, activation="relu", name="fc1")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="fc2")(x)
    return keras.Model(inputs, outputs, name="vgg_small")


def load_data(settings):
    """``(x_train, y_train), (x_test, y_test)`` of ``settings.dataset``, cut to size.

    Raises ``RuntimeError`` (one line) when a ``keras.datasets`` download fails.
    """
    try:
        (x_train, y_train), (x_test, y_test) = load_dataset(settings.dataset, seed=settings.seed)
    except Exception as error:  # keras.datasets raises a bare Exception on download failure
        raise RuntimeError(
            f"could not load the {settings.dataset!r} data set from keras.datasets "
            f"({one_line(error)}); the bundled 'mnist_5k' and 'fashion_mnist_5k' need no "
            "network."
        ) from error
    return ((x_train[:settings.train_samples], y_train[:settings.train_samples]),
            (x_test[:settings.test_samples], y_test[:settings.test_samples]))


LOSS = "sparse_categorical_crossentropy"


def compile_for_training(model, settings, learning_rate=None, ema_momentum=None):
    """Compile with the one optimizer every model here is trained with (Adam).

    At ``learning_rate``, by default ``settings.learning_rate``; with
    ``ema_momentum``, averaging the weights (``use_ema``).
    """
    rate = settings.learning_rate if learning_rate is None else learning_rate
    average = {} if ema_momentum is None else dict(use_ema=True, ema_momentum=ema_momentum)
    model.compile(optimizer=keras.optimizers.Adam(rate, **average), loss=LOSS,
                  metrics=["accuracy"])


def finetune(model, teacher, data, settings, callbacks=()):
    """Fine-tune a compressed ``model`` as ``settings`` say; returns the learning rate used.

    With ``settings.distill`` the model trains as the student of ``teacher``
    (``Distiller``); with ``settings.pick_rate`` at the rate
    ``pick_learning_rate`` picks on the last 10% of the training data, else at
    ``settings.learning_rate``. ``model`` comes back compiled (Adam, the loss,
    accuracy), ready to ``evaluate``.
    """
    (x, y), _ = data
    trainee = (Distiller(model, teacher, settings.temperature, settings.alpha,
                         objective=settings.objective,
                         distill_epochs=settings.distill_epochs)
               if settings.distill else model)
    rate = settings.learning_rate
    if settings.pick_rate:
        rate = pick_learning_rate(trainee, x, y, LOSS, steps=settings.pick_steps,
                                  batch_size=settings.batch_size, callbacks=callbacks,
                                  seed=settings.seed).learning_rate
    keras.utils.set_random_seed(settings.seed)
    compile_for_training(trainee, settings, rate, settings.ema_momentum)
    if trainee is not model:
        compile_for_training(model, settings, rate)  # the student is evaluated on its own
    trainee.fit(x, y, epochs=settings.finetune_epochs, batch_size=settings.batch_size,
                callbacks=list(callbacks), verbose=0)
    return rate


def train(model, data, settings):
    """Train the uncompressed model; returns the seconds ``fit`` took."""
    (x, y), _ = data
    keras.utils.set_random_seed(settings.seed)
    compile_for_training(model, settings)
    start = time.perf_counter()
    model.fit(x, y, epochs=settings.train_epochs, batch_size=settings.batch_size, verbose=0)
    return time.perf_counter() - start


def accuracy(model, x, y, batch_size=500):
    """Top-1 accuracy of ``model(x, training=False)`` against integer labels ``y``."""
    predictions = np.concatenate([
        np.argmax(ops.convert_to_numpy(model(x[start:start + batch_size], training=False)),
                  axis=-1)
        for start in range(0, len(x), batch_size)
    ])
    return float(np.mean(predictions == np.asarray(y).reshape(-1)))


def conv_dense_names(model):
    """Names of the Conv2D and Dense layers of a (flat) model."""
    return [layer.name for layer in model.layers
            if type(layer) in (keras.layers.Conv2D, keras.layers.Dense)]


def param_count(model, names):
    """Parameters of the layers called ``names``, as stored by a sparse format.

    A compressed layer counts its nonzero parameters
    (``count_nonzero_params``: weights with their masks applied, bias
    included); a plain layer all of its parameters (``count_params``).
    """
    return sum(
        int(layer.count_nonzero_params()) if hasattr(layer, "count_nonzero_params")
        else int(layer.count_params())
        for layer in model.layers if layer.name in names
    )


def one_line(error):
    """An exception as one line: its first line of text, or its type's name."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def preset_trials(methods=None, budgets=BUDGETS, max_iter=None):
    """One trial per registered method and preset budget, in registry order.

    ``methods`` restricts the methods (default: ``available_methods()``).
    A method without presets runs once with its default options (budget
    "default"). ``max_iter`` caps the method's ``max_iter`` option if it has one.
    """
    trials = []
    for name in available_methods() if methods is None else methods:
        spec = get_method(name)
        presets = {budget: spec.presets[budget] for budget in budgets if budget in spec.presets}
        for budget, options in (presets or {"default": {}}).items():
            trials.append(Trial(name, budget, cap_max_iter(spec, options, max_iter)))
    return trials


def budget_trials(target_ratio, methods=None, max_iter=None):
    """One trial per method with a size knob, all at ``target_ratio`` (equal budget)."""
    trials = []
    for name in available_methods() if methods is None else methods:
        spec = get_method(name)
        if spec.size_knob is not None or spec.size_target is not None:
            options = cap_max_iter(spec, {"target_ratio": target_ratio}, max_iter)
            trials.append(Trial(name, f"x{target_ratio:g}", options))
    return trials


def cap_max_iter(spec, options, max_iter):
    """``options`` with ``max_iter`` lowered to at most ``max_iter`` if the method has it."""
    options = dict(options)
    fields = {field.name: field for field in dataclasses.fields(spec.config_class)}
    if max_iter is not None and "max_iter" in fields:
        current = options.get("max_iter", fields["max_iter"].default)
        options["max_iter"] = max_iter if current is None else min(current, max_iter)
    return options


def fit_schedule(spec, options, total_steps):
    """``options`` with a step-based pruning schedule fitted to ``total_steps``.

    For a method with an ``end_step`` option (iterative pruning), pruning
    ends after ``SCHEDULE_FRACTION`` of the fine-tuning steps, leaving the
    rest to recover, with ``SCHEDULE_UPDATES`` mask updates (``frequency``).
    Other methods' options are returned unchanged.
    """
    options = dict(options)
    fields = {field.name: field for field in dataclasses.fields(spec.config_class)}
    if "end_step" not in fields:
        return options
    begin = options.get("begin_step", fields["begin_step"].default) if "begin_step" in fields \
        else 0
    options["end_step"] = max(begin + 1, round(SCHEDULE_FRACTION * total_steps))
    if "frequency" in fields:
        options["frequency"] = max(1, (options["end_step"] - begin) // SCHEDULE_UPDATES)
    return options


def base_result(model, data, train_seconds=None):
    """The uncompressed model as a result row (ratio 1)."""
    _, (x_test, y_test) = data
    score = accuracy(model, x_test, y_test)
    return Result(
        model_name=model.name, method=BASE, budget="", options={},
        params=param_count(model, conv_dense_names(model)), compression_ratio=1.0,
        accuracy_before=score, accuracy_after=score, fit_seconds=train_seconds, model=model,
    )


def run_trial(base_model, trial, data, settings, base_params=None, keep_model=True):
    """Compress ``base_model`` as ``trial`` says, fine-tune, measure.

    Any exception from the method or the fine-tuning is caught and kept as
    the result's one-line ``error``, so one failing method does not stop a
    comparison. Fine-tuning is ``finetune`` (``report.callbacks`` always
    passed to ``fit``). The fine-tuned model is kept in ``result.model`` if
    ``keep_model``.
    """
    (x, y), (x_test, y_test) = data
    names = conv_dense_names(base_model)
    base_params = base_params or param_count(base_model, names)
    steps = -(-len(x) // settings.batch_size) * settings.finetune_epochs
    result = Result(model_name=base_model.name, method=trial.method, budget=trial.budget,
                    options=dict(trial.options))
    keras.utils.set_random_seed(settings.seed)
    try:
        result.options = fit_schedule(get_method(trial.method), trial.options, steps)
        start = time.perf_counter()
        model, report = compress(base_model, trial.method, verbose=0, **result.options)
        result.compress_seconds = time.perf_counter() - start
        result.accuracy_before = accuracy(model, x_test, y_test)
        start = time.perf_counter()
        if settings.finetune_epochs:
            result.learning_rate = finetune(model, base_model, data, settings,
                                            report.callbacks)
        result.fit_seconds = time.perf_counter() - start
        result.accuracy_after = accuracy(model, x_test, y_test)
        result.params = param_count(model, names)
        result.compression_ratio = base_params / max(result.params, 1)
        result.model = model if keep_model else None
    except Exception as error:  # reported in the table; the comparison goes on
        result.error = f"{type(error).__name__}: {one_line(error)}"
    return result


def run_trials(base_model, trials, data, settings, progress=True, keep_models=False):
    """``run_trial`` for each trial, with a progress bar; returns the results."""
    base_params = param_count(base_model, conv_dense_names(base_model))
    results = []
    with tqdm(trials, desc=f"compress + fine-tune {base_model.name}", unit="trial",
              disable=not progress) as bar:
        for trial in bar:
            bar.set_postfix_str(f"{trial.method} ({trial.budget})")
            results.append(run_trial(base_model, trial, data, settings, base_params,
                                     keep_model=keep_models))
    return results


def _number(value, spec):
    return "" if value is None else format(value, spec)


def format_options(options):
    return " ".join(f"{key}={value}" for key, value in options.items())


def format_table(results):
    """The results as a text table (one row per result, failures with their reason)."""
    header = ("method", "budget", "params", "ratio", "acc. before", "acc. after",
              "compress s", "fit s", "lr", "options")
    lines = [header]
    for result in results:
        if result.failed:
            lines.append((result.method, result.budget, "", "", "", "", "", "", "",
                          f"FAILED {result.error}"))
            continue
        lines.append((
            result.method, result.budget, _number(result.params, ","),
            f"x{result.compression_ratio:.1f}", _number(result.accuracy_before, ".4f"),
            _number(result.accuracy_after, ".4f"), _number(result.compress_seconds, ".1f"),
            _number(result.fit_seconds, ".1f"), _number(result.learning_rate, "g"),
            format_options(result.options),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in lines]
    text.insert(1, "-" * max(len(line) for line in text))
    return "\n".join(text)


CSV_FIELDS = ("model_name", "method", "budget", "options", "params", "compression_ratio",
              "accuracy_before", "accuracy_after", "compress_seconds", "fit_seconds",
              "learning_rate", "error")


def write_csv(results, path):
    """Write the results (options as JSON) to ``path``."""
    with write_atomically(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for result in results:
            row = {field: getattr(result, field) for field in CSV_FIELDS}
            row["options"] = json.dumps(dict(result.options), sort_keys=True)
            writer.writerow(row)
    return path


_MARKERS = "osD^v<>phP*Xd"


def plot_tradeoff(results, path, title="", axes=None, series_of=None):
    """Accuracy after fine-tuning against parameters (log x), one series per method.

    Like Figure 1 of the PSM paper: the points of a series are joined by a
    line, the uncompressed model is a black star. Failed results are left
    out. ``series_of(result)`` names a result's series (default: its
    method). Writes a PNG to ``path`` unless ``axes`` (a Matplotlib Axes to
    draw on) is given.
    """
    from matplotlib import colormaps, ticker
    from matplotlib.figure import Figure

    palette = colormaps["tab20"].colors
    colours = palette[::2] + palette[1::2]  # ten distinct hues first, then their light shades
    figure = None
    if axes is None:
        figure = Figure(figsize=(9, 5), layout="constrained")
        axes = figure.add_subplot()
    series, base = {}, []
    for result in results:
        if result.method == BASE:
            base.append(result)
        elif not result.failed:
            name = result.method if series_of is None else series_of(result)
            series.setdefault(name, []).append(result)
    for index, (method, points) in enumerate(series.items()):
        points = sorted(points, key=lambda result: result.params)
        axes.plot([point.params for point in points], [point.accuracy_after for point in points],
                  marker=_MARKERS[index % len(_MARKERS)], linewidth=1,
                  color=colours[index % len(colours)], label=method)
    for point in base:
        axes.plot([point.params], [point.accuracy_after], "k*", markersize=14,
                  label="base (uncompressed)")
        axes.axhline(point.accuracy_after, color="k", linestyle=":", linewidth=1)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel("parameters in Conv2D and Dense layers (log scale)")
    axes.set_ylabel("test accuracy after fine-tuning")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    if figure is not None:
        with write_atomically(path) as temporary:
            figure.savefig(temporary, dpi=120)
    return path


def best_result(results, min_ratio=MIN_RATIO):
    """The most accurate compressed result with ``compression_ratio >= min_ratio``.

    If none reaches ``min_ratio``, the most compressed result; None if every
    trial failed.
    """
    compressed = [r for r in results if not r.failed and r.method != BASE]
    if not compressed:
        return None
    qualified = [r for r in compressed if r.compression_ratio >= min_ratio]
    if qualified:
        return max(qualified, key=lambda r: (r.accuracy_after, r.compression_ratio))
    return max(compressed, key=lambda r: r.compression_ratio)


def finetune_description(settings):
    """How ``finetune`` trains, as the end of a sentence."""
    parts = []
    if settings.distill:
        parts.append("distilled from the uncompressed model (" + describe(
            settings.objective, settings.temperature, settings.alpha,
            settings.distill_epochs) + ")")
    parts.append(f"at the learning rate picked from 1e-3, 1e-4, 1e-5 after "
                 f"{settings.pick_steps} steps" if settings.pick_rate
                 else f"at learning rate {settings.learning_rate:g}")
    return ", " + ", ".join(parts)


def run_demo(settings=FULL, output_dir="keras_psm_demo", methods=None, export=True,
             min_ratio=MIN_RATIO, quantization=None, progress=True, stream=None,
             target_ratio=None):
    """Train LeNet-5, compress it with every method, fine-tune, compare, export the best.

    With ``target_ratio``, the methods are compared at equal budget instead of
    at their presets: every method with a size knob at ``target_ratio``.

    Writes ``results.csv``, ``tradeoff.png`` and (``export=True``)
    ``best.tflite`` into ``output_dir`` and prints the table to ``stream``
    (standard output by default). Returns a ``DemoOutcome``.
    """
    stream = sys.stdout if stream is None else stream
    check_float(min_ratio, "min_ratio", minimum=1.0, where="run_demo")
    trials = (preset_trials(methods, max_iter=settings.max_iter) if target_ratio is None
              else budget_trials(target_ratio, methods, max_iter=settings.max_iter))
    os.makedirs(output_dir, exist_ok=True)
    data = load_data(settings)
    (x, y), (x_test, _) = data

    n_classes = int(max(y.max(), data[1][1].max())) + 1
    base = lenet5(x.shape[1:], n_classes, seed=settings.seed)
    with tqdm(total=1, desc=f"train {base.name} on {len(x)} samples", unit="model",
              disable=not progress) as bar:
        train_seconds = train(base, data, settings)
        bar.update()
    results = [base_result(base, data, train_seconds)]
    results += run_trials(base, trials, data, settings, progress=progress, keep_models=True)

    table = format_table(results)
    title = f"{base.name} on {settings.dataset} ({len(x)} training samples)"
    print(f"\n{title}, fine-tuned {settings.finetune_epochs} epoch(s) with Adam"
          f"{finetune_description(settings)}:", file=stream)
    print(table, file=stream)
    outcome = DemoOutcome(
        results=results, table=table,
        csv_path=write_csv(results, os.path.join(output_dir, "results.csv")),
        plot_path=plot_tradeoff(results, os.path.join(output_dir, "tradeoff.png"), title),
        best=best_result(results, min_ratio),
    )
    print(f"\nwrote {outcome.csv_path} and {outcome.plot_path}", file=stream)
    if export and outcome.best is not None:
        from keras_psm.export import size_report, to_tflite

        best = outcome.best
        path = os.path.join(output_dir, "best.tflite")
        with tqdm(total=1, desc=f"export {best.label} to TFLite", unit="file",
                  disable=not progress) as bar:
            to_tflite(best.model, path, quantization=quantization, inputs=x_test[:64])
            outcome.size = size_report(best.model, path, dense_model=base)
            bar.update()
        outcome.tflite_path = path
        rule = (f"most accurate with at least x{min_ratio:g} fewer parameters"
                if best.compression_ratio >= min_ratio
                else f"none reached x{min_ratio:g}; most compressed")
        print(f"\nbest model ({rule}): {best.label}, x{best.compression_ratio:.1f}, "
              f"accuracy {best.accuracy_after:.4f} (uncompressed "
              f"{results[0].accuracy_after:.4f})", file=stream)
        print(f"{path}: {outcome.size.file_bytes:,} bytes, uncompressed LeNet-5 "
              f"{outcome.size.dense_file_bytes:,} bytes "
              f"(x{outcome.size.file_ratio:.1f} smaller)", file=stream)
    for result in results:
        if result is not outcome.best:
            result.model = None
    return outcome
