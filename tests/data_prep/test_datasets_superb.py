"""The SUPERB/AST dataset preparers on tiny fabricated trees in each dataset's exact layout (file names, split lists,
CSV columns, label files): VoxCeleb1, IEMOCAP, Libri-light, ESC-50, and Speech Commands' 35-class setting; each
with a missing or extra file."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechprompt.cli import main as cli_main
from speechprompt.config import ConfigError
from speechprompt.data_prep.datasets import DATASETS, DatasetError, prepare
from speechprompt.data_prep.manifest import read_labels, read_manifest, validate_manifest

SR = 16000


def _wav(path: Path, samples: int = 1600, seed: int = 0, sr: int = SR) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.random.default_rng(seed).uniform(-0.3, 0.3, samples).astype(np.float32), sr,
             subtype="PCM_16")
    return path


def _rows(out: Path, split: str) -> list[tuple[str, str]]:
    manifest = read_manifest(out / f"{split}.tsv")
    labels = read_labels(out / f"{split}.labels")
    assert len(labels) == len(manifest) and validate_manifest(out / f"{split}.tsv") == []
    return [(str(p), label) for p, label in zip(manifest.paths(), labels)]


def test_the_new_datasets_are_registered_with_their_tasks():
    assert {"voxceleb1", "iemocap", "librilight", "esc50"} <= set(DATASETS)
    assert DATASETS["librilight"].task == "sequence" and DATASETS["iemocap"].task == "classification"


# -- VoxCeleb1 ---------------------------------------------------------------------------------------------------


def _voxceleb(tmp: Path) -> Path:
    """Both archives extracted side by side (dev/wav, test/wav), two speakers, and iden_split.txt."""
    root = tmp / "VoxCeleb1"
    lines = []
    for k, (spk, video) in enumerate([("id10001", "1zcIwhmdeo4"), ("id10002", "C7k7C-PDvAA")]):
        for n, split in enumerate(("1", "1", "2", "3")):
            rel = f"{spk}/{video}/{n + 1:05d}.wav"
            archive = "test" if split == "3" else "dev"  # where VoxCeleb1 puts them does not matter
            _wav(root / archive / "wav" / rel, seed=10 * k + n)
            lines.append(f"{split} {rel}")
    (root / "iden_split.txt").write_text("\n".join(lines) + "\n")
    return root


def test_voxceleb1_identification_split_and_speaker_labels(tmp_path):
    root = _voxceleb(tmp_path)
    _wav(root / "dev" / "wav" / "id10001" / "1zcIwhmdeo4" / "00099.wav")  # on disk, not in the split list
    out = tmp_path / "sid"
    summary = prepare("voxceleb1", root, out)
    train, dev, test = (_rows(out, s) for s in ("train", "dev", "test"))
    assert [label for _, label in train] == ["id10001", "id10001", "id10002", "id10002"]
    assert [label for _, label in dev] == ["id10001", "id10002"] and [label for _, label in test] == \
        ["id10001", "id10002"]
    assert all("/test/wav/" in p for p, _ in test) and all("/dev/wav/" in p for p, _ in train)
    assert summary["speakers"] == 2 and summary["unlisted_audio_files"] == 1


def test_voxceleb1_missing_audio_is_skipped_and_a_bad_line_is_an_error(tmp_path):
    root = _voxceleb(tmp_path)
    (root / "dev" / "wav" / "id10002" / "C7k7C-PDvAA" / "00002.wav").unlink()
    summary = prepare("voxceleb1", root, tmp_path / "sid")
    assert summary["splits"]["train"]["utterances"] == 3
    assert "id10002/C7k7C-PDvAA/00002.wav: no such file" in summary["skipped"]["train"][0]
    with open(root / "iden_split.txt", "a") as f:
        f.write("4 id10003/x/00001.wav\n")
    with pytest.raises(DatasetError, match=r"iden_split.txt:9: expected"):
        prepare("voxceleb1", root, tmp_path / "sid")
    (root / "iden_split.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing file .*iden_split.txt \(the identification split\)"):
        prepare("voxceleb1", root, tmp_path / "sid")


# -- IEMOCAP -----------------------------------------------------------------------------------------------------

# Per session: (utterance id, category); 'fru' and 'xxx' are left out, 'exc' becomes 'hap'.
IEMOCAP_LINES = [("impro01_F000", "neu"), ("impro01_M001", "exc"), ("impro01_F002", "fru"),
                 ("script01_1_F000", "ang"), ("script01_1_M001", "sad"), ("script01_1_F002", "xxx"),
                 ("impro01_M003", "hap")]


def _iemocap(tmp: Path) -> Path:
    root = tmp / "IEMOCAP_full_release"
    for s in range(1, 6):
        session = root / f"Session{s}"
        by_dialog: dict[str, list[str]] = {}
        for k, (suffix, category) in enumerate(IEMOCAP_LINES):
            utt = f"Ses0{s}F_{suffix}"
            dialog = utt.rsplit("_", 1)[0]
            _wav(session / "sentences" / "wav" / dialog / f"{utt}.wav", seed=10 * s + k)
            by_dialog.setdefault(dialog, []).append(
                f"[{k}.0000 - {k}.9000]\t{utt}\t{category}\t[2.5000, 2.5000, 2.5000]\n"
                f"C-E1:\t{category};\t()\n")  # evaluator lines do not start with '['
        labels = session / "dialog" / "EmoEvaluation"
        labels.mkdir(parents=True)
        (labels / "Categorical").mkdir()  # EmoEvaluation's subfolders are not read
        for dialog, lines in by_dialog.items():
            (labels / f"{dialog}.txt").write_text("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
                                                  + "".join(lines))
    return root


def test_iemocap_fold_holds_out_one_session_with_four_classes(tmp_path):
    root = _iemocap(tmp_path)
    out = tmp_path / "er" / "fold3"
    summary = prepare("iemocap", root, out, fold=3)
    test = _rows(out, "test")
    train, dev = _rows(out, "train"), _rows(out, "dev")
    assert all("/Session3/" in p for p, _ in test) and not any("/Session3/" in p for p, _ in train + dev)
    assert sorted(label for _, label in test) == ["ang", "hap", "hap", "neu", "sad"]  # exc merged into hap
    assert len(train) + len(dev) == 4 * 5 and len(dev) == 4  # 20% of 20, s3prl's int() rounding
    assert {label for _, label in train + dev} <= {"neu", "hap", "ang", "sad"}
    assert summary["left_out_categories"] == {"fru": 5, "xxx": 5}
    assert summary["test_session"] == "Session3"
    # The dev draw is a function of the seed.
    again = tmp_path / "again"
    prepare("iemocap", root, again, fold=3)
    assert _rows(again, "dev") == dev
    prepare("iemocap", root, tmp_path / "other_seed", fold=3, seed=1)
    assert _rows(tmp_path / "other_seed", "dev") != dev
    prepare("iemocap", root, tmp_path / "six", fold=3, merge_excited=False)
    assert "exc" not in {label for _, label in _rows(tmp_path / "six", "test")}


def test_iemocap_missing_wav_session_or_bad_option(tmp_path):
    root = _iemocap(tmp_path)
    (root / "Session1" / "sentences" / "wav" / "Ses01F_impro01" / "Ses01F_impro01_F000.wav").unlink()
    summary = prepare("iemocap", root, tmp_path / "er", fold=1)
    assert summary["splits"]["test"]["utterances"] == 4
    assert "Ses01F_impro01_F000.wav: no such file" in summary["skipped"]["test"][0]
    with pytest.raises(ConfigError, match="fold must be 1-5"):
        prepare("iemocap", root, tmp_path / "er", fold=6)
    for f in (root / "Session5" / "dialog" / "EmoEvaluation").glob("*.txt"):
        f.unlink()
    with pytest.raises(DatasetError, match=r"no <dialog>.txt in .*Session5/dialog/EmoEvaluation"):
        prepare("iemocap", root, tmp_path / "er")


# -- Libri-light -------------------------------------------------------------------------------------------------


def _chapter(folder: Path, spk: str, chapter: str, texts: list[str], seed: int) -> None:
    for k in range(len(texts)):
        _wav(folder / spk / chapter / f"{spk}-{chapter}-{k:04d}.flac", seed=seed + k)
    (folder / spk / chapter / f"{spk}-{chapter}.trans.txt").write_text(
        "".join(f"{spk}-{chapter}-{k:04d} {t}\n" for k, t in enumerate(texts)))


def _librilight(tmp: Path) -> Path:
    root = tmp / "librispeech_finetuning"
    for fold in range(6):
        _chapter(root / "1h" / str(fold) / "clean", f"{100 + fold}", "10", ["A CLEAN ONE"], seed=fold)
        _chapter(root / "1h" / str(fold) / "other", f"{200 + fold}", "20", ["AN OTHER ONE"], seed=10 + fold)
    _chapter(root / "9h" / "clean", "300", "30", ["NINE HOURS", "OF CLEAN"], seed=20)
    _chapter(root / "9h" / "other", "400", "40", ["AND OTHER"], seed=30)
    for subset in ("dev-clean", "dev-other", "test-clean", "test-other"):
        _chapter(tmp / "LibriSpeech" / subset, "84", "121", [subset.upper().replace("-", " ")], seed=40)
    return root


@pytest.mark.parametrize(("subset", "fold", "expected"), [("10min", 2, 2), ("1h", 0, 12), ("10h", 0, 15)])
def test_librilight_limited_resource_sets(tmp_path, subset, fold, expected):
    root = _librilight(tmp_path)
    out = tmp_path / subset
    summary = prepare("librilight", root, out, subset=subset, fold=fold)  # LibriSpeech is found beside ROOT
    train = _rows(out, "train")
    assert len(train) == expected
    if subset == "10min":
        assert {Path(p).name.split("-")[0] for p, _ in train} == {"102", "202"}
    assert [label for _, label in _rows(out, "dev")] == ["DEV OTHER"]
    assert [label for _, label in _rows(out, "test_clean")] == ["TEST CLEAN"]
    assert [label for _, label in _rows(out, "test_other")] == ["TEST OTHER"]
    assert set(summary["splits"]) == {"train", "dev", "test_clean", "test_other"}


def test_librilight_missing_fold_and_missing_librispeech(tmp_path):
    root = _librilight(tmp_path)
    _wav(root / "9h" / "clean" / "300" / "30" / "300-30-0099.flac")  # audio without a transcript line
    summary = prepare("librilight", root, tmp_path / "ll")
    assert summary["untranscribed_audio"] == [str(root / "9h/clean/300/30/300-30-0099.flac")]
    for f in sorted((root / "1h" / "4" / "other").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (root / "1h" / "4" / "other").rmdir()
    with pytest.raises(DatasetError, match=r"missing folder .*1h/4/other \(the other half of 4\)"):
        prepare("librilight", root, tmp_path / "ll", subset="1h")
    assert prepare("librilight", root, tmp_path / "ll10", subset="10min", fold=3)["splits"]["train"]["utterances"] \
        == 2  # the other folds are not needed
    alone = _move(tmp_path)
    with pytest.raises(DatasetError, match="no LibriSpeech folder"):
        prepare("librilight", alone, tmp_path / "x", subset="10min")
    assert prepare("librilight", alone, tmp_path / "x", subset="10min",
                   librispeech=str(tmp_path / "LibriSpeech"))["splits"]["dev"]["utterances"] == 1


def _move(tmp: Path) -> Path:
    """The fine-tuning folder alone, somewhere without LibriSpeech beside it."""
    alone = tmp / "elsewhere" / "librispeech_finetuning"
    alone.parent.mkdir()
    (tmp / "librispeech_finetuning").rename(alone)
    return alone


# -- ESC-50 ------------------------------------------------------------------------------------------------------

ESC_HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]


def _esc50(tmp: Path) -> Path:
    root = tmp / "ESC-50-master"
    rows = []
    for fold in range(1, 6):
        for target, category, esc10 in ((0, "dog", "True"), (12, "crackling_fire", "True"), (5, "cat", "False")):
            name = f"{fold}-{100 + target}-A-{target}.wav"
            _wav(root / "audio" / name, samples=44100 // 4, seed=fold * 100 + target, sr=44100)
            rows.append([name, fold, target, category, esc10, f"{100 + target}", "A"])
    (root / "meta").mkdir()
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ESC_HEADER)
        w.writerows(rows)
    return root


def test_esc50_folds_labels_and_optional_dev(tmp_path):
    root = _esc50(tmp_path)
    out = tmp_path / "esc" / "fold2"
    summary = prepare("esc50", root, out, fold=2)
    assert set(summary["splits"]) == {"train", "test"}  # AST/AAT: no dev split
    test = _rows(out, "test")
    assert sorted(label for _, label in test) == ["cat", "crackling_fire", "dog"]
    assert all(Path(p).name.startswith("2-") for p, _ in test)
    assert len(_rows(out, "train")) == 12 and summary["classes"] == 3
    assert read_manifest(out / "test.tsv").entries[0].num_samples == 44100 // 4  # native rate; read at 16 kHz
    summary = prepare("esc50", root, tmp_path / "dev", fold=2, dev_fold=5, label="target", esc10=True)
    assert [label for _, label in _rows(tmp_path / "dev", "dev")] == ["0", "12"]
    assert summary["splits"]["train"]["utterances"] == 6
    with pytest.raises(ConfigError, match="dev_fold"):
        prepare("esc50", root, tmp_path / "x", fold=2, dev_fold=2)


def test_esc50_missing_clip_extra_clip_and_bad_csv(tmp_path):
    root = _esc50(tmp_path)
    (root / "audio" / "3-105-A-5.wav").unlink()
    _wav(root / "audio" / "9-999-A-0.wav")  # not in the CSV
    summary = prepare("esc50", root, tmp_path / "esc", fold=1)
    assert "3-105-A-5.wav: no such file" in summary["skipped"]["train"][0]
    assert summary["unlisted_audio"] == ["9-999-A-0.wav"]
    (root / "meta" / "esc50.csv").write_text("filename,fold\nx.wav,1\n")
    with pytest.raises(DatasetError, match="esc50.csv lacks the column"):
        prepare("esc50", root, tmp_path / "esc")
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category,esc10\nx.wav,7,0,dog,True\n")
    with pytest.raises(DatasetError, match=r"esc50.csv:2: fold '7'"):
        prepare("esc50", root, tmp_path / "esc")


# -- Speech Commands, AST/AAT's 35-class setting -------------------------------------------------------------------


def test_speech_commands_every_word_its_own_class_without_silence(tmp_path):
    root = tmp_path / "speech_commands_v0.02"
    dev, test = [], []
    for i, word in enumerate(("yes", "bed", "learn", "follow")):
        for j, part in enumerate(("train", "dev", "test")):
            rel = f"{word}/spk{j}x{i}_nohash_0.wav"
            _wav(root / rel, seed=10 * i + j)
            (dev if part == "dev" else test if part == "test" else []).append(rel)
    (root / "validation_list.txt").write_text("\n".join(dev) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    out = tmp_path / "sc35"
    summary = prepare("speech_commands", root, out, all_words=True, silence=False, test_set="official")
    for split in ("train", "dev", "test"):
        assert sorted(label for _, label in _rows(out, split)) == ["bed", "follow", "learn", "yes"]
    assert summary["silence_clips"] == {"train": 0, "dev": 0, "test": 0}
    assert not (out / "_silence_").exists()
    with pytest.raises(DatasetError, match="_background_noise_"):  # the 12-class setting needs the noise
        prepare("speech_commands", root, tmp_path / "ks", words=["yes"])


def test_cli_prepares_an_iemocap_fold(tmp_path, capsys):
    root = _iemocap(tmp_path)
    out = tmp_path / "fold2"
    assert cli_main(["prepare-dataset", "iemocap", "--root", str(root), "--out", str(out), "fold=2"]) == 0
    assert "test.tsv: 5 utterances" in capsys.readouterr().out
    assert cli_main(["prepare-dataset", "iemocap", "--root", str(root), "--out", str(out), "fold=0"]) == 2
    assert "fold must be 1-5" in capsys.readouterr().err
