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


_piece = threading.local()


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

    with ThreadPoolExecutor(min(CORES, len(items))) as pool:
        return list(pool.map(run, items))


def sparse_times(sparse, dense):
    """``sparse @ dense`` for a CSR matrix, its rows split over the cores when the product
    has at least ``PARALLEL_MIN_WORK`` multiply-adds.

    The rows go in ``PIECES_PER_CORE`` pieces per core of equal nonzero counts:
    a core that another process slows down takes fewer pieces, and each piece's
    product (a temporary before it is copied into the result) stays small.
    """
    columns = 1 if dense.ndim == 1 else dense.shape[1]
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
