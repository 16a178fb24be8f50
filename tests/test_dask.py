"""Fitting the layers on a Dask cluster through ``Client.get_executor()``."""

import numpy as np
import pytest

import keras_psm

distributed = pytest.importorskip("distributed", reason="needs the [distributed] extra")


@pytest.mark.slow
def test_dask_cluster_executor_gives_the_serial_result(make_lenet):
    model = make_lenet()
    options = dict(n_factors=2, sparsity=3, max_iter=20, verbose=0)
    serial, serial_report = keras_psm.compress(model, **options)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)  # a loaded machine starts them late
        model_on_cluster, report = keras_psm.compress(model, executor=client.get_executor(),
                                                      **options)
        workers = client.run(lambda: "keras_psm.compress" in __import__("sys").modules)
    assert len(workers) == 2 and any(workers.values())  # the fits ran in the worker processes
    # palm4MSA is deterministic for a given seed; the workers run the same NumPy code.
    for a, b in zip(serial.get_weights(), model_on_cluster.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [row.name for row in report.compressed] == [
        row.name for row in serial_report.compressed]
