"""The ``keras-psm`` command, run as a user runs it (a subprocess), and its option parsing."""

import os
import re
import subprocess
import sys
from typing import Optional, Tuple

import numpy as np
import pytest

import keras_psm
from keras_psm import cli, demo
from keras_psm.backend import KERAS_NAME, LEGACY_KERAS, keras
from keras_psm.export import verify_tflite
from keras_psm.layers import SparseFactorConv2D, SparseFactorDense

import keras_psm_cli
from command_line import TENSORFLOW_LOG, command_environment, run_command


@pytest.fixture(scope="module")
def saved_lenet(tmp_path_factory, mnist_small):
    """A LeNet built, trained and saved by plain Keras (no keras_psm layers in it)."""
    (x, y), _ = mnist_small
    model = demo.lenet5()  # plain Keras layers only
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("models") / "lenet.keras"
    model.save(path)
    return path, model


@pytest.fixture(scope="module")
def compressed_run(saved_lenet, tmp_path_factory):
    path, _ = saved_lenet
    output = tmp_path_factory.mktemp("compressed") / "lenet_psm.keras"
    completed = run_command("compress", path, output, "--method", "psm", "--factors", "2",
                            "--sparsity", "4", "--option", "max_iter=20",
                            "--layers", "conv2", "fc1", "fc2")
    return completed, output


@pytest.mark.slow
def test_compress_writes_a_model_that_reloads_and_evaluates(saved_lenet, compressed_run,
                                                            mnist_small):
    completed, output = compressed_run
    assert completed.returncode == 0, completed.stderr[-2000:]
    # Only its own output: no TensorFlow log line, no progress bar when piped.
    assert completed.stderr == ""
    assert not TENSORFLOW_LOG.search(completed.stdout) and "\r" not in completed.stdout
    _, original = saved_lenet
    loaded = keras.models.load_model(output)  # no custom_objects
    assert isinstance(loaded.get_layer("conv2"), SparseFactorConv2D)
    assert isinstance(loaded.get_layer("fc1"), SparseFactorDense)
    assert loaded.get_layer("fc1").n_factors == 2 and loaded.get_layer("fc1").sparsity == 4
    for name in ("conv1", "fc3"):
        assert type(loaded.get_layer(name)) is type(original.get_layer(name))
        for a, b in zip(loaded.get_layer(name).get_weights(),
                        original.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)

    # The printed report: one row per layer and the totals of the saved model.
    rows = {line.split()[0]: line.split() for line in completed.stdout.splitlines() if line}
    assert rows["conv2"][2] == "compressed" and rows["conv1"][2] == "skipped"
    nonzero = sum(loaded.get_layer(n).count_nonzero_params() for n in ("conv2", "fc1", "fc2"))
    unchanged = sum(original.get_layer(n).count_params() for n in ("conv1", "fc3"))
    assert rows["total"][4] == f"{nonzero + unchanged:,}"
    assert f"wrote {output}" in completed.stdout

    _, (x_test, y_test) = mnist_small
    loaded.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    loss, accuracy = loaded.evaluate(x_test, y_test, verbose=0)
    assert np.isfinite(loss) and 0.0 <= accuracy <= 1.0
    np.testing.assert_allclose(loaded.predict(x_test[:8], verbose=0).sum(axis=1), 1.0,
                               rtol=1e-5)


@pytest.mark.slow
def test_export_writes_a_tflite_file_that_matches(compressed_run, tmp_path, mnist_small):
    _, model_path = compressed_run
    output = tmp_path / "lenet_psm.tflite"
    log = tmp_path / "export.log"
    with open(log, "w") as handle:  # both streams piped to a file, as in `... > log 2>&1`
        completed = run_command("export", model_path, output, stdout=handle,
                                stderr=subprocess.STDOUT)
    printed = log.read_text()
    assert completed.returncode == 0, printed[-2000:]
    assert not TENSORFLOW_LOG.search(printed), printed[-2000:]
    assert printed.endswith(f"wrote {output}; it runs with LiteRT and matches the Keras model.\n")
    assert f"file: {output.stat().st_size:,} bytes" in printed
    _, (x_test, _) = mnist_small
    model = keras.models.load_model(model_path)
    # float32 TFLite kernels against TF's: a few ulps of round-off per layer on outputs
    # of order 1; 1e-4 leaves room for that, far below a wrong weight (~1e-1).
    assert verify_tflite(output, model, x_test[:16]) < 1e-4

    # --verbose shows what the quiet run hid (the pattern above matches real output).
    verbose = run_command("export", model_path, output, "--overwrite", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert TENSORFLOW_LOG.search(verbose.stderr), verbose.stderr[-2000:]


@pytest.mark.slow
def test_methods_lists_every_method_with_options_and_paper():
    completed = run_command("methods")
    assert completed.returncode == 0, completed.stderr[-2000:]
    for name in keras_psm.available_methods():
        method = keras_psm.get_method(name)
        assert f"\n{name}: {method.description}\n" in f"\n{completed.stdout}"
        if method.paper:
            assert method.paper in completed.stdout
    assert "    n_factors     int, default 3" in completed.stdout


@pytest.mark.parametrize("arguments, message", [
    (("compress", "{missing}", "{out}"), "input model '{missing}' does not exist"),
    (("compress", "{garbage}", "{out}"), f"cannot load a Keras model from '{{garbage}}' "
                                         f"with {KERAS_NAME}"),
    (("compress", "{model}", "{out}", "--option", "sparsity=many"),
     "--option sparsity=many: method 'psm' expects int for 'sparsity'."),
])
@pytest.mark.slow
def test_errors_are_one_line_and_exit_nonzero(arguments, message, saved_lenet, tmp_path):
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip file" * 10)
    names = dict(missing=tmp_path / "missing.keras", garbage=garbage, out=tmp_path / "out.keras",
                 model=saved_lenet[0], tmp=tmp_path)
    completed = run_command(*(argument.format(**names) for argument in arguments))
    assert completed.returncode == 1
    lines = completed.stderr.splitlines()
    assert len(lines) == 1, completed.stderr  # no TensorFlow log line either
    assert lines[0].startswith("keras-psm: error: ")
    assert message.format(**names) in lines[0]
    assert completed.stdout == ""
    assert not (tmp_path / "out.keras").exists()


def test_usage_errors_and_help_in_process(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("compress", "export", "methods", "demo"):
        assert command in out
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--help"])
    assert "most accurate one with at least --min-ratio" in " ".join(
        capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compress"])
    assert exit_info.value.code == 2  # argparse: missing IN and OUT
    assert "required: IN, OUT.keras" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, message", [
    (["compress", "{model}", "{tmp}/out.h5"], "output model '{tmp}/out.h5' must end in .keras."),
    (["compress", "{model}", "{tmp}/no/out.keras"], "folder '{tmp}/no' does not exist."),
    (["compress", "{model}", "{tmp}/o.keras", "--method", "nope"], "`method` must be one of"),
    (["compress", "{model}", "{tmp}/o.keras", "--method", "svd", "--factors", "2"],
     "--factors: method 'svd' has no option 'n_factors'"),
    (["compress", "{model}", "{tmp}/o.keras", "--option", "colour=red"],
     "method 'psm' has no option 'colour'; its options are n_factors, sparsity"),
    (["compress", "{model}", "{tmp}/o.keras", "--option", "max_iter"],
     "--option 'max_iter': expected key=value"),
    (["compress", "{model}", "{tmp}/o.keras", "--option", "sparsity=0"],
     "PSMConfig: `sparsity` must be >= 1, got 0."),
    (["compress", "{model}", "{tmp}/o.keras", "--layers", "pool1"],
     "layer 'pool1' cannot be replaced"),
    (["compress", "{model}", "{tmp}/o.keras", "--method", "svd", "--option", "rank_ratio=2.0"],
     "SVDConfig: `rank_ratio` must be"),
    (["export", "{model}", "{tmp}/model.tfl"], "output file '{tmp}/model.tfl' must end in .tflite"),
    (["demo", "--methods", "nope"], "`method` must be one of"),
    (["demo", "--output", "{model}"], "--output '{model}' exists and is not a folder."),
])
def test_more_errors_in_process(arguments, message, saved_lenet, tmp_path, capsys):
    names = dict(model=saved_lenet[0], tmp=tmp_path)
    assert cli.main([a.format(**names) for a in arguments]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-psm: error: ")
    assert message.format(**names) in lines[0]
    assert not list(tmp_path.iterdir())


def test_options_are_typed_by_the_config_dataclass():
    psm = keras_psm.get_method("psm")
    options = cli.method_options(psm, ["rank=none", "hierarchical=yes", "tol=1e-3",
                                       "max-iter=50"])
    assert options == dict(rank=None, hierarchical=True, tol=1e-3, max_iter=50)
    assert type(options["max_iter"]) is int and type(options["tol"]) is float
    assert cli.method_options(psm, ["rank=7"]) == dict(rank=7)
    with pytest.raises(cli.CommandError, match="expects bool for 'hierarchical'"):
        cli.method_options(psm, ["hierarchical=maybe"])
    with pytest.raises(cli.CommandError, match="expects int or none for 'rank'"):
        cli.method_options(psm, ["rank=seven"])

    assert cli.parse_value("4, 4", Optional[Tuple[int, int]]) == (4, 4)
    assert cli.parse_value("none", Optional[Tuple[int, int]]) is None
    assert cli.type_name(Optional[Tuple[int, ...]]) == "comma-separated int or none"
    assert cli.parse_value("2.5", float) == 2.5
    with pytest.raises(ValueError):
        cli.parse_value("2.5", int)


@pytest.mark.slow
def test_a_file_of_the_other_keras_gets_a_hint(saved_lenet, tmp_path, capsys):
    assert cli.saved_by(saved_lenet[0]) == KERAS_NAME
    (tmp_path / "plain.txt").write_text("hello")
    assert cli.saved_by(tmp_path / "plain.txt") is None

    other = tmp_path / "other.keras"
    env = dict(os.environ, TF_USE_LEGACY_KERAS="0" if LEGACY_KERAS else "1")
    code = ("from keras_psm.backend import keras; inputs = keras.Input((4,)); "
            f"keras.Model(inputs, keras.layers.Dense(2)(inputs)).save({str(other)!r})")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                   timeout=300)
    assert cli.saved_by(other) == ("keras" if LEGACY_KERAS else "tf_keras")
    assert cli.main(["compress", str(other), str(tmp_path / "out.keras")]) == 1
    line, = capsys.readouterr().err.splitlines()
    assert line.endswith("unset TF_USE_LEGACY_KERAS to load it." if LEGACY_KERAS
                         else "set TF_USE_LEGACY_KERAS=1 to load it.")


# ----------------------------------------------------------------------------
# No lost files: the input is never overwritten, an existing output only with
# --overwrite, and an interrupted write leaves the previous file as it was.

def only_error_line(capsys):
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-psm: error: "), lines
    return lines[0]


@pytest.mark.parametrize("command, suffix, through", [
    ("compress", ".keras", "same path"),
    ("compress", ".keras", "symbolic link"),
    ("compress", ".keras", "hard link"),
    ("export", ".tflite", "symbolic link"),  # an export's own name ends in .tflite
    ("export", ".tflite", "hard link"),
])
def test_the_input_file_is_never_the_output(command, suffix, through, saved_lenet, tmp_path,
                                            capsys):
    source = tmp_path / "trained.keras"
    source.write_bytes(saved_lenet[0].read_bytes())
    contents = source.read_bytes()
    output = tmp_path / f"out{suffix}"
    if through == "same path":
        output = source
    elif through == "symbolic link":
        output.symlink_to(source)
    else:
        os.link(source, output)
    for extra in ([], ["--overwrite"]):  # --overwrite does not allow it either
        assert cli.main([command, str(source), str(output), *extra]) == 1
        assert f"is the input file '{source}'" in only_error_line(capsys)
        assert source.read_bytes() == contents


@pytest.mark.parametrize("command, suffix", [("compress", ".keras"), ("export", ".tflite")])
def test_an_existing_output_is_kept_without_overwrite(command, suffix, saved_lenet, tmp_path,
                                                      capsys):
    output = tmp_path / f"previous{suffix}"
    output.write_bytes(b"previous result")
    assert cli.main([command, str(saved_lenet[0]), str(output)]) == 1
    assert only_error_line(capsys).endswith(
        f"output {'model' if command == 'compress' else 'file'} '{output}' exists; "
        "pass --overwrite to replace it.")
    assert output.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == [output.name]


def test_overwrite_replaces_an_existing_output(saved_lenet, tmp_path, capsys):
    output = tmp_path / "small.keras"
    output.write_bytes(b"previous result")
    assert cli.main(["compress", str(saved_lenet[0]), str(output), "--quiet", "--layers", "fc1",
                     "--factors", "2", "--sparsity", "4", "--option", "max_iter=5",
                     "--overwrite"]) == 0
    assert f"wrote {output}" in capsys.readouterr().out
    assert isinstance(keras.models.load_model(output).get_layer("fc1"), SparseFactorDense)
    assert os.listdir(tmp_path) == [output.name]


def write_half_then_fail(path):
    with open(path, "wb") as handle:
        handle.write(b"PK\x03\x04 half a file")
    raise OSError(28, "No space left on device")


def test_an_interrupted_save_keeps_the_previous_model(saved_lenet, tmp_path, capsys,
                                                      monkeypatch):
    output = tmp_path / "small.keras"
    output.write_bytes(saved_lenet[0].read_bytes())
    previous = output.read_bytes()
    monkeypatch.setattr(keras.Model, "save",
                        lambda model, path, *args, **kwargs: write_half_then_fail(path))
    assert cli.main(["compress", str(saved_lenet[0]), str(output), "--quiet", "--layers", "fc1",
                     "--factors", "2", "--sparsity", "4", "--option", "max_iter=5",
                     "--overwrite"]) == 1
    assert "No space left on device" in only_error_line(capsys)
    assert output.read_bytes() == previous
    assert os.listdir(tmp_path) == [output.name]  # no temporary file left behind


def test_an_interrupted_export_keeps_the_previous_file(saved_lenet, tmp_path, capsys,
                                                       monkeypatch):
    output = tmp_path / "model.tflite"
    output.write_bytes(b"a good TFLite file")
    monkeypatch.setattr(cli, "to_tflite",
                        lambda model, path, **options: write_half_then_fail(path))
    assert cli.main(["export", str(saved_lenet[0]), str(output), "--overwrite"]) == 1
    assert "No space left on device" in only_error_line(capsys)
    assert output.read_bytes() == b"a good TFLite file"
    assert os.listdir(tmp_path) == [output.name]


# ----------------------------------------------------------------------------
# Only its own output: the entry point keras_psm_cli hides TensorFlow's C++ logs.

def test_verbose_is_found_as_argparse_would_accept_it():
    assert keras_psm_cli.verbose_requested(["demo", "--quick", "--verbose"])
    assert keras_psm_cli.verbose_requested(["export", "a.keras", "a.tflite", "--verb"])
    assert not keras_psm_cli.verbose_requested(["compress", "a.keras", "b.keras", "--quiet"])
    assert not keras_psm_cli.verbose_requested(["compress", "--", "--verbose", "b.keras"])
    assert not keras_psm_cli.verbose_requested(["-v"])  # no short form: argparse refuses it
    args = cli.build_parser().parse_args(["export", "a.keras", "a.tflite", "--verb"])
    assert args.verbose


@pytest.mark.slow
def test_keras_psm_cli_module_points_to_the_entry_point():
    # By the time `python -m keras_psm.cli` runs, TensorFlow has loaded: it says where to go.
    completed = subprocess.run([sys.executable, "-m", "keras_psm.cli", "--help"],
                               capture_output=True, text=True, timeout=300,
                               env=command_environment())
    assert completed.returncode == 1
    assert "python -m keras_psm_cli" in completed.stderr.splitlines()[-1]
    assert completed.stdout == ""


def test_native_writes_to_standard_error_are_hidden_while_importing():
    code = ("import os, sys; from keras_psm_cli import native_stderr_hidden\n"
            "with native_stderr_hidden():\n"
            "    os.write(2, b'native line while loading\\n')\n"
            "os.write(2, b'native line afterwards\\n'); print('own line', file=sys.stderr)")
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=60, env=command_environment())
    assert completed.stderr == "native line afterwards\nown line\n"


@pytest.mark.slow
def test_worker_processes_print_nothing(saved_lenet, tmp_path):
    output = tmp_path / "lenet_psm.keras"
    completed = run_command("compress", saved_lenet[0], output, "--jobs", "2", "--factors", "2",
                            "--sparsity", "4", "--option", "max_iter=5", "--layers", "fc1", "fc2")
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stderr == ""  # each spawned worker imports TensorFlow too
    assert f"wrote {output}" in completed.stdout


@pytest.mark.parametrize("on_terminal", [True, False])
def test_progress_bars_only_on_a_terminal(on_terminal, saved_lenet, tmp_path, capsys,
                                          monkeypatch):
    monkeypatch.setattr(cli, "terminal", lambda: on_terminal)
    output = tmp_path / "small.keras"
    assert cli.main(["compress", str(saved_lenet[0]), str(output), "--layers", "fc1",
                     "--factors", "2", "--sparsity", "4", "--option", "max_iter=5"]) == 0
    captured = capsys.readouterr()
    assert ("1/1 [" in captured.err) is on_terminal  # tqdm's "1/1 [00:00<00:00, ...]"
    # The per-layer report is printed either way.
    assert re.search(r"^fc1 +Dense +compressed", captured.out, re.MULTILINE)


# ----------------------------------------------------------------------------
# finetune: distillation from the original, written like compress writes.

@pytest.fixture
def finetune_files(saved_lenet, mnist_small, tmp_path):
    """A compressed LeNet (fc1 as PSM), its teacher and 128 training digits, as files."""
    path, teacher = saved_lenet
    small, _ = keras_psm.compress(teacher, "psm", n_factors=2, sparsity=4, max_iter=5,
                                  layers=["fc1"], verbose=0)
    student = tmp_path / "small.keras"
    small.save(student)
    (x, y), _ = mnist_small
    data = tmp_path / "train.npz"
    np.savez(data, x=x[:128], y=y[:128])
    return student, path, data


def test_finetune_writes_the_student(finetune_files, mnist_small, tmp_path, capsys):
    student, teacher, data = finetune_files
    output = tmp_path / "tuned.keras"
    before = student.read_bytes()
    assert cli.main(["finetune", str(student), str(output), "--teacher", str(teacher),
                     "--data", str(data), "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "picked " in printed and f"wrote {output}: fine-tuned 1 epoch(s)" in printed
    assert "distilled from" in printed and "(kl, T=4, alpha=1)" in printed
    tuned = keras.models.load_model(output)
    assert isinstance(tuned.get_layer("fc1"), SparseFactorDense)
    assert student.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted(["small.keras", "train.npz", "tuned.keras"])


@pytest.mark.parametrize("which", ["input", "teacher"])
def test_finetune_never_writes_over_its_inputs(which, finetune_files, capsys):
    student, teacher, data = finetune_files
    source = student if which == "input" else teacher
    contents = source.read_bytes()
    for extra in ([], ["--overwrite"]):  # --overwrite does not allow it either
        assert cli.main(["finetune", str(student), str(source), "--teacher", str(teacher),
                         "--data", str(data), *extra]) == 1
        assert f"is the input file '{source}'" in only_error_line(capsys)
        assert source.read_bytes() == contents


def test_an_interrupted_finetune_keeps_the_previous_model(finetune_files, tmp_path, capsys,
                                                          monkeypatch):
    student, teacher, data = finetune_files
    output = tmp_path / "tuned.keras"
    output.write_bytes(b"previous result")
    monkeypatch.setattr(keras.Model, "save",
                        lambda model, path, *args, **kwargs: write_half_then_fail(path))
    assert cli.main(["finetune", str(student), str(output), "--teacher", str(teacher),
                     "--data", str(data), "--epochs", "1", "--learning-rate", "1e-3",
                     "--overwrite"]) == 1
    assert "No space left on device" in only_error_line(capsys)
    assert output.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == sorted(["small.keras", "train.npz", "tuned.keras"])


def test_finetune_distils_in_the_first_epochs(finetune_files, tmp_path, capsys):
    student, teacher, data = finetune_files
    output = tmp_path / "tuned.keras"
    assert cli.main(["finetune", str(student), str(output), "--teacher", str(teacher),
                     "--data", str(data), "--epochs", "2", "--distill-epochs", "1",
                     "--learning-rate", "1e-3"]) == 0
    assert "(kl, T=4, alpha=1, in the first 1 epoch(s))" in capsys.readouterr().out
    assert cli.main(["finetune", str(student), str(output), "--teacher", str(teacher),
                     "--data", str(data), "--distill-epochs", "0", "--overwrite"]) == 1
    assert "--distill-epochs must be an integer >= 1, got 0" in only_error_line(capsys)


def test_finetune_data_errors(finetune_files, tmp_path, capsys):
    student, teacher, _ = finetune_files
    data = tmp_path / "unnamed.npz"
    np.savez(data, np.zeros((4, 28, 28, 1)))
    assert cli.main(["finetune", str(student), str(tmp_path / "out.keras"), "--teacher",
                     str(teacher), "--data", str(data)]) == 1
    assert "give the inputs as 'x' and the labels as 'y'" in only_error_line(capsys)
