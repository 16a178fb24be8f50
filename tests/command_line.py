"""Running the ``keras-psm`` command as a user does, and what it must never print."""

import os
import re
import subprocess
import sys

import keras_psm

#: Lines TensorFlow, its C++ runtime (absl log lines, TFLite converter) and
#: absl write when nothing silences them; the command prints none of them.
TENSORFLOW_LOG = re.compile(
    r"^[IWEF]\d{4} |^WARNING: All log messages before absl|^To enable the following instructions"
    r"|^\d{4}-\d\d-\d\d [\d:.]+: [IWEF] tensorflow|^WARNING:(absl|tensorflow):"
    r"|trackable_obj|oneDNN custom operations", re.MULTILINE)


def command_environment():
    """The environment in which ``python -m keras_psm_cli`` imports the keras_psm under test."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(keras_psm.__file__)))
    path = os.environ.get("PYTHONPATH")
    # A user's shell, not this process: JAX, once imported here, sets TF_CPP_MIN_LOG_LEVEL=1
    # for it, and the command keeps a level the user set.
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return dict(environment, PYTHONPATH=root if not path else os.pathsep.join([root, path]))


def run_command(*arguments, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600):
    """``keras-psm ARGUMENTS`` as a user runs it, output piped (not a terminal).

    The ``keras-psm`` script calls ``keras_psm_cli.main``, as ``python -m keras_psm_cli`` does.
    """
    return subprocess.run([sys.executable, "-m", "keras_psm_cli", *map(str, arguments)],
                          stdout=stdout, stderr=stderr, text=True, timeout=timeout,
                          env=command_environment())
