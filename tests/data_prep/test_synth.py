"""The synthetic corpus: determinism, speaker-disjoint splits, file formats, task labels and the CLI."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechprompt.cli import main
from speechprompt.config import ConfigError
from speechprompt.data_prep.augment import AugmentConfig
from speechprompt.data_prep.manifest import read_labels, read_manifest
from speechprompt.data_prep.synth import build_corpus, validate_corpus
from speechprompt.data_prep.synth_plan import SPLITS, SynthConfig, assign_speakers, plan_split
from speechprompt.data_prep.synth_render import trim_silence
from speechprompt.data_prep.synth_tasks import COMMAND_WORDS, FSC_INTENTS, TASKS, UNKNOWN_WORDS, intent_phrasings
from speechprompt.data_prep.voices import Voice
from speechprompt.errors import SpeechPromptError

FSC_ACTIONS = {"activate", "deactivate", "increase", "decrease", "change language", "bring"}
FSC_OBJECTS = {"lights", "heat", "volume", "music", "lamp", "newspaper", "juice", "socks", "shoes",
               "Chinese", "Korean", "English", "German", "none"}  # fmt: skip
FSC_LOCATIONS = {"kitchen", "bedroom", "washroom", "none"}


def _meta(out: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{split}.meta.jsonl").read_text().splitlines()]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def commands_corpus(tmp_path_factory) -> Path:
    """A tiny commands corpus, every engine used, two workers."""
    out = tmp_path_factory.mktemp("commands") / "corpus"
    build_corpus(SynthConfig(task="commands", out=str(out), seed=3, per_class=2, eval_per_class=1, babble_sources=6),
                 progress=False)  # fmt: skip
    return out


def test_same_seed_gives_byte_identical_files_whatever_the_workers(commands_corpus, tmp_path):
    again = tmp_path / "corpus"
    cfg = SynthConfig(task="commands", out=str(again), seed=3, per_class=2, eval_per_class=1, babble_sources=6,
                      workers=1)  # fmt: skip
    build_corpus(cfg, progress=False)
    files = sorted(p.relative_to(commands_corpus) for p in commands_corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert sum(1 for f in files if f.suffix == ".wav") == 12 * 2 + 3 * 12
    for rel in files:
        a, b = commands_corpus / rel, again / rel
        if rel.suffix == ".tsv":  # the root line is the (absolute) corpus directory itself
            assert a.read_text().splitlines()[1:] == b.read_text().splitlines()[1:]
        elif rel.name == "corpus.json":
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            assert ja["command"].replace(str(commands_corpus), "") == jb["command"].replace(str(again), "")
            del ja["command"], jb["command"]
            assert ja == jb
        else:
            assert _digest(a) == _digest(b), rel


def test_manifests_labels_meta_and_audio_agree(commands_corpus):
    assert validate_corpus(commands_corpus) == []
    for split in SPLITS:
        manifest = read_manifest(commands_corpus / f"{split}.tsv")
        labels = read_labels(commands_corpus / f"{split}.labels")
        meta = _meta(commands_corpus, split)
        assert manifest.root == (commands_corpus / "wav").resolve()
        assert len(manifest) == len(labels) == len(meta) > 0
        for i, entry in enumerate(manifest.entries):
            audio, sr = sf.read(str(manifest.path(i)), dtype="int16", always_2d=True)
            info = sf.info(str(manifest.path(i)))
            assert sr == 16000 and audio.shape[1] == 1 and info.subtype == "PCM_16"
            assert audio.shape[0] == entry.num_samples == meta[i]["num_samples"] == 16000  # 1 s clips
            assert meta[i]["label"] == labels[i] and meta[i]["path"] == entry.relpath
            assert np.abs(audio).max() > 0


def test_splits_hold_out_whole_speakers_and_the_heldout_engine(commands_corpus):
    speakers = {s: {(m["synth"], m["speaker"]) for m in _meta(commands_corpus, s) if m["synth"]} for s in SPLITS}
    names = {s: {sp for _, sp in speakers[s]} for s in SPLITS}
    for held_out in ("dev", "test", "test_synth"):
        assert not names[held_out] & names["train"], held_out
    assert not names["dev"] & names["test"]
    assert {synth for synth, _ in speakers["test_synth"]} == {"festival"}
    for split in ("train", "dev", "test"):
        assert "festival" not in {synth for synth, _ in speakers[split]}
    summary = json.loads((commands_corpus / "corpus.json").read_text())
    assert summary["notes"] == []
    pools = {s: set(summary["splits"][s]["voices"]) for s in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            assert a == b or not pools[a] & pools[b]
    assert summary["splits"]["train"]["speakers"]["flite"] == ["awb", "rms"]
    assert summary["splits"]["dev"]["speakers"]["flite"] == ["kal"]
    assert summary["splits"]["test"]["speakers"]["flite"] == ["slt"]
    assert len(summary["splits"]["train"]["speakers"]["espeak-ng"]) > 60


def test_commands_have_the_twelve_classes_and_augment_only_train(commands_corpus):
    train = _meta(commands_corpus, "train")
    assert Counter(m["label"] for m in train) == {c: 2 for c in [*COMMAND_WORDS, "_unknown_", "_silence_"]}
    for m in train:
        if m["label"] == "_silence_":
            assert m["text"] is None and m["synth"] is None and "silence" in m["render"]
            assert m["augment"] is None or set(m["augment"]) == {"noise"}
        elif m["label"] == "_unknown_":
            assert m["text"] in UNKNOWN_WORDS
        else:
            assert m["text"] == m["label"]
    assert {m["synth"] for m in train} == {"espeak-ng", "flite", None}
    assert any(m["augment"] for m in train)
    for split in ("dev", "test", "test_synth"):
        assert all(m["augment"] is None for m in _meta(commands_corpus, split))
    summary = json.loads((commands_corpus / "corpus.json").read_text())
    assert summary["sample_rate"] == 16000 and summary["seed"] == 3
    assert summary["command"].startswith("speechprompt synth --task commands")
    assert summary["splits"]["test"]["duration"]["total_s"] == 12.0
    assert set(summary["synth_versions"]) == {"espeak-ng", "flite", "festival"}


def test_rebuilding_is_a_no_op_and_other_options_need_overwrite(commands_corpus):
    wav = next((commands_corpus / "wav" / "train").iterdir())
    mtime = wav.stat().st_mtime_ns
    cfg = SynthConfig(task="commands", out=str(commands_corpus), seed=3, per_class=2, eval_per_class=1,
                      babble_sources=6, workers=1)  # fmt: skip
    build_corpus(cfg, progress=False)
    assert wav.stat().st_mtime_ns == mtime
    other = SynthConfig(task="commands", out=str(commands_corpus), seed=9, per_class=2, eval_per_class=1)
    with pytest.raises(SpeechPromptError, match="--overwrite"):
        build_corpus(other, progress=False)


def test_heldout_synth_option_and_digit_labels(tmp_path):
    out = tmp_path / "digits"
    cfg = SynthConfig(task="digits", out=str(out), per_class=1, eval_per_class=1, heldout_synth="flite",
                      babble_sources=3, workers=1, augment=AugmentConfig(fraction=1.0))  # fmt: skip
    summary = build_corpus(cfg, progress=False)
    assert validate_corpus(out) == []
    assert {m["synth"] for m in _meta(out, "test_synth")} == {"flite"}
    assert {m["synth"] for s in ("train", "dev", "test") for m in _meta(out, s)} <= {"espeak-ng", "festival"}
    # festival has three speakers: kal trains, ked is dev, slt is the test speaker; flite's kal is then a known one.
    assert summary["splits"]["train"]["speakers"]["festival"] == ["kal"]
    assert summary["splits"]["dev"]["speakers"]["festival"] == ["ked"]
    assert summary["splits"]["test"]["speakers"]["festival"] == ["slt"]
    assert any("test_synth shares speakers ['kal']" in note for note in summary["notes"])
    assert all(m["augment"] for m in _meta(out, "train"))
    for m in _meta(out, "train"):
        words = m["label"].split()
        assert m["text"] == m["label"] and 3 <= len(words) <= 7
        assert set(words) <= {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
        assert m["num_samples"] > 16000 * 0.5


# ----------------------------------------------------------------------------------- planning only (no synthesis)

_FAKE_VOICES = [
    Voice("espeak-ng", "en-us+f3", "f3", "f", 22050, 100.0),
    Voice("espeak-ng", "en-gb+m3", "m3", "m", 22050, 100.0),
    Voice("flite", "rms", "rms", "m", 16000, None),
    Voice("flite", "slt", "slt", "f", 16000, 170.0),
]


@pytest.mark.parametrize("task", list(TASKS))
def test_plans_are_balanced_and_labelled_per_task(task):
    cfg = SynthConfig(task=task, out="unused", per_class=4)
    plan = plan_split(cfg, "train", _FAKE_VOICES)
    classes = TASKS[task]().classes()
    assert len(plan) == 4 * len(classes)
    assert plan == plan_split(cfg, "train", _FAKE_VOICES)  # deterministic
    other_seed = plan_split(SynthConfig(task=task, out="unused", per_class=4, seed=1), "train", _FAKE_VOICES)
    assert [u.seed for u in plan] != [u.seed for u in other_seed]
    for utt in plan:
        if utt.voice is not None:
            assert utt.request() is not None  # the text passes the engines' character check
            assert (utt.pitch is None) == (utt.voice.base_f0 is None)
            assert 0.8 <= utt.rate <= 1.25
            # the f0-range style: flite and festival voices whose f0 can be steered; espeak-ng has no such option
            steerable = utt.voice.base_f0 is not None and utt.voice.synth != "espeak-ng"
            assert (utt.intonation is not None) == steerable
            assert utt.intonation is None or 0.5 <= utt.intonation <= 1.8
            assert utt.meta()["intonation"] == utt.intonation
    if task == "intent":
        assert len(classes) == 31
        for utt in plan:
            action, obj, loc = utt.label.split("|")
            assert action in FSC_ACTIONS and obj in FSC_OBJECTS and loc in FSC_LOCATIONS
            assert loc == "none" or loc in utt.text
    if task == "sentences":
        assert all(utt.label == utt.text and 4 <= len(utt.text.split()) <= 10 for utt in plan)


def test_split_sizes_do_not_change_each_others_content():
    small = plan_split(SynthConfig(task="commands", out="x", per_class=2, eval_per_class=1), "train", _FAKE_VOICES)
    large = plan_split(SynthConfig(task="commands", out="x", per_class=2, eval_per_class=9), "train", _FAKE_VOICES)
    assert small == large


def test_intent_phrasings_say_the_location_and_vary():
    assert len(FSC_INTENTS) == 31 and len(set(FSC_INTENTS)) == 31
    kitchen = intent_phrasings("activate", "lights", "kitchen")
    assert "turn on the kitchen lights" in kitchen and "turn on the lights in the kitchen" in kitchen
    assert all("kitchen" in p for p in kitchen)
    assert "change the language to chinese" in intent_phrasings("change language", "Chinese", "none")
    for intent in FSC_INTENTS:
        assert len(set(intent_phrasings(*intent))) >= 4, intent


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, ["train"]), (2, ["train", "test"]), (4, ["train", "train", "dev", "test"]),
     (20, ["train"] * 14 + ["dev"] * 3 + ["test"] * 3)],
)  # fmt: skip
def test_assign_speakers_keeps_the_last_for_testing(n, expected):
    order = [f"s{i}" for i in range(n)]
    assert list(assign_speakers(order, 0.15, 0.15).values()) == expected


def test_trim_silence_keeps_the_speech_and_a_margin():
    x = np.zeros(16000, dtype=np.float32)
    x[5000:9000] = 0.5
    y = trim_silence(x)
    assert 4000 <= len(y) <= 4000 + 2 * 320 + 160
    assert np.abs(y).max() == 0.5


def test_config_rejects_bad_options():
    with pytest.raises(ConfigError, match="unknown task"):
        SynthConfig(task="asr", out="x")
    with pytest.raises(ConfigError, match="heldout_synth"):
        SynthConfig(task="commands", out="x", synths=["espeak-ng", "flite"])
    with pytest.raises(ConfigError, match="per_class"):
        SynthConfig(task="commands", out="x", per_class=0)


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_help_lists_the_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["synth", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for key in ("--heldout-synth", "--per-class", "augment.fraction", "augment.noise_snrs", "rate_range"):
        assert key in text


def test_cli_bad_override_fails_with_one_line_and_code_2(tmp_path, capsys):
    code = main(["synth", "--task", "commands", "--out", str(tmp_path / "c"), "augment.fraction=2"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "augment.fraction" in err
    assert not (tmp_path / "c").exists()


def test_cli_builds_a_corpus(tmp_path, capsys):
    out = tmp_path / "digits"
    args = ["synth", "--task", "digits", "--out", str(out), "--per-class", "1", "--eval-per-class", "1",
            "--no-progress", "--workers", "1", "--synths", "espeak-ng", "festival", "--heldout-synth", "festival",
            "babble_sources=2", "augment.noise_snrs=[3, 6]"]  # fmt: skip
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out / "corpus.json")
    summary = json.loads((out / "corpus.json").read_text())
    assert "babble_sources=2" in summary["command"] and "--synths espeak-ng festival" in summary["command"]
    assert "augment.noise_snrs=[3.0, 6.0]" in summary["command"]
    assert len(read_labels(out / "train.labels")) == 5  # one digit string per length 3..7
    snrs = {m["augment"]["noise"]["snr_db"] for m in _meta(out, "train") if m["augment"] and "noise" in m["augment"]}
    assert snrs <= {3.0, 6.0}
