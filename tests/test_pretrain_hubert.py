"""`speechprompt pretrain-hubert`: learning, checkpoints that fairseq and our loaders read with the same outputs, labels
from the real MFCC and HuBERT unit pipelines, the fbank front end, exact resume after SIGKILL, DDP, bf16, errors.

The corpus is synthetic and learnable: each clip is a run of tone segments (80-250 ms each) whose pitch steps
through 8 values in a fixed cycle, so a masked span is predictable from its context; its labels (100 Hz, one per
10 ms MFCC frame) are the tone index, or the units of the real pipeline where that is what is tested.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from oracle import run_oracle

from speechprompt.cli import main
from speechprompt.config import load_config
from speechprompt.fairseq_compat import load_fairseq_checkpoint
from speechprompt.hubert_data import (
    BatchMaker,
    HubertDataError,
    LabeledAudio,
    Masking,
    dev_batches,
    frame_labels,
)
from speechprompt.models.encoders import load_encoder
from speechprompt.models.hubert import HubertModel, load_hubert
from speechprompt.models.hubert_pretraining import compute_mask_indices, masked_prediction, pretraining_loss
from speechprompt.pretrain_hubert import PretrainHubertConfig, evaluate, pretrain_hubert
from speechprompt.runlog import read_log
from speechprompt.training.distributed import Dist

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 16000
TONES = [300.0, 450.0, 700.0, 1000.0, 1500.0, 2200.0, 3200.0, 4500.0]


def _tone_split(root: Path, name: str, n: int, seed: int) -> Path:
    """``n`` clips of 1.1-1.5 s: ``root/name.tsv`` and ``root/name.km`` (the tone index of each 10 ms frame)."""
    rng = np.random.default_rng(seed)
    (root / name).mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for i in range(n):
        length = int(rng.integers(int(1.1 * SR), int(1.5 * SR)))
        tone, wav, which = int(rng.integers(len(TONES))), [], []
        while sum(map(len, wav)) < length:
            seg = int(rng.integers(int(0.08 * SR), int(0.25 * SR)))
            wav.append(0.5 * np.sin(2 * np.pi * TONES[tone] * np.arange(seg) / SR + rng.uniform(0, 2 * np.pi)))
            which += [tone] * seg
            tone = (tone + 1) % len(TONES)
        audio = (np.concatenate(wav)[:length] + 0.01 * rng.standard_normal(length)).astype(np.float32)
        sf.write(root / name / f"{i}.wav", audio, SR)
        frames = 1 + (length - 400) // 160  # the MFCC reader's 10 ms frames
        labels.append(" ".join(str(which[160 * j + 200]) for j in range(frames)))  # the frame's centre
        rows.append(f"{name}/{i}.wav\t{length}")
    (root / f"{name}.tsv").write_text(f"{root}\n" + "".join(r + "\n" for r in rows))
    (root / f"{name}.km").write_text("".join(line + "\n" for line in labels))
    return root / f"{name}.tsv"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tones")
    _tone_split(root, "train", 48, 0)
    _tone_split(root, "dev", 12, 1)
    return root


REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "pretrain_hubert" / "conf" / "tiny.yaml"  # the shipped config the tests train


def _overrides(corpus: Path, run_dir: Path, **extra: Any) -> list[str]:
    args = {
        "train": corpus / "train.tsv", "train_labels": corpus / "train.km", "dev": corpus / "dev.tsv",
        "dev_labels": corpus / "dev.km", "n_units": 8, "max_steps": 12, "warmup_steps": 3, "log_every": 2,
        "eval_every": 6, "save_every": 4, "seed": 3, "device": "cpu", "threads": 1, "run_dir": run_dir, **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def _argv(corpus: Path, run_dir: Path, *more: str, **extra: Any) -> list[str]:
    return ["pretrain-hubert", "--config", str(TINY), *_overrides(corpus, run_dir, **extra), *more]


def _config(corpus: Path, run_dir: Path, **extra: Any) -> PretrainHubertConfig:
    return load_config(PretrainHubertConfig, TINY, _overrides(corpus, run_dir, **extra))


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    """A tiny conv-front-end HuBERT trained 60 updates on the tone corpus."""
    run_dir = tmp_path_factory.mktemp("hubert") / "run"
    cfg = _config(corpus, run_dir, max_steps=60, eval_every=20, save_every=30, log_every=5)
    return {"cfg": cfg, "metrics": pretrain_hubert(cfg), "run_dir": run_dir}


def test_masked_prediction_learns_and_the_run_leaves_its_files(trained: dict[str, Any]) -> None:
    run_dir, metrics, cfg = trained["run_dir"], trained["metrics"], trained["cfg"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint_best.pt", "checkpoint_last.pt", "config.yaml", "dict.km.txt", "learning_curves.png", "log.csv",
        "metrics.json", "train_state.pt"]
    log = read_log(run_dir / "log.csv")
    dev = [v for _, v in log["dev_loss"]]
    assert [s for s, _ in log["dev_loss"]] == [20, 40, 60] and dev[-1] < 0.75 * dev[0]
    train = [v for _, v in log["train_loss_m"]]
    assert train[-1] < 0.6 * train[0]
    # Chance is 1/8 (the 4 special classes are never right); the next tone follows from the context.
    assert metrics["dev_acc_m"] > 0.4 and metrics["best_step"] == 60  # 4 times chance
    assert load_config(PretrainHubertConfig, run_dir / "config.yaml") == cfg
    assert (run_dir / "dict.km.txt").read_text().splitlines() == [f"{u} 1" for u in range(8)]


def test_the_checkpoint_holds_the_evaluated_weights_in_fairseqs_layout(trained: dict[str, Any]) -> None:
    run_dir, cfg = trained["run_dir"], trained["cfg"]
    ckpt = load_fairseq_checkpoint(run_dir / "checkpoint_best.pt")
    model_cfg, task_cfg = ckpt["cfg"]["model"], ckpt["cfg"]["task"]
    assert model_cfg["_name"] == "hubert" and model_cfg["label_rate"] == 100.0 and model_cfg["mask_prob"] == 0.8
    assert task_cfg["_name"] == "hubert_pretraining" and task_cfg["labels"] == ["km"]
    assert task_cfg["normalize"] is False and task_cfg["label_rate"] == 100.0
    assert ckpt["cfg"]["criterion"] == {"_name": "hubert", "pred_masked_weight": 1.0, "pred_nomask_weight": 0.0,
                                        "loss_weights": [10.0], "log_keys": []}
    assert [d.symbols[4:] for d in ckpt["task_state"]["dictionaries"]] == [[str(u) for u in range(8)]]
    assert ckpt["optimizer_history"][-1]["num_updates"] == 60

    model, task = load_hubert(run_dir / "checkpoint_best.pt")
    assert model.num_classes == [12] and model.label_embs_concat.shape == (12, 16) and task == task_cfg
    data = LabeledAudio(cfg.dev, cfg.dev_labels, cfg.n_units, cfg.label_rate, cfg.min_sample_size)
    maker = BatchMaker(data, model.num_frames, model.downsample, Masking(), cfg.max_sample_size)
    again = evaluate(model, maker, dev_batches(maker, cfg.batch_size, cfg.seed), cfg, torch.device("cpu"), Dist())
    # (an update's batch is batch_size x grad_accum x processes utterances: 8 here, as the dev batches)
    assert again["dev_loss"] == pytest.approx(trained["metrics"]["best_dev_loss"], rel=1e-6)
    assert type(load_encoder(run_dir / "checkpoint_last.pt").model) is HubertModel


def _parity_inputs(cfg: PretrainHubertConfig, model: HubertModel, path: Path) -> dict[str, Any]:
    """Two dev clips cropped to one length, their 100 Hz labels and masks for the model's frames."""
    data = LabeledAudio(cfg.dev, cfg.dev_labels, cfg.n_units, cfg.label_rate)
    T = int(min(data.sizes[:3]))
    source = torch.stack([data.audio(i)[:T] for i in range(3)])
    L = min(int(round(T * cfg.label_rate / SR)), *(len(data.labels[0][i]) for i in range(3)))
    labels = torch.stack([torch.from_numpy(data.labels[0][i][:L]) for i in range(3)]) + 4  # (B, L)
    frames, index = frame_labels(model.num_frames(T), L, cfg.label_rate * model.downsample / SR)
    mask = torch.from_numpy(compute_mask_indices((3, frames), None, 0.8, 10, 2,
                                                 [np.random.default_rng(i) for i in range(3)]))
    torch.save({"source": source, "targets": [labels], "mask": mask}, path)
    return {"source": source, "labels": labels, "index": index, "mask": mask}


@pytest.mark.fairseq
def test_fairseq_builds_our_checkpoint_with_the_same_outputs_and_loss(trained: dict[str, Any], tmp_path: Path) -> None:
    checkpoint = trained["run_dir"] / "checkpoint_best.pt"
    model, _ = load_hubert(checkpoint)
    inputs = _parity_inputs(trained["cfg"], model, tmp_path / "inputs.pt")
    ref = torch.load(run_oracle("fairseq", "hubert_pretraining", tmp_path / "oracle", checkpoint=str(checkpoint),
                                inputs=str(tmp_path / "inputs.pt"), layers=[1, 2], masks=[]) / "ref.pt",
                     weights_only=True)
    assert ref["model_class"] == "HubertModel" and ref["num_classes"] == [12] and ref["label_rate"] == 100.0
    with torch.no_grad():
        for layer in ("1", "2", "final"):
            ours = model.extract_features(inputs["source"], output_layer=None if layer == "final" else int(layer))
            torch.testing.assert_close(ours, ref["features"][layer], rtol=0, atol=1e-5)
        out = masked_prediction(model, inputs["source"], [inputs["labels"][:, inputs["index"]]], inputs["mask"])
        loss, sample_size, stats = pretraining_loss(out, 1.0, 0.5, 10.0)  # the oracle's criterion weights
    assert sample_size == ref["sample_size"] and float(loss) == pytest.approx(ref["loss"], rel=1e-5)
    assert stats["loss_m"] == pytest.approx(ref["logging"]["loss_m_0"], rel=1e-5)
    assert stats["loss_u"] == pytest.approx(ref["logging"]["loss_u_0"], rel=1e-5)
    assert stats["correct_m"] == ref["logging"]["correct_m_0"] and stats["count_m"] == ref["logging"]["count_m_0"]
    # fairseq's logits are [positive, every class with the positive's duplicate at -inf]; ours one per class.
    theirs, ours, target = ref["logits_m"][0], out.logits_masked[0], out.targets_masked[0]
    others = torch.ones_like(ours, dtype=torch.bool)
    others[torch.arange(len(target)), target] = False
    torch.testing.assert_close(ours[~others], theirs[:, 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(ours[others], theirs[:, 1:][others], rtol=0, atol=1e-4)
    assert torch.isneginf(theirs[:, 1:][~others]).all()


def test_units_of_the_real_pipeline_line_up_with_the_model_frames(trained: dict[str, Any], corpus: Path,
                                                                   tmp_path: Path) -> None:
    """Iteration 1 labels are MFCC units at 100 Hz, iteration 2 labels a layer of our checkpoint at 50 Hz: both
    come from `kmeans` + `prepare` (without --dedup), and a wrong label_rate is refused with what to fix."""
    dev, best = corpus / "dev.tsv", trained["run_dir"] / "checkpoint_best.pt"
    for features, extra, rate in (("mfcc", [], 100), ("hubert", ["--checkpoint", str(best), "--layer", "2"], 50)):
        km, out = tmp_path / f"{features}.safetensors", tmp_path / features
        assert main(["kmeans", "--manifest", str(dev), "--features", features, *extra, "--k", "6", "--percent", "1.0",
                     "--n-init", "1", "--out", str(km)]) == 0
        assert main(["prepare", "--manifest", str(dev), "--features", features, *extra, "--kmeans", str(km),
                     "--out", str(out)]) == 0
        data = LabeledAudio(dev, [out / "dev.units"], [6], rate)
        model, _ = load_hubert(best)
        maker = BatchMaker(data, model.num_frames, model.downsample, Masking(0.8, 10), 250000)
        batch = maker.make(np.arange(4), slice(0, 4), [0], [1])
        assert batch.targets[0].shape == batch.mask.shape
        assert abs(batch.mask.shape[1] - model.num_frames(batch.source.shape[1])) <= 1  # labels end with the audio
        with pytest.raises(HubertDataError, match="is label_rate right"):
            LabeledAudio(dev, [out / "dev.units"], [6], 150 - rate)


def test_the_fbank_front_end_trains_and_loads_in_our_readers(corpus: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "fbank"
    metrics = pretrain_hubert(_config(corpus, run_dir, frontend="fbank", features_pen_weight=0, max_steps=6))
    assert metrics["step"] == 6
    ckpt = load_fairseq_checkpoint(run_dir / "checkpoint_last.pt")
    assert ckpt["cfg"]["model"]["frontend"] == "fbank"  # fairseq has no such architecture: the key says so
    assert not any(k.startswith("feature_extractor.") for k in ckpt["model"])
    enc = load_encoder(run_dir / "checkpoint_last.pt")
    assert enc.model.cfg.frontend == "fbank" and enc.model.frame_rate == 50.0
    km = tmp_path / "km.safetensors"
    assert main(["kmeans", "--manifest", str(corpus / "dev.tsv"), "--features", "hubert", "--checkpoint",
                 str(run_dir / "checkpoint_last.pt"), "--layer", "1", "--k", "4", "--percent", "1.0", "--n-init", "1",
                 "--out", str(km)]) == 0


@pytest.mark.parametrize(("override", "message"), [
    ("label_rate=50", "is label_rate right"),
    ("n_units=4", "is outside [0, 4)"),
    ("min_sample_size=8000", "raise min_sample_size"),
    ("frontend=mel", "frontend 'mel' is not one of"),
    ("dev_labels=[a,b]", "must name the same label sets"),
])
def test_bad_settings_fail_with_one_line(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         override: str, message: str) -> None:
    assert main(_argv(corpus, tmp_path / "bad", override)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and message in err[0], err


def test_shipped_configs_build_the_documented_architectures() -> None:
    sizes, fairseq_like = {}, {}
    for name in ("tiny", "small", "base", "large"):
        cfg = load_config(PretrainHubertConfig, REPO / "recipes" / "pretrain_hubert" / "conf" / f"{name}.yaml")
        model = HubertModel(cfg.model_config(), [k + 4 for k in cfg.n_units])
        sizes[name] = sum(p.numel() for p in model.parameters())
        fairseq_like[name] = cfg.frontend == "conv"
    # fairseq's counts with the pretraining heads: 94.7M (base, 100 clusters) and 316.6M (large, 500 clusters).
    assert 94_000_000 < sizes["base"] < 96_000_000 and 315_000_000 < sizes["large"] < 318_000_000
    assert sizes["tiny"] < 50_000 and sizes["small"] < 1_500_000
    assert fairseq_like == {"tiny": True, "small": False, "base": True, "large": True}


# --------------------------------------------------------------------------------------------------------------
# As users run it: the CLI in fresh processes


def _rows(run_dir: Path) -> list[tuple[str, str, str]]:
    with open(run_dir / "log.csv", newline="") as f:
        return [tuple(row[:3]) for row in csv.reader(f) if row[1] != "audio_s_per_s"]


def _outputs(run_dir: Path) -> dict[str, Any]:
    return {"state": torch.load(run_dir / "train_state.pt", weights_only=True),
            "best": load_fairseq_checkpoint(run_dir / "checkpoint_best.pt")["model"],
            "last": load_fairseq_checkpoint(run_dir / "checkpoint_last.pt")["model"],
            "metrics": json.loads((run_dir / "metrics.json").read_text())}


def _same(a: Any, b: Any, where: str = "") -> None:
    """Equal, bit for bit for tensors; timings skipped."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            if key not in ("wall_time_s", "audio_s_per_s", "seconds", "run_dir"):
                _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_a_run_killed_at_any_update_resumes_to_the_uninterrupted_run(corpus, tmp_path, run_cli):
    # Dropout and layer drop draw from the RNG; two loader workers read ahead.
    def argv(run_dir: Path) -> list[str]:
        return _argv(corpus, run_dir, layerdrop=0.3, num_workers=2, ema_decay=0.9)

    assert run_cli(argv(tmp_path / "straight")).returncode == 0
    reference = _outputs(tmp_path / "straight")
    for kill in sorted(random.Random(0).sample(range(2, 25), 2)):  # optimizer steps: AdamW's calls Adam's
        run_dir = tmp_path / f"killed_at_{kill}"
        killed = run_cli(argv(run_dir), kill_at_update=kill)
        assert killed.returncode == -9 and not (run_dir / "metrics.json").exists(), killed.stderr[-2000:]
        saved = (run_dir / "train_state.pt").exists()  # killed before the first save: nothing to resume
        resumed = run_cli(argv(run_dir))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert ("resuming" in resumed.stderr) == saved
        _same(_outputs(run_dir), reference, f"killed at {kill}")
        assert _rows(run_dir) == _rows(tmp_path / "straight")


@pytest.mark.slow
def test_two_gloo_processes_train_like_one_process_with_twice_the_batch(corpus, tmp_path, run_cli):
    common = ("model_overrides={dropout: 0.0, attention_dropout: 0.0}", "max_steps=8")  # processes draw dropout apart
    single = run_cli(_argv(corpus, tmp_path / "single", *common, batch_size=8))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(_argv(corpus, tmp_path / "ddp", *common, batch_size=4), torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert len([line for line in ddp.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 reports
    a, b = _outputs(tmp_path / "single"), _outputs(tmp_path / "ddp")
    assert b["metrics"]["world_size"] == 2 and a["metrics"]["step"] == b["metrics"]["step"] == 8
    for key, value in a["last"].items():
        torch.testing.assert_close(b["last"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert b["metrics"]["dev_loss"] == pytest.approx(a["metrics"]["dev_loss"], rel=1e-4)


@pytest.mark.slow
def test_bf16_autocast_trains_with_fp32_weights(corpus, tmp_path, run_cli):
    run_dir = tmp_path / "bf16"
    proc = run_cli(_argv(corpus, run_dir, precision="bf16", grad_accum=2, batch_size=4,
                         activation_checkpointing="true", log_every=1))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(run_dir / "train_state.pt", weights_only=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in state["model"].values())
    losses = [float(v) for _, m, v in _rows(run_dir)[1:] if m == "train_loss"]
    assert len(losses) == 12 and all(np.isfinite(losses))


# --------------------------------------------------------------------------------------------------------------
# The recipe

_FAKE_SPEECHPROMPT = """#!/usr/bin/env bash
# Records its command line and leaves what the real command would write, so that the next stage finds it.
echo "speechprompt $*" >> "{log}"
prev=
for a in "$@"; do
    case "$prev" in --out) out=$a ;; --manifest) manifest=$a ;; esac
    case "$a" in run_dir=*) mkdir -p "${{a#run_dir=}}" && touch "${{a#run_dir=}}/checkpoint_best.pt" ;; esac
    prev=$a
done
case "$1" in
    kmeans) mkdir -p "$(dirname "$out")" && touch "$out" ;;
    prepare) mkdir -p "$out" && touch "$out/$(basename "$manifest" .tsv).units" ;;
esac
"""


def test_the_recipe_runs_both_iterations_on_a_manifest(tmp_path: Path) -> None:
    bin_dir, log, exp = tmp_path / "bin", tmp_path / "calls.txt", tmp_path / "exp"
    bin_dir.mkdir()
    (bin_dir / "speechprompt").write_text(_FAKE_SPEECHPROMPT.format(log=log))
    (bin_dir / "speechprompt").chmod(0o755)
    train, dev = tmp_path / "train.tsv", tmp_path / "valid.tsv"
    train.write_text("/\n")
    dev.write_text("/\n")
    config = REPO / "recipes" / "pretrain_hubert" / "conf" / "base.yaml"
    proc = subprocess.run(["bash", str(REPO / "recipes" / "pretrain_hubert" / "run.sh"), "--train", str(train),
                           "--dev", str(dev), "--exp", str(exp), "--config", str(config), "--k2", "500", "--layer",
                           "6", "--steps1", "250000", "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    km1, km2, it1 = exp / "km_mfcc100.safetensors", exp / "km_it1_L6_500.safetensors", exp / "it1/checkpoint_best.pt"
    layer6 = f"--checkpoint {it1} --layer 6"

    def iteration(n: int, k: int, rate: int, steps: str) -> str:
        return (f"speechprompt pretrain-hubert --config {config} train={train} dev={dev} n_units={k} "
                f"label_rate={rate} train_labels={exp}/it{n}_labels/train.units "
                f"dev_labels={exp}/it{n}_labels/valid.units run_dir={exp}/it{n} device=cpu{steps}")

    assert log.read_text().splitlines() == [  # no stage 0: a manifest was given
        f"speechprompt kmeans --manifest {train} --features mfcc --k 100 --percent 1.0 --seed 0 --device cpu "
        f"--out {km1}",
        *(f"speechprompt prepare --manifest {m} --features mfcc --kmeans {km1} --out {exp}/it1_labels --device cpu"
          for m in (train, dev)),
        iteration(1, 100, 100, " max_steps=250000"),
        f"speechprompt kmeans --manifest {train} --features hubert {layer6} --k 500 --percent 1.0 --seed 0 "
        f"--device cpu --out {km2}",
        *(f"speechprompt prepare --manifest {m} --features hubert {layer6} --kmeans {km2} --out {exp}/it2_labels "
          f"--device cpu" for m in (train, dev)),
        iteration(2, 500, 50, ""),
    ]


def test_the_recipe_takes_an_existing_kmeans_other_targets_and_overrides(tmp_path: Path) -> None:
    # As the demo calls it: its mfcc_cmn k-means is reused for the iteration-1 targets (no stage-1 k-means), and the
    # batch is split over processes with an override.
    bin_dir, log, exp = tmp_path / "bin", tmp_path / "calls.txt", tmp_path / "exp"
    bin_dir.mkdir()
    (bin_dir / "speechprompt").write_text(_FAKE_SPEECHPROMPT.format(log=log))
    (bin_dir / "speechprompt").chmod(0o755)
    train, dev, km = tmp_path / "train.tsv", tmp_path / "dev.tsv", tmp_path / "km_mfcc_cmn.safetensors"
    for f in (train, dev, km):
        f.write_text("/\n")
    config = REPO / "recipes" / "pretrain_hubert" / "conf" / "small.yaml"
    proc = subprocess.run(["bash", str(REPO / "recipes" / "pretrain_hubert" / "run.sh"), "--stage", "1",
                           "--stop-stage", "3", "--train", str(train), "--dev", str(dev), "--exp", str(exp),
                           "--features1", "mfcc_cmn", "--km1", str(km), "--steps1", "300", "--device", "cpu",
                           "--options", "batch_size=4 seed=7"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        *(f"speechprompt prepare --manifest {m} --features mfcc_cmn --kmeans {km} --out {exp}/it1_labels --device cpu"
          for m in (train, dev)),
        f"speechprompt pretrain-hubert --config {config} train={train} dev={dev} n_units=100 label_rate=100 "
        f"train_labels={exp}/it1_labels/train.units dev_labels={exp}/it1_labels/dev.units run_dir={exp}/it1 "
        "device=cpu max_steps=300 batch_size=4 seed=7",
    ]
    missing = subprocess.run(["bash", str(REPO / "recipes" / "pretrain_hubert" / "run.sh"), "--stage", "2",
                              "--train", str(train), "--dev", str(dev), "--exp", str(tmp_path / "exp2"),
                              "--km1", str(tmp_path / "nowhere.safetensors")],
                             cwd=REPO, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert missing.returncode != 0 and "nowhere.safetensors" in missing.stderr
