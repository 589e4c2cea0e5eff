"""The three engines, driven for real: voice discovery, rate and pitch control, batching, missing binaries."""

from __future__ import annotations

import numpy as np
import pytest

from speechprompt.data_prep.voices import (
    SYNTHESIZERS,
    Request,
    SynthesisError,
    SynthesizerMissingError,
    get_synthesizer,
    synthesize,
)
from speechprompt.errors import SpeechPromptError


def _voice(synth: str, name: str):
    return next(v for v in get_synthesizer(synth).voices() if v.name == name)


@pytest.mark.parametrize(("synth", "voice"), [("flite", "slt"), ("festival", "kal_diphone")])
def test_intonation_changes_the_melody_but_not_the_timing(synth, voice):
    v = _voice(synth, voice)
    flat, lively = synthesize([Request("is it on the left or on the right", v, 1.0, 1.0, k) for k in (0.5, 1.8)])
    assert len(flat[0]) == len(lively[0])  # durations come from the rate alone
    assert not np.allclose(flat[0], lively[0], atol=1e-3)
    with pytest.raises(SynthesisError, match="intonation"):
        Request("yes", v, intonation=5.0)


def test_engines_are_registered_by_name():
    assert list(SYNTHESIZERS) == ["espeak-ng", "flite", "festival"]


def test_espeak_combines_accents_with_variants():
    voices = get_synthesizer("espeak-ng").voices()
    names = {v.name for v in voices}
    assert {"en-us", "en-us+f3", "en-gb-scotland+klatt", "en-029+m7"} <= names
    assert not any(n.startswith("mb-") for n in names)  # MBROLA databases are separate packages
    speakers = {v.speaker for v in voices}
    assert len(speakers) > 50 and {"default", "f3", "klatt", "Mr serious"} <= speakers
    assert {v.gender for v in voices} >= {"f", "m"}
    assert len({v.id for v in voices}) == len(voices)


def test_flite_and_festival_voices_share_speakers():
    flite = {v.name: v for v in get_synthesizer("flite").voices()}
    festival = {v.name: v for v in get_synthesizer("festival").voices()}
    assert set(flite) == {"kal", "kal16", "awb", "rms", "slt"}  # awb_time (limited domain) is left out
    assert flite["kal"].speaker == flite["kal16"].speaker == festival["kal_diphone"].speaker == "kal"
    assert flite["slt"].speaker == festival["cmu_us_slt_arctic_hts"].speaker == "slt"
    assert flite["rms"].base_f0 is None and festival["cmu_us_slt_arctic_hts"].base_f0 is None
    # festvox-kdlpc16k: a second diphone speaker, heard only with the rest of festival (install_system_deps.sh)
    assert festival["ked_diphone"].speaker == "ked" and festival["ked_diphone"].base_f0 == 105.0
    # Held-out last: kal and slt (festival's speakers) are kept out of training by default.
    assert get_synthesizer("flite").speaker_order(list(flite.values())) == ["awb", "rms", "kal", "slt"]


@pytest.mark.parametrize(
    ("synth", "voice", "rate"),
    [("espeak-ng", "en-gb+f2", 22050), ("flite", "kal", 8000), ("flite", "slt", 16000),
     ("festival", "kal_diphone", 16000), ("festival", "ked_diphone", 16000),
     ("festival", "cmu_us_slt_arctic_hts", 32000)],
)  # fmt: skip
def test_each_engine_speaks_at_its_rate_and_rate_controls_duration(synth, voice, rate):
    v = _voice(synth, voice)
    slow, normal, fast = synthesize([Request("turn on the lights", v, r) for r in (0.8, 1.0, 1.25)])
    for audio, sr in (slow, normal, fast):
        assert sr == rate == v.sample_rate
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert 0.4 * sr < len(audio) < 4 * sr
        assert np.abs(audio).max() > 0.01
    assert len(slow[0]) > len(normal[0]) > len(fast[0])


@pytest.mark.parametrize(("synth", "voice"), [("espeak-ng", "en-us+m3"), ("flite", "awb"), ("festival", "kal_diphone")])
def test_pitch_moves_the_output_where_the_voice_allows_it(synth, voice):
    v = _voice(synth, voice)
    low, high = synthesize([Request("go left", v, 1.0, p) for p in (0.85, 1.2)])
    assert not np.array_equal(low[0][: min(len(low[0]), len(high[0]))], high[0][: min(len(low[0]), len(high[0]))])


def test_synthesis_is_deterministic_and_keeps_request_order_across_engines():
    reqs = [
        Request("yes", _voice("festival", "kal_diphone"), 1.1),
        Request("yes", _voice("espeak-ng", "en-us+f3"), 0.9, 1.1),
        Request("no", _voice("flite", "rms"), 1.0),
        Request("no", _voice("festival", "cmu_us_slt_arctic_hts"), 0.9),
    ]
    first, second = synthesize(reqs), synthesize(reqs)
    assert [sr for _, sr in first] == [16000, 22050, 16000, 32000]
    for (a, _), (b, _) in zip(first, second):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("text", ["-rf hello", 'say "hi"', "(voice_kal_diphone)", "", "tab\there"])
def test_requests_reject_text_that_could_be_read_as_options_or_code(text):
    with pytest.raises(SynthesisError, match="characters"):
        Request(text, _voice("flite", "slt"))


@pytest.mark.parametrize("name", list(SYNTHESIZERS))
def test_missing_engine_names_the_binary_and_the_apt_package(name, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    synth = SYNTHESIZERS[name]()
    with pytest.raises(SynthesizerMissingError) as err:
        synth.check()
    message = str(err.value)
    assert f"{synth.binary} not found" in message
    assert f"apt-get install {synth.apt_package}" in message
    assert isinstance(err.value, SpeechPromptError)


def test_unknown_engine_is_a_clear_error():
    with pytest.raises(SpeechPromptError, match="unknown synthesizer 'mbrola'"):
        get_synthesizer("mbrola")
