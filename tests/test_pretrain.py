"""`speechprompt pretrain-ulm`: learning, checkpoints, exact resume after SIGKILL, DDP, config errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from speechprompt.cli import main
from speechprompt.config import ConfigError, load_config, to_dict
from speechprompt.fairseq_compat import load_fairseq_checkpoint
from speechprompt.lm_data import PackedLMDataset
from speechprompt.models.unit_lm import load_unit_lm
from speechprompt.pretrain import Dist, PretrainConfig, evaluate, pretrain
from speechprompt.runlog import read_log

REPO = Path(__file__).resolve().parents[1]


def _corpus(root: Path) -> tuple[Path, Path]:
    """A repetitive toy corpus: utterances repeat one of five fixed 8-unit patterns 1-3 times."""
    rng = random.Random(0)
    patterns = [[rng.randrange(20) for _ in range(8)] for _ in range(5)]

    def utterance() -> str:
        return " ".join(map(str, patterns[rng.randrange(5)] * rng.randint(1, 3)))

    root.mkdir(parents=True, exist_ok=True)
    (root / "train.units").write_text("\n".join(utterance() for _ in range(200)) + "\n\n")
    (root / "dev.units").write_text("\n".join(utterance() for _ in range(30)) + "\n")
    return root / "train.units", root / "dev.units"


def _overrides(tmp_path: Path, run: str, **extra: object) -> list[str]:
    train, dev = _corpus(tmp_path / "data")
    args = {
        "train": str(train), "dev": str(dev), "n_units": 20, "model": "tiny", "tokens_per_sample": 32,
        "batch_size": 4, "max_steps": 12, "lr": 3e-3, "warmup_steps": 4, "log_every": 2, "eval_every": 6,
        "save_every": 4, "seed": 3, "run_dir": str(tmp_path / run),
        "threads": 1,  # a tiny model gains nothing from more, and on a busy 2-core machine loses a lot
        **extra,
    }
    return [f"{k}={v}" for k, v in args.items()]


def _config(tmp_path: Path, run: str, **extra: object) -> PretrainConfig:
    return load_config(PretrainConfig, None, _overrides(tmp_path, run, **extra))


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_fairseq_checkpoint(run_dir / "checkpoint_last.pt")["model"]


def test_loss_decreases_and_checkpoints_load(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "run", max_steps=60, batch_size=8, lr=5e-3, eval_every=30, save_every=30)
    metrics = pretrain(cfg)
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoint_best.pt", "checkpoint_last.pt", "config.yaml", "dict.txt", "learning_curves.png",
        "log.csv", "metrics.json", "train_state.pt",
    ]
    log = read_log(run_dir / "log.csv")
    losses = [v for _, v in log["train_loss"]]
    assert losses[-1] < 0.5 * losses[0]
    assert [s for s, _ in log["dev_ppl"]] == [30, 60]
    assert metrics["dev_ppl"] < 0.5 * metrics["unigram_dev_ppl"]
    assert metrics["dev_loss_bits"] == pytest.approx(metrics["dev_loss"] / 0.6931471805599453)
    assert load_config(PretrainConfig, run_dir / "config.yaml") == cfg

    model, dictionary = load_unit_lm(run_dir / "checkpoint_best.pt")
    assert len(dictionary) == 24 and model.cfg.layers == 2
    dev = PackedLMDataset.from_unit_files([cfg.dev], dictionary, cfg.tokens_per_sample)
    assert evaluate(model, dev, 8, torch.device("cpu"), Dist()) == pytest.approx(metrics["dev_loss"], rel=1e-5)


_KILLED_CHILD = """
import os, signal, sys
from speechprompt.config import load_config
from speechprompt.pretrain import PretrainConfig, pretrain

real_replace, saves = os.replace, []

def replace_then_die(src, dst):
    # SIGKILL in the middle of the second training-state save: written to its temp file, never renamed.
    if str(dst).endswith("train_state.pt"):
        saves.append(dst)
        if len(saves) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)

os.replace = replace_then_die
pretrain(load_config(PretrainConfig, None, sys.argv[1:]))
"""


def test_resume_after_sigkill_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    extra = {"dropout": 0.1}  # dropout draws from the RNG, whose state must be restored too
    straight = pretrain(_config(tmp_path, "straight", **extra))

    overrides = _overrides(tmp_path, "resumed", **extra)
    proc = subprocess.run([sys.executable, "-c", _KILLED_CHILD, *overrides], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = tmp_path / "resumed"
    assert torch.load(run_dir / "train_state.pt", weights_only=True)["position"]["step"] == 4
    assert any(p.name.startswith(".train_state.pt.") for p in run_dir.iterdir())  # the half-done save
    assert not (run_dir / "metrics.json").exists()

    resumed = pretrain(load_config(PretrainConfig, None, overrides))
    theirs, ours = _weights(tmp_path / "straight"), _weights(run_dir)
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key
    assert resumed["dev_loss"] == straight["dev_loss"]
    steps = [s for s, _ in read_log(run_dir / "log.csv")["train_loss"]]
    assert steps == list(range(2, 13, 2))  # the steps replayed after the kill are logged once


def test_longer_max_steps_continues_a_finished_run_exactly(tmp_path: Path) -> None:
    pretrain(_config(tmp_path, "straight"))
    pretrain(_config(tmp_path, "extended", max_steps=5))
    pretrain(_config(tmp_path, "extended"))
    theirs, ours = _weights(tmp_path / "straight"), _weights(tmp_path / "extended")
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_resume_refuses_a_changed_config_and_resume_false_a_used_run_dir(tmp_path: Path) -> None:
    pretrain(_config(tmp_path, "run", max_steps=4))
    with pytest.raises(ConfigError, match="saved by a run with lr=0.003, but this config has 0.001"):
        pretrain(_config(tmp_path, "run", max_steps=8, lr=1e-3))
    with pytest.raises(ConfigError, match="holds an earlier run and resume=false"):
        pretrain(_config(tmp_path, "run", resume=False))


def test_unknown_config_key_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain-ulm", *_overrides(tmp_path, "run"), "learning_rate=1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("speechprompt pretrain-ulm: error: unknown config key learning_rate")


def test_missing_unit_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain-ulm", *_overrides(tmp_path, "run"), f"dev={tmp_path / 'nope.units'}"]) == 2
    assert "nope.units: cannot read unit file" in capsys.readouterr().err


def test_help_lists_every_config_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["pretrain-ulm", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in to_dict(_config_defaults()):
        assert f"  {key} (" in out, key


def _config_defaults() -> PretrainConfig:
    return PretrainConfig(train=["t.units"], dev="d.units")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("schedule=linear", "schedule 'linear' is not one of"),
        ("tokens_per_sample=4096", "exceeds the model's max_positions 256"),
        ("model_overrides.vocab_size=50", "vocab_size 50 != n_units \\+ 4 = 24"),
        ("model_overrides.depth=2", "unknown config key depth"),
        ("device=tpu", "device 'tpu' is not one of"),
    ],
)
def test_bad_values_are_config_errors(tmp_path: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, None, [*_overrides(tmp_path, "run"), override])


def test_shipped_configs_load() -> None:
    for path in sorted((REPO / "recipes" / "pretrain_ulm" / "conf").glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# speechprompt pretrain-ulm --config recipes/pretrain_ulm/conf/"), path
        cfg = load_config(PretrainConfig, path)
        assert cfg.model_config().vocab_size == cfg.n_units + 4
        assert yaml.safe_load(path.read_text()).keys() <= to_dict(cfg).keys()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    common = {"max_steps": 3, "eval_every": 3, "save_every": 3, "dropout": 0.0}
    single = pretrain(_config(tmp_path, "single", batch_size=4, **common))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "speechprompt.cli", "pretrain-ulm", *_overrides(tmp_path, "ddp", batch_size=2, **common)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(metrics) == 1 and '"world_size": 2' in metrics[0]  # only rank 0 reports
    theirs, ours = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for key in theirs:
        if key.endswith("k_proj.bias"):
            # Its gradient is zero in exact arithmetic (softmax ignores a constant added to all of a query's
            # scores), so Adam normalises rounding noise into a full-size update: not comparable.
            continue
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    model, _ = load_unit_lm(tmp_path / "ddp" / "checkpoint_best.pt")
    assert model.cfg.vocab_size == 24
    losses = [v for _, v in read_log(tmp_path / "ddp" / "log.csv")["train_loss"]]
    assert losses[-1] < losses[0]
    assert single["step"] == 3
