"""What every trainer shares, checked on all three as a user runs them (the CLI, in fresh processes).

* a run killed with SIGKILL at any update and started again ends with the uninterrupted run's tensors, training
  state, log and checkpoints, bit for bit;
* two gloo processes under torchrun take the updates of one process with twice the batch;
* bf16 autocast trains; a non-finite loss, a corrupt training state or a second writer end with one line and
  exit code 2, and nothing already written is lost;
* early stopping stops, and a resumed run keeps its patience counter.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from speechprompt.checkpoint import load_checkpoint
from speechprompt.dictionary import Dictionary
from speechprompt.fairseq_compat import load_fairseq_checkpoint
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig, save_unit_lm

pytestmark = pytest.mark.slow

K = 12  # units
CLASSES = {"yes": [1, 2], "no": [4, 5], "up": [7, 8]}


def _unit_split(path: Path, n: int, seed: int) -> None:
    """Random units around a run of one class's units."""
    rng = random.Random(seed)
    units, labels = [], []
    for _ in range(n):
        label = rng.choice(list(CLASSES))
        seq = [rng.randrange(K) for _ in range(rng.randint(1, 4))] + [rng.choice(CLASSES[label]) for _ in range(4)]
        units.append(" ".join(map(str, seq)))
        labels.append(label)
    path.with_suffix(".units").write_text("\n".join(units) + "\n")
    path.with_suffix(".labels").write_text("\n".join(labels) + "\n")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory, make_tone_corpus: Any) -> dict[str, Path]:
    """A tiny unit LM with dropout (so the RNG state matters) and a unit task; a tone corpus and tiny HuBERTs;
    unit files for pretraining."""
    root = tmp_path_factory.mktemp("trainers")
    torch.manual_seed(0)
    lm = UnitLM(UnitLMConfig.named("tiny", vocab_size=K + 4, max_positions=64, dropout=0.2, attention_dropout=0.1))
    units, audio = root / "units", root / "audio"
    units.mkdir()
    audio.mkdir()
    save_unit_lm(lm.eval(), Dictionary.for_units(K), units / "lm.pt")
    _unit_split(units / "train", 40, 0)
    _unit_split(units / "dev", 12, 1)
    (audio / "equal").mkdir()
    equal = make_tone_corpus(audio / "equal", train=4, dev=2, ctc_train=1, ctc_dev=1, samples=3200)
    return {"root": units, **make_tone_corpus(audio, train=6, dev=3, ctc_train=2, ctc_dev=1),
            "equal_train": equal["train"], "equal_dev": equal["dev"]}


def train_argv(data: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    """A deep prompt with a learnable verbalizer, 5 updates per epoch, evaluated (and saved) every 4 updates."""
    r = data["root"]
    return ["train", f"data.train_units={r}/train.units", f"data.train_labels={r}/train.labels",
            f"data.dev_units={r}/dev.units", f"data.dev_labels={r}/dev.labels", f"base={r}/lm.pt",
            f"run_dir={run_dir}", "batch_size=8", "max_epochs=3", "eval_every=4", "patience=0", "optim.lr=0.02",
            "verbalizer.kind=learnable", "method.options.length=2", "ema_decay=0.5", *extra]


def superb_argv(data: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    """LoRA with dropout in an upstream whose own dropout is on: 3 updates per epoch, evaluated every 4."""
    return ["superb", f"data.train_manifest={data['train']}", f"data.dev_manifest={data['dev']}",
            f"upstream={data['upstream']}", f"run_dir={run_dir}", "device=cpu", "method.name=lora",
            "method.options.rank=2", "method.options.dropout=0.3", "upstream_dropout=true", "batch_size=4",
            "max_steps=9", "eval_every=4", "optim.lr=0.05", "log_every=1", *extra]


def pretrain_argv(data: dict[str, Path], run_dir: Path, *extra: str) -> list[str]:
    r = data["root"]
    return ["pretrain-ulm", f"train={r}/train.units", f"dev={r}/dev.units", f"n_units={K}", "model=tiny",
            "dropout=0.2", "tokens_per_sample=16", "batch_size=4", "max_steps=10", "warmup_steps=3", "lr=3e-3",
            "log_every=1", "eval_every=5", "save_every=3", f"run_dir={run_dir}", *extra]


TRAINERS = {"train": (train_argv, 15), "superb": (superb_argv, 9), "pretrain-ulm": (pretrain_argv, 10)}


def _log_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    """``log.csv`` without its time column and the measured speed (the values that a rerun cannot repeat)."""
    with open(run_dir / "log.csv", newline="") as f:
        return [tuple(row[:3]) for row in csv.reader(f) if row[1] != "tokens_per_s"]


_TIMING = {"seconds", "step_seconds", "mean_step_seconds", "train_seconds", "timed_steps", "wall_time_s",
           "train_tokens_per_s", "peak_cuda_allocated_bytes",
           "peak_rss_bytes", "checkpoint", "created"}


def _assert_same(a: Any, b: Any, where: str = "") -> None:
    """Equal, bit for bit for tensors; timings and paths are skipped."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {sorted(set(a) ^ set(b))}"
        for key in a:
            if key not in _TIMING and key != "run_dir":
                _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _outputs(run_dir: Path) -> dict[str, Any]:
    """What a finished run leaves: its training state, checkpoints and metrics."""
    state = torch.load(run_dir / "train_state.pt", weights_only=True)
    out: dict[str, Any] = {"state": state, "metrics": json.loads((run_dir / "metrics.json").read_text())}
    for name in ("best", "last"):
        if (run_dir / f"{name}.safetensors").exists():
            out[name] = load_checkpoint(run_dir / name).tensors
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        if (run_dir / name).exists():
            out[name] = load_fairseq_checkpoint(run_dir / name)["model"]
    return out


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_a_run_killed_at_any_update_resumes_to_the_uninterrupted_run(data, tmp_path, run_cli, trainer):
    argv, updates = TRAINERS[trainer]
    straight = run_cli(argv(data, tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    reference = _outputs(tmp_path / "straight")
    for kill in sorted(random.Random(trainer).sample(range(2, updates + 1), 2)):
        run_dir = tmp_path / f"killed_at_{kill}"
        killed = run_cli(argv(data, run_dir), kill_at_update=kill)
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert not (run_dir / "metrics.json").exists()
        saved = (run_dir / "train_state.pt").exists()  # killed before the first save: nothing to resume
        resumed = run_cli(argv(data, run_dir))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert ("resuming" in resumed.stderr) == saved
        _assert_same(_outputs(run_dir), reference, f"killed at {kill}")
        assert _log_rows(run_dir) == _log_rows(tmp_path / "straight")  # replayed updates are logged once


def test_two_gloo_processes_train_a_prompt_like_one_process_with_twice_the_batch(data, tmp_path, run_cli):
    common = ("dropout=false", "ema_decay=0", "max_epochs=2")  # no dropout: processes draw different masks
    single = run_cli(train_argv(data, tmp_path / "single", "batch_size=8", *common))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(train_argv(data, tmp_path / "ddp", "batch_size=4", *common), torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert len([line for line in ddp.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 reports
    a, b = _outputs(tmp_path / "single"), _outputs(tmp_path / "ddp")
    assert b["metrics"]["processes"] == 2 and a["metrics"]["steps"] == b["metrics"]["steps"] == 10
    for key, value in a["best"].items():
        torch.testing.assert_close(b["best"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_two_gloo_processes_train_a_superb_adapter_like_one_process_with_twice_the_batch(data, tmp_path, run_cli):
    # Clips of one length: the amount of padding in a batch changes HuBERT's outputs (as fairseq's), and a batch
    # split over two processes is padded differently.
    common = (f"data.train_manifest={data['equal_train']}", f"data.dev_manifest={data['equal_dev']}",
              "method.name=adapter", "method.options={bottleneck: 4}", "upstream_dropout=false", "max_steps=4",
              "eval_every=2")
    single = run_cli(superb_argv(data, tmp_path / "single", "batch_size=4", *common))
    assert single.returncode == 0, single.stderr[-3000:]
    ddp = run_cli(superb_argv(data, tmp_path / "ddp", "batch_size=2", "num_workers=1", *common), torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = _outputs(tmp_path / "single"), _outputs(tmp_path / "ddp")
    assert b["metrics"]["processes"] == 2
    for key, value in a["state"]["trainable"].items():
        torch.testing.assert_close(b["state"]["trainable"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_bf16_autocast_trains_with_fp32_trained_tensors(data, tmp_path, run_cli, trainer):
    argv, _ = TRAINERS[trainer]
    proc = run_cli(argv(data, tmp_path / "bf16", "precision=bf16", "grad_accum=2", "activation_checkpointing=true",
                        "log_every=1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "bf16" / "train_state.pt", weights_only=True)
    trained = state.get("method") or state.get("trainable") or state["model"]
    assert trained and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in trained.values())
    losses = [float(v) for s, m, v in _log_rows(tmp_path / "bf16")[1:] if m == "train_loss"]
    assert losses and all(map(math.isfinite, losses))


def test_a_nan_loss_stops_with_one_line_and_keeps_what_was_saved(data, tmp_path, run_cli):
    run_dir = tmp_path / "nan"
    assert run_cli(pretrain_argv(data, run_dir, "max_steps=3", "save_every=3")).returncode == 0
    saved = (run_dir / "train_state.pt").read_bytes()
    best = (run_dir / "checkpoint_best.pt").read_bytes()
    proc = run_cli(pretrain_argv(data, run_dir, "max_steps=6", "save_every=3", "lr=1e30", "warmup_steps=0",
                                 "clip_norm=0"))
    # The rate is part of the run: a resumed run may not change it, so the huge rate goes to a new run directory.
    assert proc.returncode == 2 and "saved by a run with" in proc.stderr
    proc = run_cli(pretrain_argv(data, tmp_path / "nan2", "lr=1e30", "warmup_steps=0", "clip_norm=0",
                                 "weight_decay=0"))
    err = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 2 and len(err) == 1 and "non-finite training loss" in err[0], proc.stderr[-2000:]
    assert (run_dir / "train_state.pt").read_bytes() == saved and (run_dir / "checkpoint_best.pt").read_bytes() == best


def test_a_corrupt_training_state_is_one_line_and_is_not_overwritten(data, tmp_path, run_cli):
    run_dir = tmp_path / "corrupt"
    assert run_cli(superb_argv(data, run_dir, "max_steps=2", "eval_every=1")).returncode == 0
    state = run_dir / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    torn = state.read_bytes()
    proc = run_cli(superb_argv(data, run_dir, "max_steps=4", "eval_every=1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "unreadable training state" in lines[-1] and "move it away" in lines[-1]
    assert state.read_bytes() == torn and (run_dir / "best.safetensors").exists()


def test_early_stopping_stops_and_a_resumed_run_keeps_its_patience(data, tmp_path, run_cli):
    # A learning rate of ~0 cannot improve the dev metric after the first evaluation: patience 2 stops at the
    # third evaluation.
    argv = ("optim.lr=1e-12", "eval_every=1", "max_epochs=50", "patience=2", "ema_decay=0")
    proc = run_cli(train_argv(data, tmp_path / "stop", *argv))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "stop" / "metrics.json").read_text())
    assert metrics["stopped"] == "early_stopping" and metrics["steps"] == 3 and metrics["best_step"] == 1

    # Killed inside update 3 (the state of step 2 holds one evaluation without improvement), resumed: it stops at
    # the same step, so the counter came back with the state instead of starting over.
    killed = run_cli(train_argv(data, tmp_path / "resumed", *argv), kill_at_update=3)
    assert killed.returncode == -9
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert state["best"]["bad_evals"] == 1 and state["position"]["step"] == 2
    assert run_cli(train_argv(data, tmp_path / "resumed", *argv)).returncode == 0
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["steps"] == 3
