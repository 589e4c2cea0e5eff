"""Every recipe launcher parses (``bash -n``), prints its usage with ``--help``, refuses unknown options, and stops
with one clear line when a file it needs is missing. The launchers are short: the stages live in the shared
templates of ``recipes/TEMPLATE/``, whose command lines are checked here with a stand-in ``speechprompt``."""

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
SYNTHETIC = ["synthetic_intent", "synthetic_digits"]
# Recipes that tune an encoder (SUPERB heads, CTC fine-tuning, AST): prepare-dataset, then compare.
ENCODER = ["speech_commands_superb", "fluent_commands_superb", "voxceleb1_superb", "iemocap_superb",
           "librispeech_superb", "librilight_ctc", "esc50_ast", "speech_commands_ast"]
TEMPLATES = sorted((ROOT / "recipes" / "TEMPLATE").glob("*.sh"))
# The published numbers each public-dataset recipe quotes, in its README and in its --help.
PUBLISHED = {"speech_commands": ["95.16", "0.08M", ".946"], "fluent_commands": ["98.40", "0.15M", ".973"],
             "librispeech_asr": ["34.17", "4.5M"], "snips_sf": ["66.90", "4.5M"]}


def _run(script: Path, *args: str, cwd: Path = ROOT, bin_dir: Path | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    path = os.pathsep.join([*([str(bin_dir)] if bin_dir else []), str(Path(sys.executable).parent),
                            os.environ.get("PATH", "")])
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env={**os.environ, **(env or {}), "PATH": path},
                          capture_output=True, text=True, timeout=60)


def _fake_speechprompt(tmp_path: Path) -> tuple[Path, Path]:
    """A ``speechprompt`` that only records its command line, one per line: the recipes' stages run in
    milliseconds and their exact calls can be compared."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "speechprompt"
    fake.write_text(f'#!/usr/bin/env bash\necho "speechprompt $*" >> "{log}"\n')
    fake.chmod(0o755)
    return bin_dir, log


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_recipes_ship_launchers():
    assert set(REAL_DATA) <= set(IDS)
    assert set(SYNTHETIC) <= set(IDS)
    assert set(ENCODER) <= set(IDS)
    assert {p.name for p in TEMPLATES} == {"common.sh", "prompt_task.sh", "synthetic_task.sh", "superb_task.sh"}


@pytest.mark.parametrize(("name", "template"), [(n, "prompt_task.sh") for n in REAL_DATA]
                         + [(n, "synthetic_task.sh") for n in SYNTHETIC] + [(n, "superb_task.sh") for n in ENCODER])
def test_launchers_only_set_what_differs_and_source_the_template(name, template):
    lines = (ROOT / "recipes" / name / "run.sh").read_text().splitlines()
    assert lines[-1] == f'source "${{recipe}}/../TEMPLATE/{template}" "$@"'
    assert len(lines) <= 30
    assert not any(line.startswith(("if ", "for ", "while ", "speechprompt")) for line in lines)


@pytest.mark.parametrize("template", TEMPLATES, ids=[p.name for p in TEMPLATES])
def test_templates_are_valid_bash_and_refuse_to_run_alone(template):
    subprocess.run(["bash", "-n", str(template)], check=True)
    text = template.read_text()
    assert text.startswith("# shellcheck shell=bash\n")
    assert not os.access(template, os.X_OK), "templates are sourced by a run.sh, not run"
    assert "python" not in text.replace("speechprompt", ""), "recipes call the speechprompt CLI, not Python"
    if template.name != "common.sh":
        assert "set -euo pipefail" in text
        result = _run(template, "--help")
        assert result.returncode == 1 and result.stdout == ""
        assert "error: 'recipe' must be set by the recipe's run.sh" in result.stderr


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
    for number in PUBLISHED[name]:
        assert number in readme
    assert "ours" in readme.lower()
    help_ = _run(ROOT / "recipes" / name / "run.sh", "--help").stdout
    assert help_.startswith(f"Usage: {ROOT}/recipes/{name}/run.sh --root DIR [options]\n")
    for number in PUBLISHED[name]:
        assert number in help_
    assert f"exp/{name}]" in help_  # the recipe's own default --exp


def test_prompt_task_stages_call_the_cli(tmp_path):
    # All four stages of the shared template through snips_sf, whose default prepare-dataset options are not empty,
    # with two extraction shards: the split, the merge, one training run and one evaluation per seed.
    bin_dir, log = _fake_speechprompt(tmp_path)
    exp, hubert, kmeans, ulm = tmp_path / "exp", tmp_path / "h.pt", tmp_path / "km.bin", tmp_path / "ulm.pt"
    _touch(hubert, kmeans, ulm, *(exp / "data" / f"{s}.tsv" for s in ("train", "dev", "test")),
           *(exp / "units" / f"{s}.units" for s in ("train", "dev", "test")),
           *(exp / "prompt" / f"seed{s}" / "best.safetensors" for s in (4, 5)))
    result = _run(ROOT / "recipes" / "snips_sf" / "run.sh", "--root", "/corpus", "--exp", str(exp), "--hubert",
                  str(hubert), "--kmeans", str(kmeans), "--ulm", str(ulm), "--seeds", "4 5", "--nj", "2",
                  "--device", "cpu", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    data, units, runs = exp / "data", exp / "units", exp / "prompt"
    assert calls[0] == f"speechprompt prepare-dataset snips --root /corpus --out {data} lowercase=true"
    extract = (f"--features hubert --checkpoint {hubert} --layer 6 --kmeans {kmeans} --out {units} --dedup "
               f"--device cpu --nshard 2")
    for i, split in enumerate(("train", "dev", "test")):
        shards = calls[1 + 3 * i: 4 + 3 * i]
        prefix = f"speechprompt prepare --manifest {data}/{split}.tsv {extract}"
        assert sorted(shards[:2]) == [f"{prefix} --rank 0", f"{prefix} --rank 1"]  # in parallel: any order
        assert shards[2] == f"{prefix} --merge"
    config = ROOT / "recipes" / "snips_sf" / "conf" / "prompt.yaml"
    assert calls[10:] == [
        *(f"speechprompt train --config {config} base={ulm} seed={s} device=cpu run_dir={runs}/seed{s} "
          f"data.train_units={units}/train.units data.train_labels={data}/train.labels "
          f"data.dev_units={units}/dev.units data.dev_labels={data}/dev.labels" for s in (4, 5)),
        *(f"speechprompt evaluate --checkpoint {runs}/seed{s}/best.safetensors --device cpu "
          f"--units {units}/test.units --labels {data}/test.labels --out {runs}/seed{s}" for s in (4, 5))]


def test_synthetic_task_stages_call_the_cli(tmp_path):
    bin_dir, log = _fake_speechprompt(tmp_path)
    exp, base = tmp_path / "exp", tmp_path / "base"
    splits = ("train", "dev", "test", "test_synth")
    result = _run(ROOT / "recipes" / "synthetic_digits" / "run.sh", "--stage", "4", "--stop-stage", "5", "--exp",
                  str(exp), "--base-dir", str(base), bin_dir=bin_dir)
    assert result.returncode == 1  # stage 4 ran (the stand-in writes nothing); stage 5 wants the k-means
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"missing the k-means (run stage 2): {base}/km100_mfcc.safetensors")
    _touch(base / "km50_logmel.safetensors", base / "ulm_logmel50" / "checkpoint_best.pt",
           *(exp / "data" / f"{s}.tsv" for s in splits), *(exp / "units" / f"{s}.units" for s in splits),
           exp / "prompt" / "seed7" / "best.safetensors")
    result = _run(ROOT / "recipes" / "synthetic_digits" / "run.sh", "--stage", "5", "--exp", str(exp), "--base-dir",
                  str(base), "--seeds", "7", "--features", "logmel", "--k", "50", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    data, units, runs = exp / "data", exp / "units", exp / "prompt"
    config = ROOT / "recipes" / "synthetic_digits" / "conf" / "prompt.yaml"
    assert log.read_text().splitlines() == [
        f"speechprompt synth --task digits --out {data} --seed 0 --no-progress",
        *(f"speechprompt prepare --manifest {data}/{s}.tsv --features logmel --kmeans {base}/km50_logmel.safetensors "
          f"--out {units} --dedup --device auto" for s in splits),
        f"speechprompt train --config {config} base={base}/ulm_logmel50/checkpoint_best.pt seed=7 device=auto "
        f"run_dir={runs}/seed7 data.train_units={units}/train.units data.train_labels={data}/train.labels "
        f"data.dev_units={units}/dev.units data.dev_labels={data}/dev.labels",
        f"speechprompt evaluate --checkpoint {runs}/seed7/best.safetensors --device auto "
        f"--units {units}/test.units {units}/test_synth.units --labels {data}/test.labels {data}/test_synth.labels "
        f"--out {runs}/seed7"]


def test_demo_unit_lm_reads_the_commands_training_clips(tmp_path):
    # Stage 6 of `make demo`: the unit LM's corpus is the sentences' units and, without labels, the commands' training
    # clips' units, --ulm-task-repeats times over (4 unless told; 0 is the sentences alone).
    bin_dir, log = _fake_speechprompt(tmp_path)
    units = "exp/synthetic_commands/units"
    (tmp_path / units).mkdir(parents=True)
    (tmp_path / units / "source.txt").write_text("phones\n")
    (tmp_path / "exp/synthetic_commands/km_phones.safetensors").write_bytes(b'{"__metadata__":{"k":"42"}}')
    script = ROOT / "recipes" / "synthetic_commands" / "run.sh"
    for options, repeats in (((), 4), (("--ulm-task-repeats", "0"), 0), (("--ulm-task-repeats", "2"), 2)):
        log.unlink(missing_ok=True)
        result = _run(script, "--stage", "6", "--stop-stage", "6", "--nj", "1", *options, cwd=tmp_path,
                      bin_dir=bin_dir)
        assert result.returncode == 0, result.stderr
        corpus = ",".join([f"{units}/sentences/train.units"] + [f"{units}/train.units"] * repeats)
        assert log.read_text().splitlines() == [
            f"speechprompt pretrain-ulm --config {script.parent}/conf/ulm.yaml train=[{corpus}] max_steps=400 "
            f"n_units=42 batch_size=16"]
    bad = _run(script, "--stage", "6", "--stop-stage", "6", "--ulm-task-repeats", "-1", cwd=tmp_path, bin_dir=bin_dir)
    assert bad.returncode == 1 and "--ulm-task-repeats must be a whole number, not '-1'" in bad.stderr


# The published numbers each encoder recipe quotes in its README (with their source) and, the headline ones, in --help.
ENCODER_PUBLISHED = {
    "speech_commands_superb": ["96.30"], "fluent_commands_superb": ["98.34"], "voxceleb1_superb": ["81.42"],
    "iemocap_superb": ["64.92"], "librispeech_superb": ["6.42"], "librilight_ctc": ["24.5", "18.0 / 25.5"],
    "esc50_ast": ["95.6", "98.7"], "speech_commands_ast": ["98.1"],
}


@pytest.mark.parametrize("name", ENCODER)
def test_encoder_recipes_document_published_numbers_and_a_column_to_fill(name):
    readme = (ROOT / "recipes" / name / "README.md").read_text()
    for number in ENCODER_PUBLISHED[name]:
        assert number in readme
    assert "| ours" in readme.lower() and "source" in readme.lower()
    help_ = _run(ROOT / "recipes" / name / "run.sh", "--help").stdout
    assert help_.startswith(f"Usage: {ROOT}/recipes/{name}/run.sh --root DIR [options]\n")
    assert ENCODER_PUBLISHED[name][0] in help_ and f"exp/{name}]" in help_


@pytest.mark.parametrize("name", ENCODER)
def test_encoder_recipes_name_what_is_missing(name, tmp_path):
    script = ROOT / "recipes" / name / "run.sh"
    result = _run(script, "--stage", "1", "--stop-stage", "1", "--exp", str(tmp_path))
    assert result.returncode == 1 and "--root is required" in result.stderr
    result = _run(script, "--stage", "2", "--exp", str(tmp_path), "--upstream", str(tmp_path / "enc.pt"))
    assert result.returncode == 1 and result.stderr.strip().endswith(f"missing the upstream encoder: {tmp_path}/enc.pt")
    (tmp_path / "enc.pt").write_bytes(b"")
    result = _run(script, "--stage", "2", "--exp", str(tmp_path), "--upstream", str(tmp_path / "enc.pt"))
    assert result.returncode == 1 and "train manifest (run stage 1)" in result.stderr


def test_encoder_template_stages_call_the_cli_per_fold(tmp_path):
    # IEMOCAP: five folds prepared into their own folders, then one compare whose overrides and eval paths hold
    # {fold}; the methods, seeds, jobs, upstream and device all reach it.
    bin_dir, log = _fake_speechprompt(tmp_path)
    exp, hubert = tmp_path / "exp", tmp_path / "h.pt"
    _touch(hubert, *(exp / "data" / f"fold{k}" / "train.tsv" for k in range(1, 6)))
    result = _run(ROOT / "recipes" / "iemocap_superb" / "run.sh", "--root", "/corpus", "--exp", str(exp),
                  "--upstream", str(hubert), "--methods", "superb lora", "--seeds", "2", "--jobs", "2",
                  "--device", "cpu", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    data = exp / "data"
    assert calls[:5] == [f"speechprompt prepare-dataset iemocap --root /corpus --out {data}/fold{k} fold={k}"
                         for k in range(1, 6)]
    fold = f"{data}/fold{{fold}}"
    assert calls[5:] == [
        f"speechprompt compare --config {ROOT}/recipes/iemocap_superb/conf/compare.yaml --out {exp}/compare "
        f"--seeds 2 --jobs 2 --methods superb,lora overrides=[upstream={hubert},device=cpu,"
        f"data.train_manifest={fold}/train.tsv,data.dev_manifest={fold}/dev.tsv] eval.test.manifest={fold}/test.tsv"]


def test_encoder_template_without_folds_or_dev(tmp_path):
    bin_dir, log = _fake_speechprompt(tmp_path)
    exp, w2v = tmp_path / "exp", tmp_path / "w2v.pt"
    _touch(w2v, exp / "data" / "train.tsv")
    result = _run(ROOT / "recipes" / "librilight_ctc" / "run.sh", "--root", "/ll", "--exp", str(exp), "--upstream",
                  str(w2v), "--prepare-options", "subset=10min fold=3", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    data = exp / "data"
    assert log.read_text().splitlines() == [
        f"speechprompt prepare-dataset librilight --root /ll --out {data} subset=10min fold=3",
        f"speechprompt compare --config {ROOT}/recipes/librilight_ctc/conf/compare.yaml --out {exp}/compare --seeds 3 "
        f"--jobs 1 --methods finetune,router,lora overrides=[upstream={w2v},device=auto,"
        f"data.train_manifest={data}/train.tsv,data.dev_manifest={data}/dev.tsv] "
        f"eval.test_clean.manifest={data}/test_clean.tsv eval.test_other.manifest={data}/test_other.tsv"]
    # ESC-50 has no dev split: the last checkpoint is scored, so no dev manifest is passed.
    log.unlink()
    _touch(*(exp / "data" / f"fold{k}" / "train.tsv" for k in range(1, 6)))
    assert _run(ROOT / "recipes" / "esc50_ast" / "run.sh", "--stage", "2", "--exp", str(exp), "--upstream", str(w2v),
                bin_dir=bin_dir).returncode == 0
    assert "data.dev_manifest" not in log.read_text()


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
