"""The README's commands and code as a newcomer runs them."""

import os
import re
import shlex
import tomllib

import numpy as np
import pytest

from keras_psm.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as file:
        return file.read()


def code_block(text, after):
    """The first fenced code block that follows the line ``after``."""
    start = text.index(after)
    match = re.compile(r"^```\w*\n(.*?)^```$", re.DOTALL | re.MULTILINE).search(text, start)
    return match.group(1)


def section(text, title):
    """The README section ``## title``, up to the next ``## `` heading."""
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.slow
@pytest.mark.tensorflow  # the quickstart ends with to_tflite
def test_quickstart_runs_on_bundled_data(tmp_path, monkeypatch, capsys):
    code = code_block(read("README.md"), "<!-- quickstart")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md quickstart", "exec"), namespace)
    printed = capsys.readouterr().out
    dense, small = map(float, re.search(
        r"test accuracy: dense ([\d.]+), compressed ([\d.]+)", printed).groups())
    # One run gave 0.921 and 0.908 on 1,000 test digits; 0.85 leaves room for
    # seeds and thread counts while failing a fit that went wrong (0.1 is chance).
    assert dense > 0.85 and small > 0.85
    file_bytes, dense_bytes = (int(count.replace(",", "")) for count in re.search(
        r"file: ([\d,]+) bytes, dense original: ([\d,]+) bytes", printed).groups())
    assert file_bytes == os.path.getsize("small.tflite")
    # x38 fewer nonzeros, each stored as 8 bytes (value, index) against 4 dense: x19 expected.
    assert dense_bytes / file_bytes > 10
    small_model, x_test, keras = namespace["small"], namespace["x_test"], namespace["keras"]
    reloaded = keras.models.load_model("small.keras")
    # float32 outputs of the same graph after a save/load round trip: 1e-5 relative.
    np.testing.assert_allclose(reloaded.predict(x_test[:32], verbose=0),
                               small_model.predict(x_test[:32], verbose=0), rtol=1e-5, atol=1e-6)


def test_command_line_examples_parse():
    block = code_block(section(read("README.md"), "Command line"), "```bash")
    commands = [shlex.split(line.split("#")[0]) for line in block.splitlines()]
    assert len(commands) >= 4
    parser = build_parser()
    for command in commands:
        assert command[0] == "keras-psm"
        parser.parse_args(command[1:])  # exits with status 2 on an unknown option


def test_factors_and_n_factors_are_one_option():
    parser = build_parser()
    short = parser.parse_args(["compress", "in.keras", "out.keras", "--factors", "2"])
    long = parser.parse_args(["compress", "in.keras", "out.keras", "--n-factors", "2"])
    assert short.factors == long.factors == 2


def test_install_lines_match_ci_and_extras_exist():
    readme = code_block(section(read("README.md"), "Set up, run, test"), "```bash")
    installs = [line.split("#")[0].strip() for line in readme.splitlines()
                if line.startswith("python -m pip install")]
    assert installs[0] == "python -m pip install -e ."  # the minimal install comes first
    ci_lines = [line.strip() for line in read(".ci/run").splitlines()]
    assert all(line in ci_lines for line in installs)
    extras = set(tomllib.loads(read("pyproject.toml"))["project"]["optional-dependencies"])
    for line in installs[1:]:
        assert set(re.search(r"\[(.*)\]", line).group(1).split(",")) <= extras
