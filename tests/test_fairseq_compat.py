"""The safe reader of fairseq/sklearn pickles: what it rebuilds, and what it refuses without running it."""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from sklearn.cluster import MiniBatchKMeans

from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError, UnsafeCheckpointError
from speechprompt.fairseq_compat import (
    load_fairseq_checkpoint,
    read_kmeans_pickle,
    safe_torch_load,
    save_fairseq_checkpoint,
)


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


def test_omegaconf_cfg_and_fairseq_dictionary(tmp_path: Path) -> None:
    """Older checkpoints pickle omegaconf containers and fairseq's Dictionary; both become plain data."""
    from fairseq.data.dictionary import Dictionary as FairseqDictionary
    from omegaconf import OmegaConf

    fs_dict = FairseqDictionary()
    for u in range(5):
        fs_dict.add_symbol(str(u))
    cfg = OmegaConf.create(
        {"model": {"_name": "hubert", "encoder_layers": 3, "conv": [[512, 10, 5]]},
         "task": {"normalize": True, "label_rate": 50.0, "labels": ["km"]}}
    )
    path = tmp_path / "hubert_like.pt"
    torch.save({"cfg": cfg, "model": {"x": torch.ones(1)}, "task_state": {"dictionaries": [fs_dict]}}, path)
    ck = load_fairseq_checkpoint(path)
    assert ck["cfg"]["model"] == {"_name": "hubert", "encoder_layers": 3, "conv": [[512, 10, 5]]}
    assert ck["cfg"]["task"]["normalize"] is True
    d = ck["task_state"]["dictionaries"][0]
    assert isinstance(d, Dictionary)
    assert d.symbols == fs_dict.symbols and d.index("3") == fs_dict.index("3")


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


def test_dictionary_matches_fairseq(tmp_path: Path) -> None:
    from fairseq.data.dictionary import Dictionary as FairseqDictionary

    path = tmp_path / "dict.txt"
    path.write_text("".join(f"{u} {100 - u}\n" for u in range(20)))
    ours, theirs = Dictionary.load(path), FairseqDictionary.load(str(path))
    assert ours.symbols == theirs.symbols
    line = "3 7 19 0"
    assert ours.encode_line(line).tolist() == theirs.encode_line(line, add_if_not_exist=False).tolist()


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
