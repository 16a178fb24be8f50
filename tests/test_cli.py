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

#: Lines TensorFlow's C++ runtime writes to stderr when it is imported on a
#: machine without CUDA (absl log lines), before the command's code runs.
NATIVE_LOG = re.compile(
    r"^([IWEF]\d{4} |WARNING: All log messages before absl|To enable the following instructions)")


def run_command(*arguments):
    script = os.path.join(os.path.dirname(sys.executable), "keras-psm")
    assert os.path.exists(script), f"{script} is missing: install the package (pip install -e .)"
    return subprocess.run([script, *map(str, arguments)], capture_output=True, text=True,
                          timeout=600)


def own_stderr_lines(completed):
    return [line for line in completed.stderr.splitlines() if line and not NATIVE_LOG.match(line)]


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
    completed = run_command("export", model_path, output)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert f"wrote {output}" in completed.stdout
    assert f"file: {output.stat().st_size:,} bytes" in completed.stdout
    _, (x_test, _) = mnist_small
    model = keras.models.load_model(model_path)
    assert verify_tflite(output, model, x_test[:16]) < 1e-4


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
    lines = own_stderr_lines(completed)
    assert len(lines) == 1, completed.stderr
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
