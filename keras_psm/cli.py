"""The ``keras-psm`` command: compress, export, list methods, run the demo.

    keras-psm compress model.keras small.keras --method psm --factors 3 --sparsity 14
    keras-psm export small.keras small.tflite --quantization float16
    keras-psm finetune small.keras tuned.keras --teacher model.keras --data train.npz
    keras-psm methods
    keras-psm demo --quick

Every subcommand has ``--help``. Errors the user can fix (a missing file, a
file that is not a Keras model, an unknown method or option) end the
command with status 1 and one line on standard error, never a traceback.

An output file is never the input file, replaces an existing file only with
``--overwrite``, and is written whole or not at all (``keras_psm.files``).

The command prints only its own output: TensorFlow's, Keras's and absl's log
lines and warnings show with ``--verbose`` only (the ``keras-psm`` script,
``keras_psm_cli.main``, also hides TensorFlow's C++ logs, which must be
silenced before TensorFlow loads), and progress bars are drawn only when
standard error is a terminal.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import sys
import textwrap
import types
import typing
import warnings
import zipfile

import numpy as np

from keras_psm import demo
from keras_psm.backend import KERAS_NAME, LEGACY_KERAS, keras
from keras_psm.calibration import input_names
from keras_psm.compress import compress
from keras_psm.datasets import DATASETS
from keras_psm.distill import OBJECTIVES, Distiller, describe
from keras_psm.export import size_report, to_tflite
from keras_psm.files import write_atomically
from keras_psm.learning_rate import DEFAULT_STEPS, pick_learning_rate
from keras_psm.methods import available_methods, get_method
from keras_psm_cli import quiet_worker

PROG = "keras-psm"


class CommandError(Exception):
    """An error the user can fix; ``main`` prints it as one line."""


# ----------------------------------------------------------------------------
# Method options given on the command line as key=value, typed by the
# method's config dataclass.

_TRUE = ("true", "yes", "1", "on")
_FALSE = ("false", "no", "0", "off")


def option_types(config_class):
    """``field name -> type annotation`` of a method's config dataclass."""
    hints = typing.get_type_hints(config_class)
    return {field.name: hints.get(field.name, str) for field in dataclasses.fields(config_class)}


def type_name(annotation):
    """A short, readable name for a type annotation (``int or none``, ``'a'|'b'``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if arg is type(None) else type_name(arg) for arg in args)
    if origin is typing.Literal:
        return "|".join(repr(arg) for arg in args)
    if origin in (tuple, list):
        return f"comma-separated {type_name(args[0]) if args else 'values'}"
    return getattr(annotation, "__name__", str(annotation))


def parse_value(text, annotation):
    """Convert the command-line ``text`` to ``annotation`` (raises ValueError)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return parse_value(text, arg)
                except ValueError:
                    pass
        raise ValueError
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ValueError
    if origin in (tuple, list):
        item = args[0] if args else str
        return origin(parse_value(part.strip(), item) for part in text.split(",") if part.strip())
    if annotation is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ValueError
    if annotation in (int, float, str):
        return annotation(text)
    raise ValueError


def method_options(method, pairs):
    """Options for ``method`` from ``key=value`` strings, typed by its config class."""
    types_ = option_types(method.config_class)
    options = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not separator or not key:
            raise CommandError(f"--option {pair!r}: expected key=value, e.g. sparsity=4.")
        if key not in types_:
            raise CommandError(
                f"method {method.name!r} has no option {key!r}; its options are "
                f"{', '.join(types_)} (see `{PROG} methods`).")
        try:
            options[key] = parse_value(text.strip(), types_[key])
        except ValueError:
            raise CommandError(
                f"--option {key}={text}: method {method.name!r} expects "
                f"{type_name(types_[key])} for {key!r}.") from None
    return options


# ----------------------------------------------------------------------------
# Files


def existing_file(path, what):
    if not os.path.isfile(path):
        raise CommandError(f"{what} {path!r} does not exist or is not a file.")
    return path


def writable_path(path, suffix, what, source, overwrite=False):
    """Check ``path`` before any slow work: the right suffix, an existing folder, not
    the ``source`` file (by name or through a link), and no existing file unless
    ``overwrite``."""
    if not path.endswith(suffix):
        raise CommandError(f"{what} {path!r} must end in {suffix}.")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CommandError(f"{what} {path!r}: folder {directory!r} does not exist.")
    if os.path.isdir(path):
        raise CommandError(f"{what} {path!r} is a folder.")
    if os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
        raise CommandError(f"{what} {path!r} is the input file {source!r}; "
                           "write to another path to keep the input.")
    if os.path.exists(path) and not overwrite:
        raise CommandError(f"{what} {path!r} exists; pass --overwrite to replace it.")
    return path


#: Longest reason quoted from Keras when a file does not load (its messages
#: can hold a whole model config).
MAX_REASON = 300


def saved_by(path):
    """``"keras"`` or ``"tf_keras"``: which Keras wrote a .keras file; None if unknown."""
    try:
        with zipfile.ZipFile(path) as archive:
            version = str(json.loads(archive.read("metadata.json")).get("keras_version", ""))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return {"2": "tf_keras", "3": "keras"}.get(version.split(".")[0])


def load_model(path):
    """A Keras model from a .keras or .h5 file, uncompiled."""
    existing_file(path, "input model")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises many types for files it cannot read
        reason = demo.one_line(error).split(" Full object config:")[0]
        if len(reason) > MAX_REASON:
            reason = reason[:MAX_REASON] + "..."
        hint = ""
        if saved_by(path) not in (None, KERAS_NAME):
            hint = (" The file was saved by Keras 3: unset TF_USE_LEGACY_KERAS to load it."
                    if LEGACY_KERAS else
                    " The file was saved by tf_keras: set TF_USE_LEGACY_KERAS=1 to load it.")
        raise CommandError(f"cannot load a Keras model from {path!r} with {KERAS_NAME}: "
                           f"{type(error).__name__}: {reason}{hint}") from None
    if not isinstance(model, keras.Model):
        raise CommandError(f"{path!r} holds a {type(model).__name__}, not a Keras model.")
    return model


# ----------------------------------------------------------------------------
# Output: the command's own lines only


def terminal():
    """Whether standard error is a terminal: progress bars are drawn there only."""
    return sys.stderr.isatty()


#: Modules whose Python warnings a quiet run hides: library internals the
#: user cannot act on. keras_psm's own warnings still show.
FRAMEWORK_MODULES = r"(tensorflow|tf_keras|keras|absl|tensorflow_model_optimization|google)(\.|$)"

#: Python loggers of the frameworks, raised to ERROR in a quiet run.
FRAMEWORK_LOGGERS = ("absl", "tensorflow", "keras", "tf_keras")


@contextlib.contextmanager
def framework_logs_hidden():
    """Hide the frameworks' Python log records below ERROR and their warnings in the block.

    (Among them absl's "Please consider providing the trackable_obj argument"
    from every TFLite conversion.) The loggers' levels and the warning
    filters are restored afterwards.
    """
    loggers = [logging.getLogger(name) for name in FRAMEWORK_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=FRAMEWORK_MODULES)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# ----------------------------------------------------------------------------
# Subcommands


def run_compress(args):
    writable_path(args.output, ".keras", "output model", args.input, args.overwrite)
    method = get_method(args.method)
    options = method_options(method, args.option)
    for flag, key, value in (("--factors", "n_factors", args.factors),
                             ("--sparsity", "sparsity", args.sparsity)):
        if value is not None:
            if key not in option_types(method.config_class):
                raise CommandError(f"{flag}: method {method.name!r} has no option {key!r}; "
                                   f"see `{PROG} methods`.")
            options[key] = value
    method.make_config(**options)  # validate before the (slow) model load
    model = load_model(args.input)
    executor = None
    if args.jobs > 1:
        executor = concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn"),
            initializer=None if args.verbose else quiet_worker)
    calibration = None if args.calibration is None else load_calibration(args.calibration, model)
    progress = not args.quiet and terminal()
    try:
        compressed, report = compress(model, method.name, layers=args.layers,
                                      executor=executor, verbose=int(progress),
                                      target_ratio=args.target_ratio,
                                      calibration_data=calibration, **options)
    finally:
        if executor is not None:
            executor.shutdown()
    if not args.quiet and not progress:
        print(report)  # compress printed it under its progress bar otherwise
    with write_atomically(args.output) as temporary:
        compressed.save(temporary)
    print(f"wrote {args.output}: {report.params_before:,} -> {report.params_after:,} "
          f"parameters in the layers with weights (x{report.compression_ratio:.1f}). "
          "Compile it and fine-tune with model.fit"
          + (" passing the method's callbacks" if report.callbacks else "") + ".")
    return 0


def load_calibration(values, model):
    """``--calibration FILE.npz [N]``: the file's first N samples (all without N), one
    array per model input: the file's only array, its arrays named after the inputs,
    or ``np.savez``'s positional ``arr_0``, ``arr_1``, ... in input order."""
    if len(values) > 2:
        raise CommandError(f"--calibration takes FILE.npz and an optional sample count, "
                           f"got {values}.")
    path = existing_file(values[0], "calibration file")
    count = None
    if len(values) == 2:
        if not values[1].isdigit() or int(values[1]) < 1:
            raise CommandError(f"--calibration: the sample count must be an integer >= 1, "
                               f"got {values[1]!r}.")
        count = int(values[1])
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    names = input_names(model)
    if len(arrays) == 1:
        data = list(arrays.values())
    elif set(names) <= set(arrays):
        data = [arrays[name] for name in names]
    elif set(arrays) == {f"arr_{i}" for i in range(len(names))}:
        data = [arrays[f"arr_{i}"] for i in range(len(names))]
    else:
        raise CommandError(f"--calibration {path}: holds arrays {sorted(arrays)}; give one "
                           f"array, or one per model input named {names} or arr_0, arr_1, ...")
    return [array[:count] for array in data]


def run_export(args):
    writable_path(args.output, ".tflite", "output file", args.input, args.overwrite)
    model = load_model(args.input)
    quantization = None if args.quantization == "none" else args.quantization
    sparse = {"auto": "auto", "yes": True, "no": False}[args.sparse]
    with write_atomically(args.output) as temporary:
        to_tflite(model, temporary, quantization=quantization, sparse=sparse,
                  factor_form=args.factor_form,
                  batch_size=None if args.batch_size == 0 else args.batch_size)
    print(size_report(model, args.output))
    print(f"wrote {args.output}; it runs with LiteRT and matches the Keras model.")
    return 0


def load_training_data(path):
    """``(x, y)`` from an .npz holding arrays ``x`` and ``y`` (or ``x_train`` and ``y_train``)."""
    existing_file(path, "training data")
    with np.load(path) as archive:
        for x_name, y_name in (("x", "y"), ("x_train", "y_train")):
            if {x_name, y_name} <= set(archive.files):
                x, y = archive[x_name], archive[y_name]
                break
        else:
            raise CommandError(f"--data {path}: holds arrays {sorted(archive.files)}; give "
                               "the inputs as 'x' and the labels as 'y' (np.savez(path, x=..., "
                               "y=...)).")
    if len(x) != len(y):
        raise CommandError(f"--data {path}: {len(x)} inputs but {len(y)} labels.")
    return x, y


def run_finetune(args):
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--distill-epochs", args.distill_epochs)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be an integer >= 1, got {value}.")
    # Never one of the two inputs, --overwrite or not; then an existing output needs it.
    writable_path(args.output, ".keras", "output model", args.teacher, overwrite=True)
    writable_path(args.output, ".keras", "output model", args.input, args.overwrite)
    x, y = load_training_data(args.data)
    student, teacher = load_model(args.input), load_model(args.teacher)
    trainee = student if args.alpha == 0 else Distiller(
        student, teacher, temperature=args.temperature, alpha=args.alpha,
        objective=args.objective, distill_epochs=args.distill_epochs)
    rate = args.learning_rate
    if rate is None:
        pick = pick_learning_rate(trainee, x, y, args.loss, batch_size=args.batch_size)
        rate = pick.learning_rate
        print("learning rate: " + ", ".join(
            f"{candidate:g} {'error' if len(score) == 2 else 'loss'} {score[0]:.4f}"
            for candidate, score in pick.scores.items())
            + f" after {DEFAULT_STEPS} steps on the last 10% of the data; picked {rate:g}")
    trainee.compile(optimizer=keras.optimizers.Adam(rate), loss=args.loss,
                    metrics=["accuracy"])
    history = trainee.fit(x, y, epochs=args.epochs, batch_size=args.batch_size,
                          verbose=int(not args.quiet and terminal()))
    with write_atomically(args.output) as temporary:
        student.save(temporary)
    losses = history.history["loss"]
    settings = describe(args.objective, args.temperature, args.alpha, args.distill_epochs)
    print(f"wrote {args.output}: fine-tuned {args.epochs} epoch(s) at learning rate {rate:g}"
          + (f", distilled from {args.teacher} ({settings})" if trainee is not student else "")
          + f"; training loss {losses[0]:.4f} -> {losses[-1]:.4f}.")
    return 0


LAYER_NAMES = {"dense": "Dense", "conv2d": "Conv2D"}


def describe_methods():
    """Text listing every registered method: description, layers, paper, options, presets."""
    blocks = []
    for name in available_methods():
        method = get_method(name)
        defaults = {f.name: f.default for f in dataclasses.fields(method.config_class)}
        layers = ", ".join(LAYER_NAMES[kind] for kind in method.layer_kinds)
        lines = [f"{name}: {method.description}", f"  layers:  {layers}"]
        if method.paper:
            lines.append(f"  paper:   {method.paper}")
        types_ = option_types(method.config_class)
        width = max(map(len, types_), default=0)
        lines.append("  options:")
        for key, annotation in types_.items():
            default = ("required" if defaults[key] is dataclasses.MISSING
                       else f"default {defaults[key]!r}")
            lines.append(f"    {key.ljust(width)}  {type_name(annotation)}, {default}")
        for budget, options in method.presets.items():
            lines.append(f"  preset {budget}: {demo.format_options(options)}")
        if method.callbacks is not None:
            lines.append("  fine-tune with model.fit(..., callbacks=report.callbacks)")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def run_methods(args):
    print(describe_methods())
    return 0


def run_demo_command(args):
    settings = dataclasses.replace(demo.QUICK if args.quick else demo.FULL,
                                   dataset=args.dataset, distill=not args.no_distill)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CommandError(f"--output {args.output!r} exists and is not a folder.")
    for name in args.methods or ():
        get_method(name)
    demo.run_demo(settings, output_dir=args.output, methods=args.methods,
                  export=not args.no_export, min_ratio=args.min_ratio,
                  progress=not args.no_progress and terminal(),
                  target_ratio=args.target_ratio)
    return 0


# ----------------------------------------------------------------------------
# The parser


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description; keeps paragraphs with indented lines (examples)."""

    def _fill_text(self, text, width, indent):
        paragraphs = []
        for paragraph in text.split("\n\n"):
            if any(line.startswith(" ") for line in paragraph.splitlines()):
                paragraphs.append(textwrap.indent(paragraph, indent))
            else:
                paragraphs.append(textwrap.fill(" ".join(paragraph.split()), width,
                                                initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(paragraphs)


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Compress a trained Keras model by replacing its Dense and Conv2D weight "
            "matrices with structured factorizations (PSM: products of sparse "
            "matrices, and other methods), then fine-tune it with model.fit and "
            "export it to TFLite."),
        epilog=(
            "examples:\n"
            f"  {PROG} demo --quick\n"
            f"  {PROG} methods\n"
            f"  {PROG} compress lenet.keras lenet_psm.keras --method psm --factors 3 "
            "--sparsity 14\n"
            f"  {PROG} export lenet_psm.keras lenet_psm.tflite\n\n"
            "Keras 3 is used by default; set TF_USE_LEGACY_KERAS=1 to use tf_keras. "
            "Run '%(prog)s COMMAND --help' for a command's options."),
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    compress_parser = commands.add_parser(
        "compress", help="compress a saved model and save the result",
        description=(
            "Load a trained model (.keras or .h5 file), replace its "
            "Dense/Conv2D layers with the METHOD's compressed layers fitted to their "
            "weights, print the per-layer report (parameters before/after, relative "
            "error ||W - W_hat||_F / ||W||_F, seconds) and save the compressed model "
            "as .keras. It reloads with keras.models.load_model once keras_psm is "
            "imported. Fine-tune it afterwards: compile, then model.fit."),
        epilog=(
            "example:\n"
            f"  {PROG} compress lenet.keras lenet_psm.keras --method psm --factors 3 "
            "--sparsity 4 --option max_iter=100 --layers conv2 fc1 fc2\n\n"
            f"'{PROG} methods' lists each method's options, their types and defaults."),
        formatter_class=HelpFormatter,
    )
    add = compress_parser.add_argument
    add("input", metavar="IN", help="trained model file (.keras, .h5)")
    add("output", metavar="OUT.keras", help="where to save the compressed model")
    add("--method", default="psm",
        help=f"compression method (default: psm; see '{PROG} methods')")
    add("--factors", "--n-factors", dest="factors", type=int, metavar="Q",
        help="Q, the number of sparse factors per layer (option n_factors)")
    add("--sparsity", type=int, metavar="K",
        help="K: each factor keeps at least K nonzeros in every row and every column "
             "(option sparsity; an integer count, not a fraction of zeros: "
             "the pruning methods' fraction removed is --option target_sparsity=0.9)")
    add("--layers", nargs="+", metavar="NAME",
        help="names of the layers to compress (default: every Dense/Conv2D layer the "
             "method supports)")
    add("--option", action="append", default=[], metavar="KEY=VALUE",
        help="any option of the method, repeatable, e.g. --option max_iter=100 "
             "--option rank=none")
    add("--jobs", type=int, default=1, metavar="N",
        help="fit N layers at a time in worker processes (default: 1)")
    add("--target-ratio", type=float, metavar="R",
        help="choose the method's size per layer (K, rank, sparsity...) so that the "
             "compressed layers have R times fewer nonzero parameters")
    add("--calibration", nargs="+", metavar=("FILE.npz", "N"),
        help="fit each layer to its inputs on these model inputs (an .npz with one array "
             "per model input; a few hundred samples), using the first N samples if given")
    add("--quiet", action="store_true", help="no progress bar and no per-layer report")
    add("--overwrite", action="store_true", help="replace OUT.keras if it exists")
    compress_parser.set_defaults(run=run_compress)

    export_parser = commands.add_parser(
        "export", help="export a model to a .tflite file that keeps its compression",
        description=(
            "Convert a (compressed) model to TFLite with its factors kept as their own "
            "constants where LiteRT runs them at least as fast as their product, and "
            "sparse constants in TFLite's sparse encoding when that is smaller. The file "
            "is run with the LiteRT interpreter and checked against the Keras model "
            "before it is written; the per-layer sizes are printed."),
        formatter_class=HelpFormatter,
    )
    add = export_parser.add_argument
    add("input", metavar="IN", help="model file (.keras, .h5)")
    add("output", metavar="OUT.tflite", help="where to write the TFLite file")
    add("--quantization", choices=("none", "float16", "dynamic_int8"), default="none",
        help="post-training weight quantization (default: none, float32 weights)")
    add("--sparse", choices=("auto", "yes", "no"), default="auto",
        help="TFLite sparse encoding of constants; auto keeps the smaller file "
             "(default: auto)")
    add("--factor-form", choices=("auto", "sequence", "product"), default="sequence",
        help="how PSM layers apply their factors: sequence (one op per factor, the "
             "smallest file), product (one op with the product kernel, the dense "
             "layer's speed), auto (per layer, the faster of the factors as fully "
             "connected ops and the product) (default: sequence)")
    add("--batch-size", type=int, default=1, metavar="N",
        help="the file's fixed batch size, 0 for one chosen at run time (default: 1)")
    add("--overwrite", action="store_true", help="replace OUT.tflite if it exists")
    export_parser.set_defaults(run=run_export)

    finetune_parser = commands.add_parser(
        "finetune", help="fine-tune a compressed model against its original on your data",
        description=(
            "Load a compressed model (IN.keras, from 'keras-psm compress') and the model it "
            "was compressed from (--teacher), fine-tune the compressed one on the labelled "
            "data of --data with the original's softened outputs as extra targets "
            "(knowledge distillation: task loss + alpha * T^2 * D, with D set by "
            "--objective), and save it as "
            "OUT.keras. Without --learning-rate, the PSM paper's protocol picks it: "
            f"1e-3, 1e-4 and 1e-5 each train {DEFAULT_STEPS} steps, the lowest error on the "
            "last 10% of the data wins (errors within one standard error of it tie, and the "
            "highest tied rate wins)."),
        epilog=(
            "example:\n"
            f"  {PROG} finetune lenet_psm.keras lenet_psm_tuned.keras --teacher lenet.keras "
            "--data train.npz --epochs 5\n\n"
            "train.npz holds the inputs as 'x' and the labels as 'y' "
            "(numpy.savez('train.npz', x=x_train, y=y_train))."),
        formatter_class=HelpFormatter,
    )
    add = finetune_parser.add_argument
    add("input", metavar="IN.keras", help="compressed model to fine-tune")
    add("output", metavar="OUT.keras", help="where to save the fine-tuned model")
    add("--teacher", required=True, metavar="ORIGINAL.keras",
        help="the uncompressed model it came from")
    add("--data", required=True, metavar="FILE.npz",
        help="training data: arrays x (inputs) and y (labels)")
    add("--epochs", type=int, default=5, metavar="N", help="epochs of fine-tuning (default: 5)")
    add("--batch-size", type=int, default=32, metavar="N", help="(default: 32)")
    add("--learning-rate", type=float, metavar="LR",
        help="Adam's learning rate (default: picked from 1e-3, 1e-4, 1e-5)")
    add("--temperature", type=float, default=4.0, metavar="T",
        help="softens both models' outputs (default: 4)")
    add("--alpha", type=float, default=1.0,
        help="weight of the distillation term; 0 fine-tunes on the labels alone (default: 1)")
    add("--objective", choices=OBJECTIVES, default="kl",
        help="the distance D between the softened outputs: 'kl' (Hinton et al. 2015) or "
             "'correlation' (DIST, Huang et al. 2022; for a calibrated model at a high "
             "ratio) (default: kl)")
    add("--distill-epochs", type=int, metavar="N",
        help="distil in the first N epochs only, then fine-tune on the labels alone "
             "(early-stopped distillation) (default: every epoch)")
    add("--loss", default="sparse_categorical_crossentropy",
        help="the task loss, a Keras loss name (default: sparse_categorical_crossentropy)")
    add("--quiet", action="store_true", help="no progress bar")
    add("--overwrite", action="store_true", help="replace OUT.keras if it exists")
    finetune_parser.set_defaults(run=run_finetune)

    methods_parser = commands.add_parser(
        "methods", help="list the compression methods, their options and papers",
        description="List every registered method with its layers, paper, options and "
                    "presets.",
        formatter_class=HelpFormatter,
    )
    methods_parser.set_defaults(run=run_methods)

    quick, full = demo.QUICK, demo.FULL
    demo_parser = commands.add_parser(
        "demo", help="train LeNet-5 on MNIST digits, compress it every way, compare",
        description=(
            "Train a LeNet-5 on the 5,000 MNIST digits bundled with keras_psm (no "
            "network needed; --dataset fashion_mnist_5k for the bundled Fashion-MNIST "
            "images), compress it with every method at a small and a large "
            "parameter budget, fine-tune each with model.fit (Adam, the same epochs "
            "for all, distilled from the uncompressed model unless --no-distill, at the "
            "learning rate the PSM paper's protocol picks), print a table (parameters in "
            "Conv2D and Dense layers, compression ratio, accuracy before and after "
            "fine-tuning, seconds), and write results.csv and tradeoff.png (accuracy "
            "against parameters, log scale) to the output folder. The best model is "
            "exported to best.tflite: "
            "the most accurate one with at least --min-ratio times fewer parameters, "
            "or the most compressed one if none gets there. A full run trains on "
            f"{full.train_samples} samples and fine-tunes {full.finetune_epochs} epochs "
            f"(minutes on a laptop CPU); --quick uses {quick.train_samples} samples, "
            f"{quick.finetune_epochs} epoch and {quick.max_iter} palm4MSA iterations."),
        formatter_class=HelpFormatter,
    )
    add = demo_parser.add_argument
    add("--quick", action="store_true", help="fewer samples, epochs and palm4MSA iterations")
    add("--dataset", default="mnist_5k", choices=DATASETS,
        help="mnist_5k and fashion_mnist_5k are bundled; mnist, fashion_mnist and cifar10 "
             "are downloaded by keras.datasets, and mnist and fashion_mnist fall back to "
             "the bundled subset offline (default: mnist_5k)")
    add("--output", default="keras_psm_demo", metavar="DIR",
        help="folder for results.csv, tradeoff.png and best.tflite "
             "(default: ./keras_psm_demo)")
    add("--methods", nargs="+", metavar="METHOD",
        help="run only these methods (default: every registered one)")
    add("--min-ratio", type=float, default=demo.MIN_RATIO, metavar="R",
        help=f"compression ratio the exported model must reach (default: {demo.MIN_RATIO:g})")
    add("--no-export", action="store_true", help="skip the TFLite export")
    add("--no-distill", action="store_true",
        help="fine-tune on the labels alone, not distilled from the uncompressed model")
    add("--no-progress", action="store_true",
        help="no progress bars (they are drawn only when standard error is a terminal)")
    add("--target-ratio", type=float, metavar="R",
        help="compare at equal budget instead: every method with a size knob at R times "
             "fewer parameters")
    demo_parser.set_defaults(run=run_demo_command)

    for command_parser in (compress_parser, export_parser, finetune_parser, methods_parser,
                           demo_parser):
        command_parser.add_argument(
            "--verbose", action="store_true",
            help="also show TensorFlow's, Keras's and absl's log lines and warnings")
    return parser


def main(argv=None):
    """Run the command ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    The ``keras-psm`` script calls it through ``keras_psm_cli.main``, which
    also hides TensorFlow's C++ log lines.
    """
    args = build_parser().parse_args(argv)
    try:
        with contextlib.nullcontext() if args.verbose else framework_logs_hidden():
            return args.run(args)
    except (CommandError, ValueError, TypeError, OSError, RuntimeError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # By now ``keras_psm`` has loaded TensorFlow, whose log lines nothing can hide any more.
    sys.exit(f"{PROG}: run `keras-psm ...` or `python -m keras_psm_cli ...`, which hide "
             "TensorFlow's log lines; `python -m keras_psm.cli` is not an entry point.")
