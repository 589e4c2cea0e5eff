"""`speechprompt compare`: aggregation over seeds (mean, sample std, best checkpoint chosen on dev) and its table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from speechprompt.compare import CompareConfig, SplitFiles, aggregate, format_table
from speechprompt.config import ConfigError


def _cfg(tmp_path: Path, methods: list[str]) -> CompareConfig:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    for m in methods:
        (conf / f"{m}.yaml").write_text("# placeholder\n")
    return CompareConfig(
        conf_dir=str(conf), methods=methods, seeds=3, out=str(tmp_path / "out"),
        eval={"test": SplitFiles("t.units", "t.labels"), "test_synth": SplitFiles("s.units", "s.labels")},
    )


def _run(method: str, seed: int, dev: float, test: float, synth: float, tmp_path: Path) -> dict:
    return {
        "method": method, "seed": seed, "default_metric": "greedy.accuracy",
        "splits": {"test": {"greedy.accuracy": test}, "test_synth": {"greedy.accuracy": synth}},
        "summary": {"dev": {"greedy.accuracy": dev}, "trainable_params": 100, "checkpoint_bytes": 1234,
                    "checkpoint": str(tmp_path / f"out/{method}/seed{seed}/best.safetensors"),
                    "peak_rss_bytes": 1000 * seed, "mean_step_seconds": 0.1 * seed},
    }


def test_aggregate_statistics_and_dev_selected_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, ["a", "b"])
    runs = [
        _run("a", 1, dev=0.2, test=0.9, synth=0.5, tmp_path=tmp_path),  # best on test, but not on dev
        _run("a", 2, dev=0.6, test=0.5, synth=0.4, tmp_path=tmp_path),
        _run("a", 3, dev=0.4, test=0.7, synth=0.3, tmp_path=tmp_path),
        _run("b", 2, dev=0.1, test=0.1, synth=0.1, tmp_path=tmp_path),
        _run("b", 1, dev=0.3, test=0.3, synth=0.3, tmp_path=tmp_path),
        _run("b", 3, dev=0.2, test=0.2, synth=0.2, tmp_path=tmp_path),
    ]
    rows = aggregate(cfg, runs, base_params=1000)
    a, b = rows
    assert a["method"] == "a" and a["seeds"] == [1, 2, 3]
    assert a["accuracy_mean"] == pytest.approx(0.7)
    assert a["accuracy_std"] == pytest.approx(0.2)  # sample std (ddof = 1) of 0.9, 0.5, 0.7
    assert a["splits"]["test_synth"]["mean"] == pytest.approx(0.4)
    assert a["checkpoint"] == "out/a/seed2/best.safetensors"  # chosen on dev, relative to the working directory
    assert b["checkpoint"] == "out/b/seed1/best.safetensors"
    assert a["trainable_percent"] == pytest.approx(10.0)
    assert a["peak_rss_bytes"] == 3000 and a["mean_step_seconds"] == pytest.approx(0.2)
    table = format_table(rows, ["test", "test_synth"])
    assert "| a | 0.700 ± 0.200 | 0.400 ± 0.100 | 100 | 10 |" in table
    assert table.count("\n") == 4


def test_a_single_seed_has_zero_spread_and_the_table_shows_no_spread(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, ["a"])
    cfg.seeds = 1
    rows = aggregate(cfg, [_run("a", 1, 0.5, 0.25, 0.5, tmp_path)], base_params=None)
    assert rows[0]["accuracy_std"] == 0.0 and rows[0]["trainable_percent"] is None
    assert not math.isnan(rows[0]["accuracy_mean"])
    assert "| a | 0.250 (1 seed) | 0.500 (1 seed) |" in format_table(rows, ["test", "test_synth"])  # no "± 0.000"


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config"):
        CompareConfig(conf_dir=str(tmp_path), methods=["missing"])
    cfg = _cfg(tmp_path, ["a"])
    with pytest.raises(ConfigError, match="primary split"):
        CompareConfig(conf_dir=cfg.conf_dir, methods=["a"], eval=cfg.eval, primary="dev")
