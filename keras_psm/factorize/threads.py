"""Independent pieces of a large NumPy/SciPy computation, run on every CPU core.

SciPy's sparse-times-dense kernel is single-threaded, and so are NumPy's
partition, copies and element-wise operations, but all of them release the
GIL: pieces of one product (row blocks of the sparse matrix) or of one
projection (strips of the candidate) run at once in threads.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# CPU cores this process may run on (its affinity mask where the OS has one).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

# A sparse product with fewer multiply-adds runs on the calling thread: below about
# 4 M multiply-adds (a few ms) starting threads costs more than it saves.
PARALLEL_MIN_WORK = 2 ** 22

# Pieces of a parallel product per core (see sparse_times).
PIECES_PER_CORE = 2

# A dense operand of more than PANELS_MIN_BYTES (half the 32 MB L3 cache of the 2-core
# AMD EPYC this was measured on) is multiplied in column panels of about PANEL_BYTES
# (a core's 1 MB L2 cache, twice), at least PANEL_MIN_COLUMNS wide: each nonzero of the
# sparse matrix then reads its row of the panel from cache instead of memory. Against
# row pieces, on splincol K=14 factors: (25,088 x 4,096) @ (4,096 x 4,096) 2.4-3.0x
# faster, (4,096 x 4,096) @ (4,096 x 4,096) 2.0-2.3x, (4,096 x 25,088) @ (25,088 x 4,096)
# 1.6x in float32; below 16 MB panels gained nothing. Narrower panels than 32 columns
# were slower: the kernel's inner loop over a row's columns is then too short.
PANELS_MIN_BYTES = 2 ** 24
PANEL_BYTES = 2 ** 21
PANEL_MIN_COLUMNS = 32


_piece = threading.local()
# One pool of CORES threads for the whole process, made on first use. Starting threads
# for every product cost about a tenth of a 4,608 x 512 palm4MSA iteration (0.066 s) on
# 2 cores.
_pool = None
_pool_lock = threading.Lock()


def _forget_pool():
    """In a forked child: it has none of its parent's threads, so it makes its own pool."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _executor():
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(CORES, thread_name_prefix="keras_psm")
        return _pool


def map_on_cores(function, items):
    """``[function(item) for item in items]``, the calls spread over ``CORES`` threads.

    Called from inside one of those calls, it runs on the calling thread: the
    cores are already busy.
    """
    items = list(items)
    if CORES < 2 or len(items) < 2 or getattr(_piece, "running", False):
        return [function(item) for item in items]

    def run(item):
        _piece.running = True
        try:
            return function(item)
        finally:
            _piece.running = False

    return list(_executor().map(run, items))


def sparse_times(sparse, dense):
    """``sparse @ dense`` for a CSR matrix, split over the cores when the product has at
    least ``PARALLEL_MIN_WORK`` multiply-adds.

    A large ``dense`` goes in column panels (``panel_columns``), one core per panel.
    Otherwise the rows of ``sparse`` go in ``PIECES_PER_CORE`` pieces per core of equal
    nonzero counts: a core that another process slows down takes fewer pieces, and each
    piece's product (a temporary before it is copied into the result) stays small.
    Every entry is the same sum in the same order as SciPy's ``sparse @ dense``.
    """
    columns = 1 if dense.ndim == 1 else dense.shape[1]
    width = panel_columns(dense)
    if width < columns and sparse.nnz * columns >= PARALLEL_MIN_WORK:
        result = np.empty((sparse.shape[0], columns),
                          dtype=np.result_type(sparse.dtype, dense.dtype))

        def multiply_panel(start):
            panel = slice(start, start + width)
            result[:, panel] = sparse @ np.ascontiguousarray(dense[:, panel])

        map_on_cores(multiply_panel, range(0, columns, width))
        return result
    pieces = min(CORES * PIECES_PER_CORE, sparse.shape[0])
    if CORES < 2 or pieces < 2 or sparse.nnz * columns < PARALLEL_MIN_WORK:
        return sparse @ dense
    bounds = np.searchsorted(sparse.indptr, np.linspace(0, sparse.nnz, pieces + 1))
    bounds[0], bounds[-1] = 0, sparse.shape[0]
    result = np.empty((sparse.shape[0],) + dense.shape[1:],
                      dtype=np.result_type(sparse.dtype, dense.dtype))

    def multiply(piece):
        start, stop = bounds[piece], bounds[piece + 1]
        result[start:stop] = sparse[start:stop] @ dense

    map_on_cores(multiply, range(pieces))
    return result


def panel_columns(dense):
    """Columns per panel of a 2-D ``dense`` operand of more than ``PANELS_MIN_BYTES``
    (about ``PANEL_BYTES`` each, at least ``PANEL_MIN_COLUMNS``); all of its columns
    (one panel) for a smaller one or a vector."""
    if dense.ndim == 1 or dense.nbytes <= PANELS_MIN_BYTES:
        return 1 if dense.ndim == 1 else dense.shape[1]
    return max(PANEL_MIN_COLUMNS, PANEL_BYTES // (dense.shape[0] * dense.itemsize))
