"""The bag-of-units probe that the demo uses to choose its units on dev."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from speechprompt.cli import main
from speechprompt.data_prep.units_probe import choose, histogram, probe

LABELS = ["yes", "no", "up"]


def test_histogram_unit_and_bigram_fractions() -> None:
    h = histogram([[1, 1, 2], [], [0]], k=3)  # (3, 3 + 9)
    assert h.shape == (3, 12)
    np.testing.assert_allclose(h[0, :3], [0, 2 / 3, 1 / 3])
    # deduplicated [1, 2]: one bigram (1, 2) at 3 + 1 * 3 + 2
    assert h[0, 3 + 1 * 3 + 2] == 1.0 and h[0, 3:].sum() == 1.0
    assert not h[1].any()  # no units, no features
    np.testing.assert_allclose(h[2], [1.0] + [0.0] * 11)  # one unit: no bigram


def _corpus(tmp_path: Path, rng: np.random.Generator, informative: bool) -> Path:
    """Units of three labels: each label draws from its own 4 of 12 units, or (not informative) from all 12."""
    folder = tmp_path / ("good" if informative else "noise")
    folder.mkdir()
    for split, n in (("train", 60), ("dev", 30)):
        lines, labels = [], []
        for i in range(n):
            c = i % 3
            pool = np.arange(4 * c, 4 * c + 4) if informative else np.arange(12)
            lines.append(" ".join(str(u) for u in rng.choice(pool, size=int(rng.integers(5, 15)))))
            labels.append(LABELS[c])
        (folder / f"{split}.units").write_text("\n".join(lines) + "\n")
        (tmp_path / f"{split}.labels").write_text("\n".join(labels) + "\n")
    return folder


def test_probe_scores_informative_units_and_the_choice_goes_to_them(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    noise, good = _corpus(tmp_path, rng, False), _corpus(tmp_path, rng, True)
    results = {"noise": probe(noise, tmp_path), "good": probe(good, tmp_path)}
    assert results["good"]["dev_accuracy"] == 1.0
    assert results["noise"]["dev_accuracy"] < 0.6  # chance is 1/3
    assert 3.5 < results["good"]["unit_perplexity"] <= 12.0  # 12 units used about evenly
    assert choose(results, "dev") == "good"
    # A tie goes to the baseline, the candidate named first.
    assert choose({"a": {"dev_accuracy": 0.5}, "b": {"dev_accuracy": 0.5}}, "dev") == "a"


def test_cli_prints_the_choice_and_writes_every_score(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(1)
    noise, good = _corpus(tmp_path, rng, False), _corpus(tmp_path, rng, True)
    out = tmp_path / "choice.json"
    assert main(["units-probe", "--labels", str(tmp_path), f"mfcc={noise}", f"hubert={good}", "--choose", "dev",
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out == "hubert\n"
    report = json.loads(out.read_text())
    assert report["chosen"] == "hubert" and report["baseline"] == "mfcc" and report["split"] == "dev"
    assert set(report["results"]) == {"mfcc", "hubert"}
    assert report["results"]["hubert"]["dev_accuracy"] == 1.0


def test_cli_refuses_units_and_labels_of_different_lengths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = _corpus(tmp_path, np.random.default_rng(2), True)
    (tmp_path / "dev.labels").write_text("yes\nno\n")
    assert main(["units-probe", "--labels", str(tmp_path), f"good={good}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "dev.labels has 2 lines but" in err
