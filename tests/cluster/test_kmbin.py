"""fairseq / GSLM ``km.bin`` files: centroids read without running the pickle; export read back by sklearn."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from teal_cli.errors import CodecError
from teal_cli.cluster.kmbin import read_centroids, read_estimator, write_km
from helpers import require

sklearn_cluster = require("sklearn.cluster")
joblib = require("joblib")


@pytest.fixture(scope="module")
def fitted():
    """A MiniBatchKMeans fitted the way fairseq's learn_kmeans.py does (small)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    km = sklearn_cluster.MiniBatchKMeans(n_clusters=16, init="k-means++", max_iter=20, batch_size=200, tol=0.0,
                                         max_no_improvement=100, n_init=3, reassignment_ratio=0.0, random_state=0)
    km.fit(x)
    return km, x


@pytest.mark.parametrize("how", ["joblib", "joblib-zlib", "joblib-gzip", "joblib-xz", "pickle2", "pickle5"])
def test_reads_real_sklearn_files(tmp_path, fitted, how):
    km, _ = fitted
    path = tmp_path / "km.bin"
    if how == "joblib":
        joblib.dump(km, path)  # fairseq / GSLM
    elif how.startswith("joblib-"):
        joblib.dump(km, path, compress=(how.split("-")[1], 3))
    else:
        with open(path, "wb") as f:
            pickle.dump(km, f, protocol=int(how[-1]))
    centers = read_centroids(path)
    assert centers.dtype == torch.float32
    np.testing.assert_array_equal(centers.numpy(), km.cluster_centers_.astype(np.float32))
    assert read_estimator(path).n_clusters == 16


class Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_refuses_code(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"cluster_centers_": Boom()}))
    with pytest.raises(CodecError, match="refusing to load"):
        read_centroids(path)
    assert not (tmp_path / "pwned").exists()
    joblib.dump({"x": np.zeros(3)}, tmp_path / "notkm.bin")
    with pytest.raises(CodecError, match="refusing|no scikit-learn KMeans"):
        read_centroids(tmp_path / "notkm.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(CodecError):
        read_centroids(tmp_path / "junk.bin")


def test_export_is_a_working_sklearn_estimator(tmp_path, fitted):
    km, x = fitted
    centers = torch.from_numpy(km.cluster_centers_.astype(np.float32))
    path = write_km(tmp_path / "km.bin", centers, seed=0)
    loaded = joblib.load(path)
    assert type(loaded).__name__ == "MiniBatchKMeans" and loaded.n_clusters == 16
    np.testing.assert_array_equal(loaded.cluster_centers_, centers.numpy())
    np.testing.assert_array_equal(loaded.predict(x), km.predict(x))
    with open(path, "rb") as f:
        assert type(pickle.load(f)).__name__ == "MiniBatchKMeans"
    torch.testing.assert_close(read_centroids(path), centers, rtol=0, atol=0)  # and back through our reader


def test_export_loads_in_gslm_era_scikit_learn(tmp_path):
    """scikit-learn 0.21 (GSLM) has sklearn.cluster.k_means_, not _kmeans: the file must name the
    class by its public path, stay at protocol 2 and carry what 0.21's predict reads."""
    import pickletools

    from teal_cli.cluster.kmbin import KM_GLOBALS

    path = write_km(tmp_path / "km.bin", torch.randn(8, 4), seed=0)
    ops = list(pickletools.genops(path.read_bytes()))
    assert ops[0][0].name == "PROTO" and ops[0][1] <= 2
    names = {tuple(arg.split(" ", 1)) for op, arg, _ in ops if op.name == "GLOBAL"}
    assert names <= KM_GLOBALS and ("sklearn.cluster", "MiniBatchKMeans") in names
    assert not any("_kmeans" in module or "k_means_" in module for module, _ in names)
    state = read_estimator(path).__dict__
    # MiniBatchKMeans.predict in 0.21.3: check_is_fitted(cluster_centers_), _check_test_data
    # (cluster_centers_.shape), _labels_inertia_minibatch (verbose, batch_size).
    assert {"cluster_centers_", "verbose", "batch_size", "n_clusters"} <= state.keys()
    assert isinstance(state["batch_size"], int) and state["verbose"] == 0
    assert not list(tmp_path.glob(".km.bin*"))  # written atomically, no temp file left
