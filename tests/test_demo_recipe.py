"""`make demo`'s recipe end to end at a small size: synthesize, learn units, pretrain a HuBERT, choose the units on
dev, pretrain the unit LM, compare, then `infer` with the checkpoint that results.json names. Slow (a few minutes),
and run in CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {"method", "accuracy_mean", "accuracy_std", "seeds", "trainable_params", "checkpoint_bytes", "checkpoint"}


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path: Path) -> None:
    # The recipe and its configs use paths relative to the repository root; run it from a scratch root instead.
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [
        "bash", str(ROOT / "recipes/synthetic_commands/run.sh"),
        "--per-class", "10", "--eval-per-class", "4", "--sentences", "60", "--k", "30", "--ulm-steps", "60",
        "--hubert-steps", "20", "--hubert-layers", "4",
        "--methods", "deep_prompt_learnable,linear_probe", "--seeds", "2", "--jobs", "2",
        "--train-options", "max_epochs=8 eval_batch_size=32",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    exp = tmp_path / "exp/synthetic_commands"
    rows = json.loads((exp / "results.json").read_text())
    assert [r["method"] for r in rows] == ["deep_prompt_learnable", "linear_probe"]
    for row in rows:
        assert set(row) >= ROW_KEYS
        assert row["seeds"] == [1, 2]
        assert 0.0 <= row["accuracy_mean"] <= 1.0
        assert set(row["splits"]) == {"test", "test_synth", "dev"}
        assert (tmp_path / row["checkpoint"]).is_file() and row["checkpoint"].startswith("exp/synthetic_commands/")
        assert row["checkpoint_bytes"] == (tmp_path / row["checkpoint"]).stat().st_size
    # Even this small a world learns something that carries over to voices never heard: 12 classes, chance 1/12.
    assert max(r["accuracy_mean"] for r in rows) >= 1.5 / 12, rows
    choice = json.loads((exp / "units_choice.json").read_text())
    # deep prompt, L = 20 on the 4-layer demo LM: (2 * 4 + 1) * 20 * 128 + the <s> separator, and the learnable
    # verbalizer Linear(units + 4 specials, 12 classes): --k 30 units of a k-means, or PocketSphinx's 42 phones
    n_units = 42 if choice["chosen"] == "phones" else 30
    assert rows[0]["trainable_params"] == 9 * 20 * 128 + 128 + (n_units + 4) * 12
    assert (exp / "results.md").read_text().count("\n") == 4
    assert (exp / "metric_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "deep_prompt_learnable" in proc.stdout  # the table is printed
    # The units were chosen on dev among the MFCC units, the phones and the HuBERT's layer, and the choice is on
    # record.
    assert set(choice["results"]) == {"mfcc_cmn", "phones", "hubert_L4"} and choice["split"] == "dev"
    assert choice["chosen"] == (exp / "units_choice.txt").read_text().strip()
    best = max(r["dev_accuracy"] for r in choice["results"].values())
    assert choice["results"][choice["chosen"]]["dev_accuracy"] == best
    assert (exp / "units/dev.units").read_text() == (exp / "candidates" / choice["chosen"] / "dev.units").read_text()
    assert (exp / "hubert/it1/checkpoint_best.pt").is_file()
    # The unit LM read the sentences and, unlabeled, the commands' training clips four times over.
    ulm_config = (exp / "ulm/config.yaml").read_text()
    assert "- exp/synthetic_commands/units/sentences/train.units\n" in ulm_config
    assert ulm_config.count("- exp/synthetic_commands/units/train.units\n") == 4
    if choice["chosen"] == "phones":
        # The sentences' units were taken from the HuBERT's phone targets, repeats merged: what `prepare --dedup`
        # gives.
        subprocess.run([sys.executable, "-m", "speechprompt.cli", "prepare", "--manifest",
                        "exp/synthetic_commands/data/sentences/dev.tsv", "--features", "phones", "--kmeans",
                        "exp/synthetic_commands/km_phones.safetensors", "--dedup", "--out", "check"],
                       cwd=tmp_path, check=True, capture_output=True, timeout=300)
        assert (tmp_path / "check/dev.units").read_text() == (exp / "units/sentences/dev.units").read_text()
    # Units were extracted in 2 shards (--nj 2) and merged; only the merged files stay.
    assert (exp / "units/train.summary.json").is_file()
    assert not list((exp / "units").rglob("*_2.units")) and not list((exp / "units").rglob("*_2.summary.json"))

    # The checkpoint named in results.json is ready for `infer`, with nothing but itself (and the files it records).
    wav = sorted((exp / "data/commands/wav/test").glob("*.wav"))[0]
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....not audio")
    out = subprocess.run(
        [sys.executable, "-m", "speechprompt.cli", "infer", "--checkpoint", rows[0]["checkpoint"], str(wav), str(bad)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["path"] == str(wav) and isinstance(lines[0]["prediction"], str)
    assert lines[1]["path"] == str(bad) and "error" in lines[1]
