"""Files written whole or not at all.

Every file the package writes (``.keras`` models, ``.tflite`` files, the
demo's CSV and PNG) is first written to a temporary file in the same folder,
then renamed over its final name with ``os.replace``, which is atomic on
POSIX and Windows within one file system. A write interrupted midway
(Ctrl-C, a full disk, a serializer that raises) leaves the previous file,
if any, untouched and no temporary file behind.
"""

import contextlib
import os
import secrets


def temporary_name(path):
    """A fresh hidden name next to ``path`` that ends like it (``.m-1a2b3c4d.tmp.keras``).

    The suffix is kept because writers choose their format from it (Keras
    saves ``.keras`` archives only to names ending in ``.keras``, Matplotlib
    picks PNG from ``.png``).
    """
    directory, name = os.path.split(path)
    stem, suffix = os.path.splitext(name)
    return os.path.join(directory, f".{stem}-{secrets.token_hex(4)}.tmp{suffix}")


@contextlib.contextmanager
def write_atomically(path):
    """Yield a temporary path to write; it replaces ``path`` when the block succeeds.

        with write_atomically("model.keras") as temporary:
            model.save(temporary)

    A link at ``path`` is followed: the file it points to is replaced and
    the link kept. The written file is flushed to disk (``fsync``) before
    the rename. If the block raises (``KeyboardInterrupt`` included), the
    temporary file is removed, ``path`` is left as it was, and the
    exception propagates.
    """
    target = os.path.realpath(os.fspath(path))
    temporary = temporary_name(target)
    try:
        yield temporary
        with open(temporary, "r+b") as handle:  # writable: Windows fsyncs only those
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
