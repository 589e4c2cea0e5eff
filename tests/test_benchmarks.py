"""Smoke tests of the benchmarks against fairseq: tiny models, one round, the JSON fields. Timings are never tested."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from oracle import require_oracle_python

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.fairseq
def test_vs_fairseq_quick_runs_every_case_and_both_sides_agree() -> None:
    python = require_oracle_python("fairseq")
    env = {**os.environ, "SPEECHPROMPT_FAIRSEQ_PYTHON": str(python)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "vs_fairseq.py"), "--quick", "--threads", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["benchmark"] == "vs_fairseq" and out["quick"] is True
    assert set(out["results"]) == {"hubert_one", "hubert_batched", "lm_train", "decode", "prompt"}
    assert out["command"].startswith("python benchmarks/vs_fairseq.py")
    for case, rows in out["results"].items():
        assert rows, case
        for row in rows:
            assert row["threads"] == 1 and row["dtype"] in ("fp32", "bf16")
            sides = ("full_finetune", "deep_prompt", "deep_prompt_bf16_backbone") if case == "prompt" else (
                "ours", "fairseq")
            for side in sides:
                assert "error" not in row[side], (case, side, row[side])
                assert row[side]["seconds"] > 0 and row[side]["cpu_seconds"] > 0
            if case == "prompt":
                assert row["deep_prompt"]["trainable"] < row["full_finetune"]["trainable"]
                for name in ("deep_prompt", "deep_prompt_bf16_backbone"):
                    assert row[f"{name}_time_ratio"] > 0 and row[f"{name}_memory_ratio"] > 0
                    assert row[f"{name}_live_memory_ratio"] > 0
                for verdict in ("time", "memory", "live_memory"):
                    assert set(row[verdict]) >= {"target", "met"}
                continue
            assert row["speedup"] > 0 and row["verdict_on"] == "cpu_seconds"
            if case.startswith("hubert"):
                # Ours batched pads exactly: it agrees with fairseq one utterance at a time, frame for frame.
                assert row["features_agree"] is True
                reference = row["fairseq_one_at_a_time" if case == "hubert_batched" else "fairseq"]
                assert row["ours"]["frames"] == reference["frames"]
            if case == "hubert_batched":
                assert row["vs_fairseq_one_at_a_time"]["speedup"] > 0
            if case == "decode":
                assert row["outputs_match"] is True
            if case == "lm_train":
                assert row["ours"]["peak_memory_mb"] > 0 and row["memory_ratio"] > 0 and row["live_memory_ratio"] > 0
                assert "error" not in row["ours_foreach_adam"]
                assert set(row["speed"]) >= {"target", "met"} and set(row["memory"]) >= {"target", "met"}
            else:
                assert "target" in row and "met" in row


@pytest.mark.slow
@pytest.mark.transformers
def test_speechlm_quick_runs_ours_and_reports_peft_or_why_not() -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speechlm.py"), "--quick", "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["benchmark"] == "speechlm" and out["shape"] == "slam_qwen2.5_0.5b (2 layers)"
    rows = {r["config"]: r for r in out["results"]}
    assert set(rows) == {"ours_deep_prompt", "ours_full_ft", "peft_prefix", "peft_prompt"}
    for name, row in rows.items():
        if name.startswith("peft") and "error" in row:  # peft is a benchmark-only dependency
            assert "peft" in row["error"]
            continue
        assert row["train_tokens_per_s"] > 0 and row["decode_new_tokens_per_s"] > 0, name
    # Deep prompt L=5 with the separator on 2 layers of width 896: (2 * 2 + 1) * 5 * 896 + 896.
    assert rows["ours_deep_prompt"]["trainable_params"] == 5 * 5 * 896 + 896
    assert rows["ours_full_ft"]["trainable_params"] == rows["ours_full_ft"]["base_params"]


@pytest.mark.slow
@pytest.mark.fairseq
def test_encoders_quick_measures_every_architecture_and_ours_batched_is_exact() -> None:
    python = require_oracle_python("fairseq")
    env = {**os.environ, "SPEECHPROMPT_FAIRSEQ_PYTHON": str(python)}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "encoders.py"), "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["benchmark"] == "encoders" and out["quick"] is True
    assert [row["arch"] for row in out["results"]] == ["hubert", "wav2vec2", "data2vec_audio", "wavlm"]
    for row in out["results"]:
        peers = ("transformers",) if row["arch"] == "wavlm" else ("transformers", "fairseq")
        assert row["fairseq"] is None if row["arch"] == "wavlm" else row["fairseq"] is not None
        for impl in ("ours", *peers):
            for mode in ("one", "batched"):
                cell = row[impl][mode]
                assert "error" not in cell, (row["arch"], impl, mode, cell)
                assert cell["seconds"] > 0 and cell["rtf"] > 0
        # Every implementation reads the same features one at a time; ours batched too (the exact mode).
        assert all(row[impl]["one"]["max_abs_diff"] < 1e-4 for impl in ("ours", *peers))
        assert row["ours"]["batched"]["max_abs_diff"] < 1e-4
        assert row["ours_batched_vs_fastest_peer"] > 0


@pytest.mark.slow
def test_speechlm_memory_counts_without_allocating_what_the_real_step_allocates() -> None:
    """The fake (storage-less) step must count exactly what the same step allocates on real tensors."""
    base = [sys.executable, str(REPO / "benchmarks" / "speechlm_memory.py"), "--shapes", "slam_qwen2.5_0.5b",
            "--layers", "2", "--batch", "4", "--length", "32"]
    runs = {}
    for mode in ("fake", "real"):
        done = subprocess.run(base + (["--real"] if mode == "real" else []), cwd=REPO, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
        assert out["benchmark"] == "speechlm_memory" and out["fake"] is (mode == "fake")
        runs[mode] = {r["config"]: r for r in out["results"]}
    fake, real = runs["fake"], runs["real"]
    assert set(fake) == {"deep_prompt_bf16", "deep_prompt_bf16_ckpt", "full_ft_fp32"}
    for name in fake:
        assert fake[name]["peak_gb_by_category"] == real[name]["peak_gb_by_category"], name
        assert fake[name]["peak_gb"] == real[name]["peak_gb"] > 0, name
    deep, ckpt, full = fake["deep_prompt_bf16"], fake["deep_prompt_bf16_ckpt"], fake["full_ft_fp32"]
    base_params = full["parameters"]
    # bf16 frozen weights and fp32 prompts; fp32 weights, their gradients and two Adam moments.
    assert deep["peak_gb_by_category"]["Parameter"] == pytest.approx(
        (2 * base_params + 4 * deep["trainable"]) / 1e9, abs=2e-3)
    assert full["peak_gb_by_category"]["Optstate"] == pytest.approx(2 * 4 * base_params / 1e9, abs=2e-3)
    assert deep["peak_gb_by_category"]["Gradient"] == 0 and full["peak_gb_by_category"]["Gradient"] > 0
    assert ckpt["peak_gb_by_category"]["Activation"] < deep["peak_gb_by_category"]["Activation"]
    assert deep["peak_gb"] < full["peak_gb"] / 4
