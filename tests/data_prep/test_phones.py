"""``--features phones``: PocketSphinx's English phones on a real recording, its identity quantizer, ``prepare``."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechprompt.cli import main
from speechprompt.data_prep.features import FeatureError, build_feature_reader
from speechprompt.data_prep.kmeans import load_quantizer
from speechprompt.data_prep.manifest import Manifest, ManifestEntry, write_manifest_file
from speechprompt.data_prep.phones import read_phone_set

# CMU's recording of a man saying "go forward ten meters" (Debian's pocketsphinx-testdata, installed by
# scripts/install_system_deps.sh), 16 kHz 16-bit little-endian PCM.
GOFORWARD = Path("/usr/share/pocketsphinx/test/data/goforward.raw")
# Its words in CMUdict, the phones a perfect recognizer would give (without silences).
GOFORWARD_PHONES = ["G", "OW", "F", "AO", "R", "W", "ER", "D", "T", "EH", "N", "M", "IY", "T", "ER", "Z"]


@pytest.fixture(scope="module")
def reader():
    return build_feature_reader("phones")


@pytest.fixture(scope="module")
def goforward() -> np.ndarray:
    return np.fromfile(GOFORWARD, dtype="<i2").astype(np.float32) / 32768.0


def _edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_phone_set_of_the_english_model(reader) -> None:
    assert reader.dim == len(reader.symbols) == 42
    assert reader.silence == "SIL" and {"AA", "ZH", "+NSN+"} <= set(reader.symbols)
    assert reader.describe()["fingerprint"].startswith("sha256:")


def test_phone_set_of_a_handmade_mdef(tmp_path: Path) -> None:
    text = b"BMDF format description\0"
    for order in ("<", ">"):  # both byte orders: a model carries its writer's
        names = [b"AH", b"SIL", b"T"]
        counts = (3, 10, 3, 9, 30, 3, 5, 3, 7, 1)
        data = b"BMDF" + struct.pack(order + "ii", 1, len(text)) + text + struct.pack(order + "10i", *counts)
        (tmp_path / "mdef").write_bytes(data + b"".join(n + b"\0" for n in names) + b"\0\0")
        assert read_phone_set(tmp_path / "mdef") == (["AH", "SIL", "T"], "SIL")
    (tmp_path / "mdef").write_text("0.3\n3 n_base\n")
    with pytest.raises(FeatureError, match="not a binary PocketSphinx mdef"):
        read_phone_set(tmp_path / "mdef")


def test_real_speech_gives_its_phones(reader, goforward) -> None:
    segments = reader.phones(goforward)
    phones = [p for p, _, _ in segments if p != "SIL"]
    # Deterministic for a given model; a recognizer that hears nothing of it would be near 1.
    assert _edit_distance(phones, GOFORWARD_PHONES) / len(GOFORWARD_PHONES) <= 0.5
    assert phones[:4] == ["G", "OW", "F", "AO"]
    assert [p for p, _, _ in reader.phones(goforward)] == [p for p, _, _ in segments]  # no state kept between calls
    # Segments tile the utterance at 100 Hz, and the one-hot frames say the same.
    assert segments[0][1] == 0 and all(a[2] + 1 == b[1] for a, b in zip(segments, segments[1:]))
    feats = reader.read(goforward)
    assert feats.shape[1] == 42 and feats.shape[0] >= segments[-1][2] + 1 and (feats.sum(1) == 1).all()
    assert abs(feats.shape[0] - len(goforward) / 160) <= 2
    ids = feats.argmax(1).tolist()
    assert all(reader.symbols[i] == p for p, s, e in segments for i in ids[s : e + 1])


def test_kmeans_writes_the_identity_and_prepare_gives_the_phone_sequence(tmp_path: Path, reader, goforward,
                                                                        capsys) -> None:
    wav = tmp_path / "wav" / "goforward.wav"
    wav.parent.mkdir()
    sf.write(wav, goforward, 16000)
    manifest = tmp_path / "real.tsv"
    write_manifest_file(manifest, Manifest(wav.parent, [ManifestEntry("goforward.wav", len(goforward))]))
    km = tmp_path / "km_phones.safetensors"
    assert main(["kmeans", "--manifest", str(manifest), "--features", "phones", "--out", str(km)]) == 0
    assert "identity" in capsys.readouterr().out
    quantizer = load_quantizer(km)
    assert quantizer.k == 42 and quantizer.metadata["symbols"] == reader.symbols
    assert main(["prepare", "--manifest", str(manifest), "--features", "phones", "--kmeans", str(km), "--dedup",
                 "--out", str(tmp_path / "units")]) == 0
    units = [int(u) for u in (tmp_path / "units" / "real.units").read_text().split()]
    decoded = [reader.symbols.index(p) for p, _, _ in reader.phones(goforward)]
    merged = [u for i, u in enumerate(decoded) if i == 0 or u != decoded[i - 1]]
    assert units == merged  # one unit per phone (repeats of a phone across segments merged)
    # A quantizer of other features is refused before any audio is read.
    other = tmp_path / "other.safetensors"
    assert main(["kmeans", "--manifest", str(manifest), "--features", "logmel", "--k", "2", "--n-init", "1",
                 "--out", str(other)]) == 0
    assert main(["prepare", "--manifest", str(manifest), "--features", "phones", "--kmeans", str(other), "--out",
                 str(tmp_path / "units2")]) == 2
    assert "mismatched k-means" in capsys.readouterr().err


def test_without_pocketsphinx_the_error_says_what_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)  # makes `import pocketsphinx` raise ImportError
    with pytest.raises(FeatureError, match="pip install pocketsphinx"):
        build_feature_reader("phones")
