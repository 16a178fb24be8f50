"""Pieces of large products on every core (keras_psm.factorize.threads)."""

import multiprocessing
import os
import threading

import numpy as np
import pytest
import scipy.sparse as sps

from keras_psm.factorize import threads
from keras_psm.factorize.threads import map_on_cores, sparse_times


@pytest.fixture
def three_cores(monkeypatch):
    """Split every product in three pieces, even on a one-core machine."""
    monkeypatch.setattr(threads, "CORES", 3)
    monkeypatch.setattr(threads, "PARALLEL_MIN_WORK", 0)


@pytest.fixture
def panels_of_three(monkeypatch):
    """Multiply every dense matrix in column panels of three columns."""
    monkeypatch.setattr(threads, "PANELS_MIN_BYTES", 0)
    monkeypatch.setattr(threads, "PANEL_BYTES", 0)
    monkeypatch.setattr(threads, "PANEL_MIN_COLUMNS", 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("columns", [None, 1, 7])  # None: a vector
def test_sparse_times_matches_the_scipy_product(three_cores, dtype, columns):
    rng = np.random.default_rng(0)
    entries = sps.random(50, 40, density=0.1, dtype=dtype, random_state=1).toarray()
    entries[10:20] = 0  # empty rows: pieces of equal nonzero counts differ in rows
    sparse = sps.csr_matrix(entries)
    dense = rng.standard_normal(40 if columns is None else (40, columns)).astype(dtype)
    result = sparse_times(sparse, dense)
    assert result.dtype == dtype and result.shape == (sparse @ dense).shape
    # The same multiply-adds in the same order per row: equal to the last bit.
    np.testing.assert_array_equal(result, sparse @ dense)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_times_in_column_panels_matches_the_scipy_product(three_cores, panels_of_three,
                                                                  dtype):
    rng = np.random.default_rng(0)
    sparse = sps.random(50, 40, density=0.1, format="csr", dtype=dtype, random_state=1)
    dense = rng.standard_normal((40, 7)).astype(dtype)  # panels of 3, 3 and 1 columns
    assert threads.panel_columns(dense) == 3
    result = sparse_times(sparse, dense)
    assert result.dtype == dtype
    # Each entry is the same row of multiply-adds, in the same order: equal to the last bit.
    np.testing.assert_array_equal(result, sparse @ dense)
    np.testing.assert_array_equal(sparse_times(sparse, dense[:, 0]), sparse @ dense[:, 0])


def test_panels_fit_a_cache_and_only_large_matrices_are_cut():
    def columns(shape, dtype):  # broadcast arrays: the shape and size without the memory
        return threads.panel_columns(np.broadcast_to(np.zeros((), dtype), shape))

    assert columns((4096, 4096), np.float32) == 128  # 2 MB panels of a 64 MB matrix
    assert columns((4096, 4096), np.float64) == 64
    assert columns((25088, 4096), np.float32) == 32  # at least 32 columns
    assert columns((1000, 1000), np.float64) == 1000  # 8 MB: one panel
    assert threads.panel_columns(np.zeros(10)) == 1


def test_sparse_times_with_more_cores_than_rows(three_cores):
    sparse = sps.csr_matrix(np.array([[1.0, 2.0], [0.0, 3.0]]))
    np.testing.assert_array_equal(sparse_times(sparse, np.eye(2)), sparse.toarray())


def test_map_on_cores_keeps_order_and_runs_nested_calls_on_the_calling_thread(three_cores):
    def inner_threads(item):
        names = map_on_cores(lambda _: threading.current_thread().name, range(4))
        return item * 10, set(names)

    results = map_on_cores(inner_threads, range(6))
    assert [value for value, _ in results] == [0, 10, 20, 30, 40, 50]
    # Each nested map ran all its calls on the thread of the piece that made it.
    assert all(len(names) == 1 for _, names in results)


def test_map_on_cores_reuses_its_threads(three_cores):
    idents = set()
    for _ in range(20):
        idents.update(map_on_cores(lambda _: threading.get_ident(), range(6)))
    # One pool for the process: 20 maps of 6 calls ran on at most the pool's threads.
    assert 2 <= len(idents) <= max(threads.CORES, threads._pool._max_workers)


def _map_in_child(queue):
    queue.put(map_on_cores(lambda x: x * x, range(5)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_map_on_cores_works_in_a_forked_child(three_cores):
    map_on_cores(abs, range(4))  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_map_in_child, args=(queue,))
    child.start()
    # A child given the parent's pool (whose threads it does not have) would wait forever.
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    assert queue.get(timeout=5) == [0, 1, 4, 9, 16]
