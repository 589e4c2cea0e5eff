"""The safe reader of fairseq/sklearn pickles: what it rebuilds, and what it refuses without running it.

The artefacts of fairseq and of an older sklearn come from the fairseq oracle (tests/oracles/fairseq/artefacts.py),
which writes them under numpy 1, as the official GSLM files were: their pickles name ``numpy.core.multiarray``, which
numpy 2, the toolkit's, calls ``numpy._core``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from oracle import run_oracle
from sklearn.cluster import MiniBatchKMeans

from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError, UnsafeCheckpointError
from speechprompt.fairseq_compat import load_fairseq_checkpoint, safe_torch_load, save_fairseq_checkpoint
from speechprompt.kmeans_pickle import read_kmeans_pickle


class _Exploit:
    """Unpickling this runs a shell command, unless the unpickler refuses ``os.system``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "cfg": {"x": _Exploit(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_fairseq_checkpoint(path)
    assert not marker.exists()


def test_malicious_kmeans_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "km.bin"
    joblib.dump({"cluster_centers_": _Exploit(marker)}, path)
    with pytest.raises(UnsafeCheckpointError):
        read_kmeans_pickle(path)
    assert not marker.exists()


def test_legacy_args_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    args = argparse.Namespace(arch="transformer_lm_big", decoder_layers=2, dropout=0.1)
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3, dtype=torch.float16)}
    torch.save({"args": args, "model": state, "extra_state": {"best": np.float64(1.5)}}, path)
    ck = load_fairseq_checkpoint(path)
    assert ck["cfg"]["model"]["decoder_layers"] == 2
    assert ck["cfg"]["task"]["arch"] == "transformer_lm_big"
    assert torch.equal(ck["model"]["w"], state["w"]) and ck["model"]["b"].dtype == torch.float16
    assert float(ck["extra_state"]["best"]) == 1.5


def test_plain_torch_save_loads_and_garbage_is_a_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"a": [1, 2.0, "x", (3,)], "t": torch.randn(3, 3)}, good)
    assert safe_torch_load(good)["a"] == [1, 2.0, "x", (3,)]
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="bad.pt"):
        safe_torch_load(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        safe_torch_load(tmp_path / "missing.pt")
    no_model = tmp_path / "nomodel.pt"
    torch.save({"cfg": {}}, no_model)
    with pytest.raises(CheckpointError, match="no 'model'"):
        load_fairseq_checkpoint(no_model)


def test_save_fairseq_checkpoint_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "ck.pt"
    state = {"decoder.w": torch.randn(4, 4)}
    save_fairseq_checkpoint(path, state, {"model": {"_name": "transformer_lm"}, "task": {}})
    ck = load_fairseq_checkpoint(path)
    assert torch.equal(ck["model"]["decoder.w"], state["decoder.w"])
    # fairseq's own restricted loader reads it too (what fairseq does with weights_only=True).
    raw = torch.load(path, weights_only=True)
    assert raw["cfg"]["model"]["_name"] == "transformer_lm"


def test_dictionary_layout_and_dict_txt(tmp_path: Path) -> None:
    d = Dictionary.for_units(100)
    assert len(d) == 104 and d.index("<s>") == 0 and d.index("<pad>") == 1 and d.index("</s>") == 2
    assert d.index("0") == 4 and d.index("99") == 103 and d.index("nope") == d.unk_index
    assert d.encode_units([0, 5, 99], append_eos=True).tolist() == [4, 9, 103, 2]
    assert d.string([0, 4, 9, 2]) == "0 5"
    path = tmp_path / "dict.txt"
    d.save(path)
    assert path.read_text().splitlines()[0] == "0 1"
    assert Dictionary.load(path) == d
    with pytest.raises(CheckpointError, match="not in the dictionary"):
        d.encode_units([100])
    (tmp_path / "bad.txt").write_text("0 1\nbroken-line\n")
    with pytest.raises(CheckpointError, match="bad.txt:2"):
        Dictionary.load(tmp_path / "bad.txt")
    (tmp_path / "dup.txt").write_text("0 1\n0 1\n")
    with pytest.raises(CheckpointError, match="duplicate"):
        Dictionary.load(tmp_path / "dup.txt")


@pytest.mark.parametrize("compress", [0, 3, ("gzip", 3), ("bz2", 3), ("xz", 3)])
def test_km_bin_centroids_equal_sklearn(tmp_path: Path, compress) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=7, batch_size=100, n_init=2, random_state=0).fit(x)
    path = tmp_path / "km.bin"
    joblib.dump(km, path, compress=compress)
    centers = read_kmeans_pickle(path)
    np.testing.assert_array_equal(centers, km.cluster_centers_.astype(np.float32))


def test_km_bin_plain_pickle_and_errors(tmp_path: Path) -> None:
    x = np.random.default_rng(1).normal(size=(200, 4))
    km = MiniBatchKMeans(n_clusters=3, n_init=1, random_state=0).fit(x)
    path = tmp_path / "km.pkl"
    with open(path, "wb") as f:
        pickle.dump(km, f)
    np.testing.assert_array_equal(read_kmeans_pickle(path), km.cluster_centers_.astype(np.float32))
    unfitted = tmp_path / "unfitted.bin"
    joblib.dump(MiniBatchKMeans(n_clusters=3), unfitted)
    with pytest.raises(CheckpointError, match="cluster_centers_"):
        read_kmeans_pickle(unfitted)
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError):
        read_kmeans_pickle(garbage)


# ---------------------------------------------------------------------------------------------------------------
# Artefacts fairseq and sklearn wrote under numpy 1

HUBERT_LIKE_CFG = {"model": {"_name": "hubert", "encoder_layers": 3, "conv": [[512, 10, 5]]},
                   "task": {"normalize": True, "label_rate": 50.0, "labels": ["km"]}}
DICT_LINES = ["3 7 19 0", "19 19 5", ""]
# GSLM's km.bin is a joblib pickle of a MiniBatchKMeans, in any of joblib's compressions; and plain pickles, whose
# arrays name numpy.core.multiarray (protocol 2 also carries their bytes through _codecs.encode).
KMEANS = {
    **{f"km_{i}": {"n": 600, "dim": 8, "seed": 0, "float32": True, "compress": compress,
                   "params": {"n_clusters": 7, "batch_size": 100, "n_init": 2, "random_state": 0}}
       for i, compress in enumerate([0, 3, ["gzip", 3], ["bz2", 3], ["xz", 3]])},
    **{f"km_pickle{protocol}": {"n": 200, "dim": 4, "seed": 1, "compress": "pickle", "protocol": protocol,
                                "params": {"n_clusters": 3, "n_init": 1, "random_state": 0}}
       for protocol in (2, 4)},
}


@pytest.fixture(scope="module")
def fairseq_artefacts(tmp_path_factory) -> Path:
    """The oracle's files for this module: a dict.txt read by fairseq, an omegaconf checkpoint with a fairseq
    Dictionary and numpy values, and :data:`KMEANS`, all written under numpy 1."""
    out = tmp_path_factory.mktemp("fairseq_artefacts")
    (out / "dict.txt").write_text("".join(f"{u} {100 - u}\n" for u in range(20)))
    return run_oracle("fairseq", "artefacts", out, dictionary={"dict_txt": str(out / "dict.txt"), "lines": DICT_LINES},
                      checkpoint={"n_units": 5, "cfg": HUBERT_LIKE_CFG}, kmeans=KMEANS)


def _major(version: str) -> int:
    return int(version.split(".")[0])


@pytest.fixture(scope="module")
def numpy1_to_numpy2(fairseq_artefacts: Path) -> None:
    """What the tests below are about: the files come from numpy 1 and are read under numpy 2."""
    oracle_numpy = torch.load(fairseq_artefacts / "versions.pt", weights_only=True)["numpy"]
    assert _major(oracle_numpy) == 1, f"the fairseq oracle runs numpy {oracle_numpy}; make oracle-env gives it numpy<2"
    assert _major(np.__version__) >= 2, f"the toolkit's test environment runs numpy {np.__version__}, not 2 (make test)"


def _pickle_bytes(path: Path) -> bytes:
    """The pickle stream of a torch zip checkpoint, or the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    return path.read_bytes()


@pytest.mark.fairseq
def test_omegaconf_cfg_fairseq_dictionary_and_numpy1_values(fairseq_artefacts: Path, numpy1_to_numpy2) -> None:
    """Older checkpoints pickle omegaconf containers and fairseq's Dictionary; both become plain data. The numpy
    values of the trainer's state, pickled under numpy 1, come back as numpy values."""
    path = fairseq_artefacts / "checkpoint.pt"
    ref = torch.load(fairseq_artefacts / "checkpoint.ref.pt", weights_only=True)
    raw = _pickle_bytes(path)
    assert b"numpy.core.multiarray" in raw and b"numpy._core" not in raw
    ck = load_fairseq_checkpoint(path)
    assert ck["cfg"]["model"] == HUBERT_LIKE_CFG["model"] == {"_name": "hubert", "encoder_layers": 3,
                                                                "conv": [[512, 10, 5]]}
    assert ck["cfg"]["task"]["normalize"] is True
    d = ck["task_state"]["dictionaries"][0]
    assert isinstance(d, Dictionary)
    assert d.symbols == ref["symbols"] and d.index("3") == ref["symbols"].index("3")
    assert sorted(ck["model"]) == sorted(ref["model"])
    for key, value in ref["model"].items():
        assert torch.equal(ck["model"][key], value)

    extra, want = ck["extra_state"], ref["extra_state"]
    assert isinstance(extra["best"], np.float64) and extra["best"] == want["best"] == 4.125
    assert isinstance(extra["val_loss"], np.float64) and extra["val_loss"] == want["val_loss"]
    (loss_name, loss), (n_name, n) = extra["metrics"]["train"]
    assert (loss_name, n_name) == ("loss", "nupdates")
    assert isinstance(loss, np.float32) and loss == want["metrics"]["train"][0][1]
    assert isinstance(n, np.int64) and n == want["metrics"]["train"][1][1]
    history = extra["loss_history"]
    assert isinstance(history, np.ndarray) and history.dtype == np.float64
    np.testing.assert_array_equal(history, want["loss_history"].numpy())
    assert extra["train_iterator"] == want["train_iterator"]


@pytest.mark.fairseq
def test_dictionary_matches_fairseq(fairseq_artefacts: Path) -> None:
    ref = torch.load(fairseq_artefacts / "dictionary.pt", weights_only=True)
    ours = Dictionary.load(fairseq_artefacts / "dict.txt")
    assert ours.symbols == ref["symbols"]
    for line, theirs in zip(DICT_LINES, ref["encoded"], strict=True):
        assert ours.encode_line(line).tolist() == theirs


@pytest.mark.fairseq
@pytest.mark.parametrize("name", sorted(KMEANS))
def test_km_bin_from_numpy1_sklearn(fairseq_artefacts: Path, numpy1_to_numpy2, name: str) -> None:
    """GSLM's km.bin as an older sklearn under numpy 1 writes it, read under numpy 2: the fitted centroids."""
    compress = KMEANS[name]["compress"]
    path = fairseq_artefacts / (f"{name}.pkl" if compress == "pickle" else f"{name}.bin")
    if compress == "pickle":
        assert b"numpy.core.multiarray" in path.read_bytes()
    elif compress == 0:  # joblib, uncompressed: the arrays follow their wrappers in the stream
        assert b"NumpyArrayWrapper" in path.read_bytes()
    expected = torch.load(fairseq_artefacts / "kmeans.ref.pt", weights_only=True)[name].numpy()
    centers = read_kmeans_pickle(path)
    assert centers.dtype == np.float32 and centers.shape == expected.shape
    np.testing.assert_array_equal(centers, expected)
