"""Every recipe launcher parses (``bash -n``), prints its usage with ``--help``, refuses unknown options, and stops
with one clear line when a file it needs is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_SCRIPTS = sorted((ROOT / "recipes").glob("*/run.sh"))
IDS = [p.parent.name for p in RUN_SCRIPTS]
# Recipes on public datasets: they start from prepare-dataset and the official GSLM files.
REAL_DATA = ["speech_commands", "fluent_commands", "librispeech_asr", "snips_sf"]


def _run(script: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


def test_recipes_ship_launchers():
    assert set(REAL_DATA) <= set(IDS)
    assert {"synthetic_intent", "synthetic_digits"} <= set(IDS)


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=IDS)
def test_run_sh_is_valid_bash_and_strict(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert "python" not in text.replace("speechprompt", ""), "recipes call the speechprompt CLI, not Python"


@pytest.mark.parametrize("script", RUN_SCRIPTS, ids=IDS)
def test_run_sh_help_and_unknown_option(script):
    result = _run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage:") and "--stage" in result.stdout and "--stop-stage" in result.stdout
    bad = _run(script, "--no-such-option")
    assert bad.returncode == 2
    assert "unknown option '--no-such-option'" in bad.stderr


@pytest.mark.parametrize("name", REAL_DATA)
def test_real_data_recipes_name_the_missing_file(name, tmp_path):
    script = ROOT / "recipes" / name / "run.sh"
    result = _run(script, "--stage", "1", "--stop-stage", "1", "--exp", str(tmp_path))
    assert result.returncode == 1 and "--root is required" in result.stderr
    result = _run(script, "--stage", "2", "--stop-stage", "2", "--exp", str(tmp_path),
                  "--hubert", str(tmp_path / "hubert_base_ls960.pt"))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith(f"missing the HuBERT-base checkpoint "
                                                           f"(hubert_base_ls960.pt): {tmp_path}/hubert_base_ls960.pt")
    for f in ("hubert_base_ls960.pt", "km.bin"):
        (tmp_path / f).write_bytes(b"")
    result = _run(script, "--stage", "2", "--stop-stage", "2", "--exp", str(tmp_path),
                  "--hubert", str(tmp_path / "hubert_base_ls960.pt"), "--kmeans", str(tmp_path / "km.bin"))
    assert result.returncode == 1 and f"missing the train manifest (run stage 1): {tmp_path}/data/train.tsv" \
        in result.stderr


@pytest.mark.parametrize("name", REAL_DATA)
def test_real_data_recipes_document_the_published_numbers(name):
    readme = (ROOT / "recipes" / name / "README.md").read_text()
    published = {"speech_commands": ["95.16", "0.08M", ".946"], "fluent_commands": ["98.40", "0.15M", ".973"],
                 "librispeech_asr": ["34.17", "4.5M"], "snips_sf": ["66.90", "4.5M"]}[name]
    for number in published:
        assert number in readme
    assert "ours" in readme.lower()


DATA_PREP_SCRIPTS = sorted((ROOT / "data_prep").glob("*.sh"))


@pytest.mark.parametrize("script", DATA_PREP_SCRIPTS, ids=[p.stem for p in DATA_PREP_SCRIPTS])
def test_data_prep_wrappers_are_thin(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert f"exec speechprompt prepare-dataset {script.stem} " in script.read_text()
    help_ = _run(script, "--help")
    assert help_.returncode == 0 and help_.stdout.startswith("Usage:")
    assert _run(script).returncode == 2  # ROOT and OUT are required


def test_data_prep_wrapper_passes_root_out_and_options(tmp_path):
    # One real call (each costs a CLI start-up): the error names the dataset, the root and the option check.
    script = ROOT / "data_prep" / "snips.sh"
    result = _run(script, str(tmp_path / "nowhere"), str(tmp_path / "out"), "lowercase=true")
    assert result.returncode == 2
    assert f"snips: dataset root {tmp_path / 'nowhere'} is not a folder" in result.stderr
