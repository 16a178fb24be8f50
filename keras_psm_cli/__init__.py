"""Entry point of the ``keras-psm`` command: TensorFlow's log lines are hidden before it loads.

TensorFlow's C++ libraries write log lines to standard error (``I0000 ...
port.cc``, ``cpu_feature_guard``, converter sessions, arithmetic-op
estimates) and read their log level only once, when they load; a few lines
come out while loading, before any level applies. ``keras_psm`` imports
TensorFlow, so this package sits outside it: importing it loads nothing
heavy. Unless ``--verbose`` is given, ``main`` sets ``TF_CPP_MIN_LOG_LEVEL``
(fatal errors still show; a value already set is kept), imports ``keras_psm`` with file descriptor 2
pointed at the null device, then runs ``keras_psm.cli.main``, which hides
TensorFlow's Python log records and warnings.
"""

import contextlib
import os
import sys

#: ``TF_CPP_MIN_LOG_LEVEL`` of a quiet run: 0 shows all, 1 hides INFO, 2 also
#: WARNING, 3 also ERROR; FATAL always shows.
QUIET_LOG_LEVEL = "3"


def verbose_requested(argv):
    """Whether ``argv`` has ``--verbose``, or an abbreviation argparse accepts (``--verb``)."""
    for argument in argv:
        if argument == "--":
            return False
        if len(argument) >= 3 and "--verbose".startswith(argument):
            return True
    return False


def _stderr_to_null():
    """Point file descriptor 2 at the null device; returns a duplicate of the old one."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    os.close(null)
    return saved


@contextlib.contextmanager
def native_stderr_hidden():
    """Hide what C and C++ code writes to standard error during the block.

    Python's own ``sys.stderr`` writes are hidden too; the block should only import.
    """
    saved = _stderr_to_null()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def quiet_worker():
    """Process-pool initializer: a worker's TensorFlow never writes to the terminal.

    Workers send results and exceptions back through the pool, never through
    standard error, so it stays pointed at the null device for their lifetime.
    """
    os.close(_stderr_to_null())


def main(argv=None):
    """Run the ``keras-psm`` command with ``argv`` (default ``sys.argv[1:]``); the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if verbose_requested(argv):
        from keras_psm import cli
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_LOG_LEVEL)
        with native_stderr_hidden():
            from keras_psm import cli
    return cli.main(argv)
