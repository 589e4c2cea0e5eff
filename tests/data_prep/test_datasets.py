"""Dataset preparers on tiny fake trees with the real layouts: manifests, labels, splits, bad files, layout errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechprompt.cli import main as cli_main
from speechprompt.config import ConfigError
from speechprompt.data_prep.datasets import DATASETS, DatasetError, prepare
from speechprompt.data_prep.datasets.snips import read_transcripts, tag_slots
from speechprompt.data_prep.datasets.speech_commands import WORDS, hash_split
from speechprompt.data_prep.manifest import read_labels, read_manifest, validate_manifest
from speechprompt.fileio import read_json
from speechprompt.tasks.metrics import parse_slots, strip_slot_tags

SR = 16000


def _wav(path: Path, samples: int = 1600, seed: int = 0) -> Path:
    """A short noise file; the format follows the suffix (WAV or FLAC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).uniform(-0.3, 0.3, samples).astype(np.float32)
    sf.write(str(path), x, SR, subtype="PCM_16")
    return path


def _rows(out: Path, split: str) -> list[tuple[str, str]]:
    """``(absolute path, label)`` of every row of a prepared split, checking the files agree."""
    manifest = read_manifest(out / f"{split}.tsv")
    labels = read_labels(out / f"{split}.labels")
    assert len(labels) == len(manifest)
    assert validate_manifest(out / f"{split}.tsv") == []
    return [(str(p), label) for p, label in zip(manifest.paths(), labels)]


def test_registry_lists_the_datasets():
    assert set(DATASETS) == {"speech_commands", "fluent_commands", "librispeech", "snips", "voxceleb1", "iemocap",
                             "librilight", "esc50"}
    assert DATASETS["snips"].task == "sequence" and DATASETS["fluent_commands"].task == "multislot"


# -- Speech Commands --------------------------------------------------------------------------------------------


def _speech_commands(tmp: Path, lists: bool = True, superb_test: bool = False) -> Path:
    """speech_commands_v0.01 with every command word (one train, one dev, one test file each), one unknown word
    and 10.5 s of background noise; optionally SUPERB's test set beside it."""
    root = tmp / "speech_commands_v0.01"
    dev, test = [], []
    for i, word in enumerate((*WORDS, "bed")):
        for j, part in enumerate(("train", "dev", "test")):
            rel = f"{word}/spk{j}x{i}_nohash_0.wav"
            _wav(root / rel, seed=10 * i + j)
            (dev if part == "dev" else test if part == "test" else []).append(rel)
    _wav(root / "_background_noise_" / "white_noise.wav", samples=int(10.5 * SR), seed=99)
    if lists:
        (root / "validation_list.txt").write_text("\n".join(dev) + "\n")
        (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    if superb_test:
        for k, cls in enumerate(("yes", "_unknown_", "_silence_")):
            _wav(tmp / "speech_commands_test_set_v0.01" / cls / f"t{k}.wav", samples=SR, seed=200 + k)
    return root


def test_speech_commands_official_lists_unknown_and_silence(tmp_path):
    root = _speech_commands(tmp_path)
    out = tmp_path / "ks"
    summary = prepare("speech_commands", root, out)
    train, dev, test = (_rows(out, s) for s in ("train", "dev", "test"))
    # 10 words + 'bed' -> _unknown_, one file each per split; 10 one-second silence clips: 8 / 1 / 1.
    assert sorted(label for _, label in train) == sorted([*WORDS, "_unknown_"] + ["_silence_"] * 8)
    assert sorted(label for _, label in dev) == sorted([*WORDS, "_unknown_", "_silence_"])
    assert sorted(label for _, label in test) == sorted([*WORDS, "_unknown_", "_silence_"])
    assert all("spk1x" in p for p, label in dev if label != "_silence_")
    assert all("spk2x" in p for p, label in test if label != "_silence_")
    assert summary["split_rule"] == "official lists"
    assert summary["splits"]["train"]["labels"]["_silence_"] == 8

    # Silence clips are written 1 s long, cut from contiguous, non-overlapping stretches per split.
    clips = {split: sorted(Path(p).name for p, label in rows if label == "_silence_")
             for split, rows in (("train", train), ("dev", dev), ("test", test))}
    starts = {s: [int(n.rsplit("_", 1)[1][:-4]) for n in names] for s, names in clips.items()}
    assert starts["train"] == [k * SR for k in range(8)]
    assert starts["dev"] == [8 * SR] and starts["test"] == [9 * SR]
    manifest = read_manifest(out / "train.tsv")
    lengths = {e.relpath: e.num_samples for e in manifest.entries}
    assert {n for r, n in lengths.items() if "_silence_" in r} == {SR}
    clip = sf.read(str(out / "_silence_" / clips["dev"][0]))[0]
    noise = sf.read(str(root / "_background_noise_" / "white_noise.wav"))[0]
    np.testing.assert_allclose(clip, noise[8 * SR:9 * SR], atol=1 / 32768)


def test_speech_commands_superb_test_set_replaces_the_official_test(tmp_path):
    root = _speech_commands(tmp_path, superb_test=True)
    out = tmp_path / "ks"
    summary = prepare("speech_commands", root, out)
    test = _rows(out, "test")
    assert sorted(label for _, label in test) == ["_silence_", "_unknown_", "yes"]
    assert all("speech_commands_test_set_v0.01" in p for p, _ in test)
    train = _rows(out, "train")
    assert not any("spk2x" in p for p, _ in train)  # the official test files are not moved into training
    assert summary["silence_clips"] == {"train": 9, "dev": 1, "test": 0}
    assert prepare("speech_commands", root, tmp_path / "ks2", test_set="official")["silence_clips"]["test"] == 1


def test_speech_commands_hash_rule_without_lists(tmp_path):
    root = _speech_commands(tmp_path, lists=False)
    summary = prepare("speech_commands", root, tmp_path / "ks")
    assert summary["split_rule"].startswith("speaker hash")
    for split in ("train", "dev", "test"):
        for path, label in _rows(tmp_path / "ks", split):
            if label != "_silence_":
                assert hash_split(Path(path).parent.name + "/" + Path(path).name) == split


def test_hash_split_depends_on_the_speaker_only_and_is_about_80_10_10():
    assert hash_split("yes/0a7c2a8d_nohash_0.wav") == hash_split("no/0a7c2a8d_nohash_4.wav")
    shares = [hash_split(f"x/{i:08x}_nohash_0.wav") for i in range(4000)]
    assert abs(shares.count("dev") / 4000 - 0.1) < 0.02 and abs(shares.count("test") / 4000 - 0.1) < 0.02


def test_speech_commands_bad_files_are_skipped_and_reported(tmp_path):
    root = _speech_commands(tmp_path)
    (root / "yes" / "empty_nohash_0.wav").write_bytes(b"")
    (root / "no" / "garbage_nohash_0.wav").write_bytes(b"RIFF not really a wave file at all")
    out = tmp_path / "ks"
    summary = prepare("speech_commands", root, out)
    skipped = summary["skipped"]["train"]
    assert len(skipped) == 2 and summary["splits"]["train"]["skipped"] == 2
    assert any("empty_nohash_0.wav" in s for s in skipped) and any("garbage_nohash_0.wav" in s for s in skipped)
    assert not any("empty_nohash" in p or "garbage" in p for p, _ in _rows(out, "train"))


def test_speech_commands_layout_errors_name_what_is_missing(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        prepare("speech_commands", tmp_path / "nowhere", tmp_path / "out")
    root = _speech_commands(tmp_path)
    for f in (root / "_background_noise_").iterdir():
        f.unlink()
    (root / "_background_noise_").rmdir()
    with pytest.raises(DatasetError, match=r"_background_noise_.*\n.*Expected layout|Expected layout") as e:
        prepare("speech_commands", root, tmp_path / "out")
    assert "_background_noise_" in str(e.value) and "validation_list.txt" in str(e.value)
    with pytest.raises(ConfigError, match="silence_stride"):
        prepare("speech_commands", root, tmp_path / "out", silence_stride=0.0)
    with pytest.raises(ConfigError, match="unknown config key"):
        prepare("speech_commands", root, tmp_path / "out", silence_strides=1.0)


# -- Fluent Speech Commands -------------------------------------------------------------------------------------

FSC_HEADER = ["", "path", "speakerId", "transcription", "action", "object", "location"]


def _fluent(tmp: Path) -> Path:
    root = tmp / "fluent_speech_commands_dataset"
    rows = {
        "train": [("activate", "lights", "kitchen", "Turn on the kitchen lights"),
                  ("increase", "volume", "none", "Turn up the volume"),
                  ("deactivate", "music", "none", "Stop the music")],
        "valid": [("bring", "shoes", "none", "Bring me my shoes")],
        "test": [("change language", "Korean", "none", "Switch to Korean")],
    }
    for split, items in rows.items():
        (root / "data").mkdir(parents=True, exist_ok=True)
        with open(root / "data" / f"{split}_data.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(FSC_HEADER)
            for i, (action, obj, loc, text) in enumerate(items):
                rel = f"wavs/speakers/spk{split}/{split}{i}.wav"
                _wav(root / rel, seed=i)
                w.writerow([i, rel, f"spk{split}", text, action, obj, loc])
    return root


def test_fluent_commands_labels_are_action_object_location(tmp_path):
    root = _fluent(tmp_path)
    out = tmp_path / "ic"
    summary = prepare("fluent_commands", root, out)
    assert [label for _, label in _rows(out, "train")] == [
        "activate|lights|kitchen", "increase|volume|none", "deactivate|music|none"]
    assert [label for _, label in _rows(out, "dev")] == ["bring|shoes|none"]
    assert [label for _, label in _rows(out, "test")] == ["change language|Korean|none"]
    assert summary["task"] == "multislot"
    assert read_manifest(out / "train.tsv").root == (root / "wavs" / "speakers" / "spktrain").resolve()
    summary = prepare("fluent_commands", root, tmp_path / "asr", target="transcription")
    assert summary["task"] == "sequence"
    assert read_labels(tmp_path / "asr" / "dev.labels") == ["Bring me my shoes"]


def test_fluent_commands_missing_audio_and_missing_columns(tmp_path):
    root = _fluent(tmp_path)
    (root / "wavs" / "speakers" / "spktrain" / "train1.wav").unlink()
    summary = prepare("fluent_commands", root, tmp_path / "ic")
    assert summary["splits"]["train"]["utterances"] == 2
    assert "train1.wav: no such file" in summary["skipped"]["train"][0]
    (root / "data" / "valid_data.csv").write_text("path,speakerId\nx.wav,s\n")
    with pytest.raises(DatasetError, match="valid_data.csv lacks the column"):
        prepare("fluent_commands", root, tmp_path / "ic")
    (root / "data" / "valid_data.csv").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*valid_data.csv \(the dev split\)"):
        prepare("fluent_commands", root, tmp_path / "ic")


def test_symlinked_audio_stays_under_the_dataset_root(tmp_path):
    root = _fluent(tmp_path)
    wav = root / "wavs" / "speakers" / "spktrain" / "train0.wav"
    elsewhere = tmp_path / "storage" / "blob.wav"
    elsewhere.parent.mkdir()
    wav.rename(elsewhere)
    wav.symlink_to(elsewhere)  # datasets on clusters are often trees of links
    prepare("fluent_commands", root, tmp_path / "ic")
    manifest = read_manifest(tmp_path / "ic" / "train.tsv")
    assert manifest.entries[0].relpath == "train0.wav"
    assert manifest.root == root / "wavs" / "speakers" / "spktrain"


# -- LibriSpeech ------------------------------------------------------------------------------------------------


def _librispeech(tmp: Path) -> Path:
    root = tmp / "LibriSpeech"
    texts = {"train-clean-100": {"19-198-0000": "NORTHANGER ABBEY", "19-198-0001": "THIS LITTLE WORK"},
             "dev-clean": {"84-121-0000": "GO DO YOU HEAR"},
             "test-clean": {"61-70-0000": "HE HOPED THERE WOULD BE STEW"},
             "test-other": {"367-130-0000": "FOR A FEW MILES"}}
    for subset, utts in texts.items():
        for k, (utt, text) in enumerate(utts.items()):
            spk, chap, _ = utt.split("-")
            folder = root / subset / spk / chap
            _wav(folder / f"{utt}.flac", seed=k)
            with open(folder / f"{spk}-{chap}.trans.txt", "a") as f:
                f.write(f"{utt} {text}\n")
    return root


def test_librispeech_transcripts_and_subsets(tmp_path):
    root = _librispeech(tmp_path)
    _wav(root / "train-clean-100" / "19" / "198" / "19-198-0002.flac")  # audio without a transcript line
    out = tmp_path / "asr"
    summary = prepare("librispeech", tmp_path, out, test=["test-clean", "test-other"])  # the folder above works too
    assert _rows(out, "train") == [(str((root / "train-clean-100/19/198/19-198-0000.flac").resolve()),
                                    "NORTHANGER ABBEY"),
                                   (str((root / "train-clean-100/19/198/19-198-0001.flac").resolve()),
                                    "THIS LITTLE WORK")]
    assert [label for _, label in _rows(out, "test")] == ["HE HOPED THERE WOULD BE STEW", "FOR A FEW MILES"]
    assert read_manifest(out / "test.tsv").root == root.resolve()
    assert summary["untranscribed_audio"] == [str(root / "train-clean-100/19/198/19-198-0002.flac")]
    assert "labels" not in summary["splits"]["train"]  # no histogram of transcripts
    prepare("librispeech", root, tmp_path / "lc", lowercase=True)
    assert read_labels(tmp_path / "lc" / "dev.labels") == ["go do you hear"]


def test_librispeech_missing_subset_and_empty_transcript(tmp_path):
    root = _librispeech(tmp_path)
    with pytest.raises(DatasetError, match=r"missing folder .*dev-other \(the dev-other subset \(dev\)\)"):
        prepare("librispeech", root, tmp_path / "asr", dev=["dev-other"])
    with open(root / "dev-clean" / "84" / "121" / "84-121.trans.txt", "a") as f:
        f.write("84-121-0001\n")
    with pytest.raises(DatasetError, match=r"84-121.trans.txt:2: no transcript"):
        prepare("librispeech", root, tmp_path / "asr")


# -- SNIPS ------------------------------------------------------------------------------------------------------


def test_tag_slots_writes_superb_spans():
    words = ["ADD", "STING", "TO", "MY", "WORKOUT", "PLAYLIST", "?"]
    tags = ["O", "artist", "O", "playlist", "playlist", "O", "O"]
    text = tag_slots(words, tags)
    assert text == "ADD B-artist STING E-artist TO B-playlist MY WORKOUT E-playlist PLAYLIST"
    assert parse_slots(text) == [("artist", "STING"), ("playlist", "MY WORKOUT")]
    assert strip_slot_tags(text) == "ADD STING TO MY WORKOUT PLAYLIST"
    # IOB-prefixed tags: B- opens a new span even after the same type; & becomes AND.
    iob = tag_slots(["rock", "&", "roll", "jazz"], ["B-genre", "I-genre", "I-genre", "B-genre"], lowercase=True)
    assert iob == "B-genre rock and roll E-genre B-genre jazz E-genre"
    with pytest.raises(ValueError, match="2 words but 1 tags"):
        tag_slots(["a", "b"], ["O"])


def _snips(tmp: Path) -> Path:
    root = tmp / "SNIPS"
    lines = []
    for split, speakers in (("train", ["Ivy", "Joey", "Aditi"]), ("valid", ["Amy"]), ("test", ["Brian"])):
        for k, spk in enumerate(speakers):
            uid = f"{spk}-snips-{split}-{k}"
            _wav(root / split / f"{uid}.wav", seed=k)
            lines.append(f"{uid} BOS PLAY SOME JAZZ EOS\tO O O music_item PlayMusic")
    _wav(root / "train" / "Ivy-snips-train-99.wav")  # no transcript line
    (root / "all.iob.snips.txt").write_text("\n".join(lines) + "\n")
    return root


def test_snips_speaker_splits_and_tagged_labels(tmp_path):
    root = _snips(tmp_path)
    out = tmp_path / "sf"
    summary = prepare("snips", root, out)
    train = _rows(out, "train")
    assert [Path(p).stem for p, _ in train] == ["Ivy-snips-train-0", "Joey-snips-train-1"]  # Aditi is a dev voice
    assert {label for _, label in train} == {"PLAY SOME B-music_item JAZZ E-music_item"}
    assert [Path(p).stem for p, _ in _rows(out, "dev")] == ["Amy-snips-valid-0"]
    assert [Path(p).stem for p, _ in _rows(out, "test")] == ["Brian-snips-test-0"]
    assert summary["audio_without_transcript"] == [str(root / "train" / "Ivy-snips-train-99.wav")]
    with pytest.raises(ConfigError, match="only one split"):
        prepare("snips", root, out, dev_speakers=["Ivy"])


def test_snips_malformed_transcript_and_missing_split(tmp_path):
    root = _snips(tmp_path)
    (root / "all.iob.snips.txt").write_text("Ivy-snips-train-0 PLAY JAZZ\tO O\n")
    with pytest.raises(DatasetError, match=r"all.iob.snips.txt:1: expected"):
        read_transcripts(root / "all.iob.snips.txt")
    (root / "all.iob.snips.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*all.iob.snips.txt"):
        prepare("snips", root, tmp_path / "sf")


# -- command line -----------------------------------------------------------------------------------------------


def test_cli_prepare_dataset(tmp_path, capsys):
    root = _fluent(tmp_path)
    out = tmp_path / "ic"
    assert cli_main(["prepare-dataset", "fluent_commands", "--root", str(root), "--out", str(out),
                     "target=transcription"]) == 0
    assert "dev.tsv: 1 utterances" in capsys.readouterr().out
    assert read_json(out / "summary.json")["options"] == {"target": "transcription"}
    assert cli_main(["prepare-dataset", "fluent_commands", "--root", str(tmp_path / "no"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("speechprompt prepare-dataset: error: fluent_commands: dataset root")
    assert cli_main(["prepare-dataset", "fluent_commands", "--root", str(root), "--out", str(out),
                     "target=words"]) == 2
    assert "target" in capsys.readouterr().err
