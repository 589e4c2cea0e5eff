"""`speechprompt score`: eval_lm-style log-probabilities, checked against fairseq's own SequenceScorer (run as an
oracle in its own environment: tests/oracles/fairseq/unit_lm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from oracle import run_oracle

from speechprompt.cli import main
from speechprompt.dictionary import Dictionary
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig, save_unit_lm

N_UNITS = 12
LINES = ["3 3 7 0 11", "", "5", "1 2 3 4 5 6 7 8 9 10 11 0 1 2", "8 8"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A tiny random unit LM saved by our code, with its dict.txt. Read only."""
    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named("tiny", vocab_size=N_UNITS + 4, embed_dim=32, ffn_dim=64)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("lm") / "checkpoint_best.pt"
    save_unit_lm(model, Dictionary.for_units(N_UNITS), path)
    return path


def _score(capsys, *args: str) -> list[dict]:
    assert main(["score", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.fixture(scope="module")
def fairseq_scores(lm: Path, tmp_path_factory) -> list[dict]:
    """fairseq loads :func:`lm` and scores :data:`LINES` with its SequenceScorer."""
    out = run_oracle("fairseq", "unit_lm", tmp_path_factory.mktemp("fairseq_scores"), load={"lm": str(lm)},
                     score={"lm": LINES})
    return torch.load(out / "lm.ref.pt", weights_only=True)["scores"]


@pytest.mark.fairseq
def test_matches_fairseq_sequence_scorer(tmp_path: Path, lm: Path, fairseq_scores: list[dict], capsys) -> None:
    units = tmp_path / "test.units"
    units.write_text("\n".join(LINES) + "\n")
    ours = _score(capsys, "--checkpoint", str(lm), "--units", str(units), "--batch-size", "2")
    assert len(ours) == len(fairseq_scores) == len(LINES)
    for result, theirs in zip(ours, fairseq_scores):
        assert result["tokens"] == theirs["tokens"]
        assert result["logprob"] == pytest.approx(theirs["logprob"], abs=1e-4)


def test_batch_size_does_not_change_scores(tmp_path: Path, lm: Path, capsys) -> None:
    units = tmp_path / "test.units"
    units.write_text("\n".join(LINES) + "\n")
    one = _score(capsys, "--checkpoint", str(lm), "--units", str(units), "--batch-size", "1")
    many = _score(capsys, "--checkpoint", str(lm), "--units", str(units), "--batch-size", "4",
                  "--dict", str(lm.parent / "dict.txt"))
    assert [r["tokens"] for r in one] == [len(line.split()) + 1 for line in LINES]
    for a, b in zip(one, many):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
        assert a["logprob"] < 0


@pytest.mark.parametrize("bad", ["12", "x", "<s>"])
def test_unknown_unit_names_the_line(tmp_path: Path, lm: Path, capsys, bad: str) -> None:
    units = tmp_path / "bad.units"
    units.write_text(f"1 2\n3 {bad} 4\n")
    assert main(["score", "--checkpoint", str(lm), "--units", str(units)]) == 2
    err = capsys.readouterr().err
    assert f"bad.units:2: unit {bad!r} is not in the LM's dictionary (12 units)" in err
    assert len(err.strip().splitlines()) == 1
