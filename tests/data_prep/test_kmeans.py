"""K-means quantizers: sklearn km.bin parity, the safe centroid file, mismatches, learning, dedup."""

from __future__ import annotations

import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans

from speechprompt.data_prep.features import FeatureReader
from speechprompt.data_prep.kmeans import (
    KMeansConfig,
    Quantizer,
    QuantizerError,
    dedup,
    learn_kmeans,
    load_quantizer,
    save_quantizer,
)
from speechprompt.errors import SpeechPromptError, UnsafeCheckpointError


def _blobs(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 5, (k, d))
    return (centers[rng.integers(0, k, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


class _FakeReader(FeatureReader):
    name = "fake"
    frame_rate = 100.0

    def __init__(self, dim: int, layer: int = 1) -> None:
        self.dim, self.layer = dim, layer

    @classmethod
    def from_options(cls, checkpoint, layer, device):  # pragma: no cover - not built from options here
        return cls(4)

    def _read(self, wav: torch.Tensor) -> torch.Tensor:  # pragma: no cover - not read here
        return wav.new_zeros(1, self.dim)

    def describe(self) -> dict:
        return {**super().describe(), "layer": self.layer}


def test_official_km_bin_assignments_equal_sklearn_predict(tmp_path: Path) -> None:
    train = np.random.default_rng(1).standard_normal((4000, 24)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=50, n_init=3, batch_size=1024, random_state=0, compute_labels=False).fit(train)
    path = tmp_path / "km.bin"
    joblib.dump(km, path)

    q = load_quantizer(path)
    assert (q.k, q.dim, q.features) == (50, 24, None)
    test = np.random.default_rng(2).standard_normal((20000, 24)).astype(np.float32)
    q.chunk_elements = 50 * 777  # several uneven chunks
    np.testing.assert_array_equal(q.assign(torch.from_numpy(test)).numpy(), km.predict(test))


def test_compressed_km_bin_loads(tmp_path: Path) -> None:
    km = MiniBatchKMeans(n_clusters=4, n_init=1, random_state=0).fit(_blobs(200, 3, 4))
    joblib.dump(km, tmp_path / "km.bin.gz", compress=3)
    np.testing.assert_array_equal(load_quantizer(tmp_path / "km.bin.gz").centroids.numpy(), km.cluster_centers_)


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"cluster_centers_": Evil()}))
    with pytest.raises(UnsafeCheckpointError):
        load_quantizer(path)


def test_safe_centroid_file_round_trip(tmp_path: Path) -> None:
    centroids = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    desc = {"name": "hubert", "dim": 5, "layer": 6, "fingerprint": "sha256:abc"}
    path = tmp_path / "km.safetensors"
    save_quantizer(path, centroids, features=desc, extra={"config": {"k": 7}})
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, no pickle anywhere
    q = load_quantizer(path)
    np.testing.assert_array_equal(q.centroids.numpy(), centroids)
    assert q.features == desc and q.metadata == {"config": {"k": 7}}
    assert [p.name for p in tmp_path.iterdir()] == ["km.safetensors"]  # written atomically, no temp left


def test_dimension_mismatch_names_both_dims_and_files(tmp_path: Path) -> None:
    path = tmp_path / "km.safetensors"
    save_quantizer(path, np.zeros((10, 768), np.float32))
    q = load_quantizer(path)
    with pytest.raises(QuantizerError, match=r"mismatched k-means.*a\.wav.*dimension 39.*km\.safetensors.*768"):
        q.assign(torch.zeros(5, 39), source="a.wav")
    with pytest.raises(SpeechPromptError, match="dimension 39"):
        q.check_features(_FakeReader(39))


def test_check_features_compares_the_recorded_reader(tmp_path: Path) -> None:
    path = tmp_path / "km.safetensors"
    save_quantizer(path, np.zeros((3, 4), np.float32), features=_FakeReader(4, layer=6).describe())
    q = load_quantizer(path)
    q.check_features(_FakeReader(4, layer=6))
    with pytest.raises(QuantizerError, match="layer 6 vs 9"):
        q.check_features(_FakeReader(4, layer=9))


def test_unreadable_and_wrong_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(QuantizerError, match="no such"):
        load_quantizer(tmp_path / "missing.bin")
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01garbage")
    with pytest.raises(SpeechPromptError):
        load_quantizer(tmp_path / "junk.bin")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(QuantizerError, match="no 'centroids'"):
        load_quantizer(tmp_path / "other.safetensors")


def test_assign_is_the_nearest_centroid() -> None:
    c = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    q = Quantizer(c)
    x = torch.tensor([[1.0, 1.0], [9.0, -1.0], [-2.0, 7.0], [5.1, 0.0]])
    assert q.assign(x).tolist() == [0, 1, 2, 1]
    r = torch.randn(300, 2, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.equal(q.assign(r), torch.cdist(r, c).argmin(dim=1))
    assert q.assign(torch.randn(0, 2)).shape == (0,)


def test_learn_kmeans_recovers_separated_clusters() -> None:
    feats = _blobs(3000, 8, 5, seed=3)
    cfg = KMeansConfig(k=5, batch_size=1000, n_init=3, max_iter=20)
    centroids = learn_kmeans(feats, cfg)
    assert centroids.shape == (5, 8) and centroids.dtype == np.float32
    units = Quantizer(centroids).assign(torch.from_numpy(feats)).numpy()
    assert len(np.unique(units)) == 5
    # the same seed gives the same centroids
    np.testing.assert_array_equal(learn_kmeans(feats, cfg), centroids)
    with pytest.raises(QuantizerError, match="raise --percent"):
        learn_kmeans(feats[:3], cfg)


def test_kmeans_config_defaults_are_gslms_and_checked() -> None:
    cfg = KMeansConfig()
    assert (cfg.init, cfg.batch_size, cfg.max_iter, cfg.n_init, cfg.reassignment_ratio, cfg.max_no_improvement,
            cfg.tol) == ("k-means++", 10000, 150, 20, 0.5, 100, 0.0)
    with pytest.raises(ValueError, match="percent"):
        KMeansConfig(percent=0.0)


def test_dedup_merges_consecutive_repeats() -> None:
    assert dedup([5, 5, 7, 7, 7, 5, 1]) == [5, 7, 5, 1]
    assert dedup([]) == []
    assert dedup(torch.tensor([3, 3])) == [3]
