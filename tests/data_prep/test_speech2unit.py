"""``speechprompt prepare`` end to end on tiny generated audio: bad files, resume, shards, mismatches, CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechprompt.audio import load_audio
from speechprompt.cli import main
from speechprompt.data_prep import speech2unit
from speechprompt.data_prep.features import build_feature_reader
from speechprompt.data_prep.kmeans import dedup, load_quantizer
from speechprompt.data_prep.manifest import Manifest, ManifestEntry, write_manifest_file

SR = 16000
# Row order of the manifest: good files with bad ones mixed in.
ROWS = ["good0", "corrupt", "good1", "empty", "good2", "nan", "good3", "silent", "good4", "good5"]
BAD = {"corrupt": "corrupt", "empty": "empty", "nan": "NaN", "silent": "silent"}


def _write(path: Path, kind: str, index: int) -> int:
    rng = np.random.default_rng(index)
    if kind == "corrupt":
        path.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage that is not audio")
        return 1000
    if kind == "empty":
        sf.write(path, np.zeros(0, np.float32), SR)
        return 0
    if kind == "nan":
        wav = rng.uniform(-0.3, 0.3, 4000).astype(np.float32)
        wav[100:200] = np.nan
        sf.write(path, wav, SR, subtype="FLOAT")
        return len(wav)
    if kind == "silent":
        sf.write(path, np.zeros(4000, np.float32), SR)
        return 4000
    # Tones of different pitch plus noise, 0.2-0.4 s, so that units differ between files.
    n = 3200 + 800 * (index % 3)
    t = np.arange(n) / SR
    wav = 0.4 * np.sin(2 * np.pi * (200 + 150 * index) * t) + 0.05 * rng.standard_normal(n)
    sf.write(path, wav.astype(np.float32), SR)
    return n


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A manifest with bad files mixed in, and a logmel quantizer learned with ``speechprompt kmeans``."""
    root = tmp_path_factory.mktemp("corpus")
    entries = []
    for i, name in enumerate(ROWS):
        kind = name if name in BAD else "good"
        path = root / "wav" / f"{name}.wav"
        path.parent.mkdir(exist_ok=True)
        entries.append(ManifestEntry(f"wav/{name}.wav", _write(path, kind, i)))
    manifest = root / "train.tsv"
    write_manifest_file(manifest, Manifest(root, entries))
    km = root / "km.safetensors"
    rc = main(["kmeans", "--manifest", str(manifest), "--features", "logmel", "--k", "8", "--percent", "1.0",
               "--n-init", "2", "--batch-size", "256", "--max-iter", "20", "--out", str(km)])
    assert rc == 0
    return {"manifest": manifest, "km": km, "root": root}


def _prepare(corpus: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["prepare", "--manifest", str(corpus["manifest"]), "--features", "logmel", "--kmeans",
                 str(corpus["km"]), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def single_run(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single")
    assert _prepare(corpus, out) == 0
    return out


def _without_shard_info(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("shard", "merged_from")}


def test_quantizer_learned_by_the_cli_records_its_reader(corpus: dict[str, Path]) -> None:
    q = load_quantizer(corpus["km"])
    assert (q.k, q.dim) == (8, 80)
    assert q.features["name"] == "logmel" and q.features["n_mels"] == 80
    assert q.metadata["utterances_used"] == 6 and q.metadata["skipped"] == 4


def test_prepare_writes_one_line_per_row_and_skips_bad_files(corpus: dict[str, Path], single_run: Path) -> None:
    lines = (single_run / "train.units").read_text().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(ROWS)
    reader, q = build_feature_reader("logmel"), load_quantizer(corpus["km"])
    for row, (name, line) in enumerate(zip(ROWS, lines)):
        if name in BAD:
            assert line == "", name
            continue
        wav = load_audio(corpus["root"] / "wav" / f"{name}.wav")
        expected = q.assign(reader.read(wav)).tolist()
        assert [int(u) for u in line.split()] == expected, row

    summary = json.loads((single_run / "train.summary.json").read_text())
    assert summary["utterances"] == 6
    skipped = {Path(s["path"]).stem: s for s in summary["skipped"]}
    assert set(skipped) == set(BAD)
    for name, word in BAD.items():
        assert skipped[name]["row"] == ROWS.index(name)
        assert word.lower() in skipped[name]["reason"].lower(), skipped[name]["reason"]
    good_samples = sum(len(load_audio(corpus["root"] / "wav" / f"{n}.wav")) for n in ROWS if n not in BAD)
    assert summary["samples"] == good_samples and summary["seconds"] == round(good_samples / SR, 3)
    n_units = sum(len(line.split()) for line in lines)
    assert summary["frames"] == summary["units"] == n_units  # no dedup: one unit per frame
    assert summary["units_per_second"] == pytest.approx(n_units / (good_samples / SR), abs=1e-3)
    assert summary["features"]["name"] == "logmel" and summary["quantizer"]["k"] == 8
    assert summary["quantizer"]["fingerprint"].startswith("sha256:")
    assert not list(single_run.glob("*.partial")) and not list(single_run.glob(".*tmp"))


def test_dedup_merges_repeats_of_each_line(corpus: dict[str, Path], single_run: Path, tmp_path: Path) -> None:
    assert _prepare(corpus, tmp_path, "--dedup") == 0
    full = (single_run / "train.units").read_text().splitlines()
    deduped = (tmp_path / "train.units").read_text().splitlines()
    assert deduped == [" ".join(map(str, dedup(map(int, line.split())))) for line in full]
    summary = json.loads((tmp_path / "train.summary.json").read_text())
    assert summary["dedup"] is True and summary["units"] < summary["frames"]


def test_killed_run_resumes_to_the_same_output(
    corpus: dict[str, Path], single_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = speech2unit._convert
    calls: list[str] = []

    def dies_after_five(path, *args, **kwargs):
        if len(calls) == 5:
            raise KeyboardInterrupt  # what a kill looks like from inside: nothing after this row is written
        calls.append(Path(path).stem)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(speech2unit, "_convert", dies_after_five)
    assert _prepare(corpus, tmp_path) == 130
    partial = tmp_path / "train.units.partial"
    assert len(partial.read_text().splitlines()) == 1 + 5  # header + five finished rows
    assert not (tmp_path / "train.units").exists()
    # A kill in the middle of a write leaves a torn line; it must be dropped, not trusted.
    with open(partial, "a") as f:
        f.write('{"row": 5, "units": "1 2')

    calls.clear()
    monkeypatch.setattr(speech2unit, "_convert", lambda path, *a, **k: (calls.append(Path(path).stem), real(
        path, *a, **k))[1])
    assert _prepare(corpus, tmp_path) == 0
    assert calls == [n for n in ROWS[5:]]  # only the rows not yet done (row 5 on), bad ones included
    assert (tmp_path / "train.units").read_bytes() == (single_run / "train.units").read_bytes()
    assert json.loads((tmp_path / "train.summary.json").read_text()) == json.loads(
        (single_run / "train.summary.json").read_text())
    assert not partial.exists()


def test_partial_from_other_settings_is_not_reused(corpus: dict[str, Path], single_run: Path, tmp_path: Path) -> None:
    (tmp_path / "train.units.partial").write_text(json.dumps({"settings": {"dedup": True}}) + "\n"
                                                  + json.dumps({"row": 0, "units": "9 9 9"}) + "\n")
    assert _prepare(corpus, tmp_path) == 0
    assert (tmp_path / "train.units").read_bytes() == (single_run / "train.units").read_bytes()


def test_shards_then_merge_equal_a_single_run(corpus: dict[str, Path], single_run: Path, tmp_path: Path) -> None:
    assert _prepare(corpus, tmp_path, "--nshard", "3", "--rank", "0") == 0
    assert _prepare(corpus, tmp_path, "--nshard", "3", "--rank", "2") == 0
    assert (tmp_path / "train.0_3.units").is_file() and not (tmp_path / "train.units").exists()
    # merging before every rank is done fails and says which rank is missing
    assert main(["prepare", "--manifest", str(corpus["manifest"]), "--out", str(tmp_path), "--nshard", "3",
                 "--merge"]) == 2
    assert _prepare(corpus, tmp_path, "--nshard", "3", "--rank", "1") == 0
    assert main(["prepare", "--manifest", str(corpus["manifest"]), "--out", str(tmp_path), "--nshard", "3",
                 "--merge"]) == 0
    assert (tmp_path / "train.units").read_bytes() == (single_run / "train.units").read_bytes()
    merged = json.loads((tmp_path / "train.summary.json").read_text())
    single = json.loads((single_run / "train.summary.json").read_text())
    assert merged["merged_from"] == 3
    assert _without_shard_info(merged) == _without_shard_info(single)


def test_mismatched_quantizer_fails_clearly(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    rc = main(["prepare", "--manifest", str(corpus["manifest"]), "--features", "mfcc", "--kmeans",
               str(corpus["km"]), "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "mismatched k-means" in err and "39" in err and "80" in err and "km.safetensors" in err
    assert not (tmp_path / "train.units").exists()


def test_help_and_bad_arguments(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    for command in ("prepare", "kmeans"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
    assert "EMPTY" in capsys.readouterr().out  # the skipped-row policy is documented in --help
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--manifest", "m.tsv", "--out", str(tmp_path), "--features", "wav2vec"])
    assert e.value.code == 2
    assert _prepare(corpus, tmp_path, "--nshard", "2", "--rank", "2") == 2
    assert _prepare(corpus, tmp_path, "--rank", "1") == 2  # a rank without --nshard
    assert main(["prepare", "--manifest", str(corpus["manifest"]), "--out", str(tmp_path)]) == 2
    assert main(["prepare", "--manifest", str(tmp_path / "missing.tsv"), "--features", "logmel", "--kmeans",
                 str(corpus["km"]), "--out", str(tmp_path)]) == 2
    assert main(["kmeans", "--manifest", str(corpus["manifest"]), "--features", "hubert", "--k", "4", "--out",
                 str(tmp_path / "km")]) == 2  # hubert without --checkpoint/--layer
    assert "needs --checkpoint" in capsys.readouterr().err


def test_reader_output_shapes() -> None:
    wav = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, SR).astype(np.float32))
    assert build_feature_reader("mfcc").read(wav).shape == (98, 39)
    assert build_feature_reader("logmel").read(wav.numpy()).shape == (98, 80)


@pytest.mark.slow
def test_sigkilled_process_resumes_to_the_same_output(
    corpus: dict[str, Path], single_run: Path, tmp_path: Path
) -> None:
    """A real SIGKILL (no cleanup runs) after four rows, in a subprocess; then an ordinary rerun."""
    script = f"""
import os, signal
from speechprompt.cli import main
from speechprompt.data_prep import speech2unit
real, done = speech2unit._convert, []
def convert(*args, **kwargs):
    if len(done) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(1)
    return real(*args, **kwargs)
speech2unit._convert = convert
main(["prepare", "--manifest", {str(corpus["manifest"])!r}, "--features", "logmel", "--kmeans",
      {str(corpus["km"])!r}, "--out", {str(tmp_path)!r}])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert len((tmp_path / "train.units.partial").read_text().splitlines()) == 1 + 4
    assert _prepare(corpus, tmp_path) == 0
    assert (tmp_path / "train.units").read_bytes() == (single_run / "train.units").read_bytes()


def test_hubert_units_and_a_quantizer_from_another_layer(corpus: dict[str, Path], tmp_path: Path, capsys) -> None:
    from speechprompt.fairseq_compat import save_fairseq_checkpoint
    from speechprompt.models.hubert import HubertConfig, HubertModel

    torch.manual_seed(0)
    model = HubertModel(HubertConfig.tiny())
    cfg = {k: getattr(v, "value", v) for k, v in vars(model.cfg).items()}
    ckpt = tmp_path / "hubert.pt"
    save_fairseq_checkpoint(ckpt, model.state_dict(), {"model": {"_name": "hubert", **cfg}, "task": {}})
    km = tmp_path / "km_l1.safetensors"
    hubert = ["--features", "hubert", "--checkpoint", str(ckpt)]
    assert main(["kmeans", "--manifest", str(corpus["manifest"]), *hubert, "--layer", "1", "--k", "4", "--percent",
                 "1", "--n-init", "1", "--out", str(km)]) == 0
    base = ["prepare", "--manifest", str(corpus["manifest"]), *hubert, "--kmeans", str(km), "--out", str(tmp_path)]
    # same dimension (32), other layer: refused, because the units would be meaningless
    assert main([*base, "--layer", "2"]) == 2
    assert "layer 1 vs 2" in capsys.readouterr().err
    assert main([*base, "--layer", "1"]) == 0
    lines = (tmp_path / "train.units").read_text().splitlines()
    assert len(lines) == len(ROWS)
    good = [line for name, line in zip(ROWS, lines) if name not in BAD]
    assert all(line and {int(u) for u in line.split()} <= set(range(4)) for line in good)
    summary = json.loads((tmp_path / "train.summary.json").read_text())
    assert summary["features"]["layer"] == 1 and summary["features"]["name"] == "hubert"
    assert summary["frames"] == sum(len(line.split()) for line in good)
