"""Augmentations keep lengths and levels where they should and hit the SNRs they are asked for."""

from __future__ import annotations

import numpy as np
import pytest

from speechprompt.config import ConfigError, from_dict
from speechprompt.data_prep.augment import (
    AugmentConfig,
    add_noise,
    apply_additive,
    babble,
    colored_noise,
    hum,
    mu_law,
    power,
    reverberate,
    sample_augmentation,
    speed_perturb,
    synthetic_rir,
    telephone,
)

SR = 16000


def _tone(freq: float, seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_freq(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SR)[np.argmax(spectrum)])


def _snr(clean: np.ndarray, noisy: np.ndarray, ref_power: float | None = None) -> float:
    ref = power(clean) if ref_power is None else ref_power
    return 10 * np.log10(ref / power(noisy - clean))


@pytest.mark.parametrize("factor", [0.9, 0.95, 1.0, 1.07, 1.1])
def test_speed_perturb_scales_length_and_pitch_by_the_factor(factor):
    x = _tone(440.0, 1.0013)  # an odd length, so rounding is exercised
    y = speed_perturb(x, factor)
    assert len(y) == round(len(x) / factor)
    assert y.dtype == np.float32
    assert _peak_freq(y) == pytest.approx(440.0 * factor, abs=2.0)
    assert np.sqrt(power(y)) == pytest.approx(np.sqrt(power(x)), rel=0.02)


@pytest.mark.parametrize("color", ["white", "pink", "brown"])
@pytest.mark.parametrize("snr_db", [0.0, 5.0, 10.0, 20.0])
def test_add_noise_hits_the_requested_snr(color, snr_db):
    rng = np.random.default_rng(0)
    x = _tone(300.0)
    y = add_noise(x, colored_noise(len(x), color, rng), snr_db)
    assert len(y) == len(x)
    assert abs(_snr(x, y) - snr_db) < 0.5


def test_add_noise_snr_is_relative_to_the_given_speech_power():
    rng = np.random.default_rng(1)
    word = _tone(200.0, 0.3)
    clip = np.pad(word, (4000, 8000))  # a short word in a longer clip
    y = add_noise(clip, colored_noise(len(clip), "white", rng), 10.0, ref_power=power(word))
    assert abs(_snr(clip, y, ref_power=power(word)) - 10.0) < 0.5
    assert _snr(clip, y) < 10.0 - 3.0  # against the padded clip's power it would be far lower


def test_babble_and_hum_hit_the_requested_snr():
    rng = np.random.default_rng(2)
    sources = [_tone(f, s) * rng.uniform(0.1, 1) for f, s in [(150, 0.7), (220, 1.3), (310, 0.4), (400, 2.0)]]
    x = _tone(500.0)
    b = babble(len(x), sources, talkers=3, rng=rng)
    assert len(b) == len(x) and power(b) == pytest.approx(1.0, rel=1e-3)
    for noise, snr_db in [(b, 5.0), (hum(len(x), rng), 15.0)]:
        assert abs(_snr(x, add_noise(x, noise, snr_db)) - snr_db) < 0.5


def test_apply_additive_hits_both_snrs_of_an_augmentation():
    rng = np.random.default_rng(3)
    x = _tone(250.0)
    aug = {"noise": {"color": "pink", "snr_db": 10.0}}
    y = apply_additive(x, aug, rng, ref_power=power(x))
    assert abs(_snr(x, y) - 10.0) < 0.5
    assert apply_additive(x, None, rng, ref_power=power(x)) is x


def test_noise_colors_have_unit_power_and_the_right_tilt():
    rng = np.random.default_rng(4)
    n = 32001  # a prime-ish length: the generator pads internally and must crop back
    low_high = {}
    for color in ["white", "pink", "brown"]:
        y = colored_noise(n, color, rng)
        assert len(y) == n and power(y) == pytest.approx(1.0, rel=1e-3)
        spectrum = np.abs(np.fft.rfft(y)) ** 2
        freqs = np.fft.rfftfreq(n, 1 / SR)
        low_high[color] = spectrum[(freqs > 100) & (freqs < 400)].mean() / spectrum[(freqs > 4000)].mean()
    assert 0.5 < low_high["white"] < 2.0
    assert low_high["white"] < low_high["pink"] < low_high["brown"]
    with pytest.raises(ValueError, match="unknown noise color"):
        colored_noise(10, "purple", rng)


@pytest.mark.parametrize("rt60", [0.2, 0.6])
def test_synthetic_rir_decays_by_60_db_at_rt60(rt60):
    rir = synthetic_rir(rt60, np.random.default_rng(5))
    assert rir[0] == 1.0
    assert len(rir) == int(rt60 * SR)
    tail = rir[1:].astype(np.float64) ** 2
    head_energy = tail[: int(0.05 * SR)].mean()
    end_energy = tail[-int(0.05 * SR) :].mean()
    assert 10 * np.log10(head_energy / end_energy) > 40.0


def test_reverberate_keeps_length_and_power_and_smears_in_time():
    rng = np.random.default_rng(6)
    x = np.zeros(SR, dtype=np.float32)
    x[2000:2400] = _tone(300.0, 0.025)
    y = reverberate(x, synthetic_rir(0.5, rng))
    assert len(y) == len(x)
    assert power(y) == pytest.approx(power(x), rel=1e-3)
    assert np.abs(y[4000:8000]).max() > 1e-3  # the tail rings after the burst ended


def test_sample_augmentation_respects_fraction_ranges_and_seed():
    cfg = AugmentConfig()
    draws = [sample_augmentation(cfg, np.random.default_rng(i)) for i in range(400)]
    augmented = [d for d in draws if d]
    assert abs(len(augmented) / len(draws) - cfg.fraction) < 0.1
    for d in augmented:
        assert set(d) <= {"speed", "reverb", "telephone", "noise", "babble"}
        if "speed" in d:
            assert 0.9 <= d["speed"] <= 1.1
        if "noise" in d:
            assert d["noise"]["snr_db"] in cfg.noise_snrs
        if "babble" in d:
            assert 2 <= d["babble"]["talkers"] <= 6
    assert {k for d in augmented for k in d} == {"speed", "reverb", "telephone", "noise", "babble"}
    assert 0.08 < sum("telephone" in d for d in augmented) / len(augmented) < 0.22  # telephone_prob 0.15
    assert draws[7] == sample_augmentation(cfg, np.random.default_rng(7))
    never = AugmentConfig(fraction=0.0)
    assert all(sample_augmentation(never, np.random.default_rng(i)) is None for i in range(50))
    always = AugmentConfig(fraction=1.0, speed_prob=0, reverb_prob=0, telephone_prob=0, noise_prob=0, babble_prob=0)
    assert all(sample_augmentation(always, np.random.default_rng(i)) for i in range(50))  # noise as a fallback


def test_augment_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="fraction"):
        AugmentConfig(fraction=1.5)
    with pytest.raises(ConfigError, match="speed_range"):
        AugmentConfig(speed_range=[1.1, 0.9])
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(AugmentConfig, {"fractoin": 0.5})


def test_reverberate_is_a_linear_convolution_cut_to_length():
    rng = np.random.default_rng(8)
    x = rng.standard_normal(3001).astype(np.float32)
    rir = synthetic_rir(0.1, rng)
    expected = np.convolve(x.astype(np.float64), rir.astype(np.float64))[: len(x)]
    expected *= np.sqrt(power(x) / power(expected))
    np.testing.assert_allclose(reverberate(x, rir), expected, atol=1e-4)


def _band_energy(x: np.ndarray, low: float, high: float) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / SR)
    return float(spectrum[(f >= low) & (f < high)].sum())


def test_telephone_keeps_the_band_removes_the_rest_and_the_power():
    rng = np.random.default_rng(11)
    x = colored_noise(SR, "white", rng) * 0.1  # flat spectrum: every band starts equal
    y = telephone(x, np.random.default_rng(12))
    assert len(y) == len(x) and y.dtype == np.float32
    assert power(y) == pytest.approx(power(x), rel=1e-3)
    inside = _band_energy(y, 500, 3000) / 2500  # per Hz
    assert _band_energy(y, 0, 150) / 150 < 1e-3 * inside  # below the 250-350 Hz edge and its roll-off
    assert _band_energy(y, 3800, 8000) / 4200 < 1e-3 * inside  # above 3600 Hz + roll-off: 8 kHz sampling
    # a tone in the band survives; one above it is gone
    assert _peak_freq(telephone(_tone(1000.0), np.random.default_rng(0))) == pytest.approx(1000.0, abs=2)
    assert power(telephone(_tone(1000.0) + _tone(6000.0), rng)) == pytest.approx(power(_tone(1000.0) + _tone(6000.0)))
    # deterministic given the generator's seed, and the seed matters
    same = telephone(x, np.random.default_rng(12))
    np.testing.assert_array_equal(y, same)
    assert not np.array_equal(y, telephone(x, np.random.default_rng(13)))


def test_mu_law_error_is_small_and_grows_with_the_level():
    rng = np.random.default_rng(14)
    for level in (0.01, 0.5):
        x = (level * rng.uniform(-1, 1, 8000)).astype(np.float32)
        y = mu_law(x)
        snr = 10 * np.log10(power(x) / power(y - x))
        assert 30 < snr < 45  # G.711's ~38 dB, nearly independent of the level
        err = np.abs(y - x)
        assert err.max() <= 0.06 * level + 1e-4  # the step size scales with the level (companding)
    np.testing.assert_array_equal(mu_law(np.array([0.0, 1.0, -1.0], dtype=np.float32)), [0.0, 1.0, -1.0])


def test_synthetic_rir_has_early_reflections_within_30_ms():
    rir = synthetic_rir(0.5, np.random.default_rng(15)).astype(np.float64)
    early = np.abs(rir[int(0.001 * SR) : int(0.030 * SR) + 1])
    tail_rms = np.sqrt(np.mean(rir[int(0.030 * SR) : int(0.060 * SR)] ** 2))
    # at least three taps stand far above the diffuse tail there, and none reaches the direct path
    assert (early > 4 * tail_rms).sum() >= 3
    assert early.max() < 1.0
    np.testing.assert_array_equal(rir, synthetic_rir(0.5, np.random.default_rng(15)))
