"""End-to-end training on a tiny unit LM and a tiny separable unit task: learning, frozen backbone, checkpoints,
resume, baselines."""

from __future__ import annotations

import json
import random

import pytest
import torch

from speechprompt import checkpoint as ck
from speechprompt import config as C
from speechprompt import train as T
from speechprompt.dictionary import Dictionary
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig, save_unit_lm

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # whole training runs, end to end

K = 20  # units
CLASSES = {"yes": [1, 2, 3], "no": [5, 6, 7], "up": [9, 10, 11], "down": [13, 14, 15]}


def write_split(path, n, seed):
    """Utterances of random units with a run of one class's units in the middle."""
    rng = random.Random(seed)
    units, labels = [], []
    for _ in range(n):
        label = rng.choice(list(CLASSES))
        seq = [rng.randrange(K) for _ in range(rng.randint(2, 5))] + [rng.choice(CLASSES[label]) for _ in range(6)]
        seq += [rng.randrange(K) for _ in range(rng.randint(2, 5))]
        units.append(" ".join(map(str, seq)))
        labels.append(label)
    path.with_suffix(".units").write_text("\n".join(units) + "\n")
    path.with_suffix(".labels").write_text("\n".join(labels) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, one_thread):
    """A tiny LM pretrained for a few steps on unit sequences (no labels), and train/dev splits."""
    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    model = UnitLM(UnitLMConfig.named("tiny", vocab_size=K + 4, max_positions=64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = random.Random(1)
    for _ in range(150):  # next-unit prediction only: the LM learns that class units cluster, not the labels
        rows = []
        for _ in range(32):
            c = rng.choice(list(CLASSES.values()))
            rows.append([2] + [4 + (rng.choice(c) if rng.random() < 0.6 else rng.randrange(K)) for _ in range(12)])
        x = torch.tensor(rows)
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_unit_lm(model.eval(), Dictionary.for_units(K), root / "lm.pt")
    write_split(root / "train", 128, seed=0)
    write_split(root / "dev", 48, seed=1)
    return root


def make_config(corpus, run_dir, *overrides):
    return C.load_config(T.TrainConfig, None, [
        f"data.train_units={corpus}/train.units", f"data.train_labels={corpus}/train.labels",
        f"data.dev_units={corpus}/dev.units", f"data.dev_labels={corpus}/dev.labels", f"base={corpus}/lm.pt",
        f"run_dir={run_dir}", "batch_size=16", "max_epochs=6", "patience=0", "optim.lr=0.02", *overrides,
    ])


class Captured:
    """The objects ``train`` builds, captured through the names it looks up."""

    def __init__(self, monkeypatch):
        real_load, real_build, real_task = T.load_speech_lm, T.build_method, T.build_task

        def load(*a, **k):
            self.model, d = real_load(*a, **k)
            self.initial = {n: v.clone() for n, v in self.model.state_dict().items()}
            return self.model, d

        def build(*a, **k):
            self.method = real_build(*a, **k)
            return self.method

        def task(*a, **k):
            self.task = real_task(*a, **k)
            return self.task

        monkeypatch.setattr(T, "load_speech_lm", load)
        monkeypatch.setattr(T, "build_method", build)
        monkeypatch.setattr(T, "build_task", task)


def test_deep_prompt_learns_and_backbone_stays_bitwise_frozen(corpus, tmp_path, monkeypatch):
    got = Captured(monkeypatch)
    summary = T.train(make_config(corpus, tmp_path / "run", "verbalizer.kind=learnable"))
    assert summary["dev"]["argmax.accuracy"] >= 0.9  # chance is 0.25
    for name, value in got.model.state_dict().items():
        assert torch.equal(value, got.initial[name]), name
    # Trainable = deep prompt (2 * layers + 1) * L * d + separator d, plus the Linear(V, C) verbalizer.
    d, layers = 64, 2
    assert summary["trainable_params"] == (2 * layers + 1) * 5 * d + d + (K + 4) * 4
    for key in ("checkpoint_bytes", "peak_rss_bytes", "mean_step_seconds"):
        assert summary[key] > 0
    run = tmp_path / "run"
    for name in ("config.yaml", "log.csv", "learning_curves.png", "best.safetensors", "best.json",
                 "last.safetensors", "train_state.pt", "metrics.json", "dev.metrics.json", "dev.confusion.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "metrics.json").read_text())["dev"] == summary["dev"]

    # The checkpoint holds exactly the trainable tensors, and reloading reproduces the logits bit for bit.
    saved = ck.load_checkpoint(run / "best.safetensors")
    trainable = {f"method.{n}" for n, p in got.method.named_parameters() if p.requires_grad}
    trainable |= {f"head.{n}" for n, p in got.task.head.named_parameters()}
    assert set(saved.tensors) == trainable
    from speechprompt.tasks.data import collate, load_split
    from speechprompt.tasks.loading import load_task

    task, _, _ = load_task(run / "best.safetensors", device="cpu")
    split = load_split(corpus / "dev.units", corpus / "dev.labels", K)
    batch = collate(split.tokens[:8], split.labels[:8], task.verbalizer)
    got.model.eval()
    with torch.no_grad():
        assert torch.equal(task.class_logits(batch), got.task.class_logits(batch))


def test_fixed_verbalizer_full_finetune_baseline(corpus, tmp_path):
    summary = T.train(make_config(corpus, tmp_path / "ft", "method.name=full_finetune", "optim.lr=0.003",
                                  "max_epochs=4"))
    assert summary["dev"]["greedy.accuracy"] >= 0.9 and summary["dev"]["constrained.accuracy"] >= 0.9
    saved = ck.load_checkpoint(tmp_path / "ft" / "best")
    model = UnitLM(UnitLMConfig.named("tiny", vocab_size=K + 4, max_positions=64))
    # The whole LM is what trained (the tied output projection is the embedding, stored once).
    assert set(saved.tensors) == {f"method.{n}" for n, _ in model.named_parameters()}
    assert summary["trainable_params"] == sum(p.numel() for p in model.parameters())


def test_linear_probe_baseline(corpus, tmp_path):
    summary = T.train(make_config(corpus, tmp_path / "probe", "method.name=linear_probe", "optim.lr=0.01"))
    assert summary["dev"]["argmax.accuracy"] >= 0.8
    assert summary["trainable_params"] == 64 * 4 + 4
    assert set(ck.load_checkpoint(tmp_path / "probe" / "best").tensors) == {"head.weight", "head.bias"}


@pytest.mark.parametrize("ema", ["0", "0.8"])
def test_resume_after_a_kill_gives_the_same_run(corpus, tmp_path, monkeypatch, ema):
    args = ("max_epochs=3", "eval_every=5", "method.options.length=3", f"ema_decay={ema}")
    reference = T.train(make_config(corpus, tmp_path / "ref", *args))

    real = T.evaluate_split
    calls = {"n": 0}

    def killed_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(T, "evaluate_split", killed_on_third)
    with pytest.raises(KeyboardInterrupt):
        T.train(make_config(corpus, tmp_path / "killed", *args))
    assert not (tmp_path / "killed" / "metrics.json").exists()
    monkeypatch.setattr(T, "evaluate_split", real)
    resumed = T.train(make_config(corpus, tmp_path / "killed", *args))
    assert resumed["dev"] == reference["dev"] and resumed["best_step"] == reference["best_step"]
    a = ck.load_checkpoint(tmp_path / "ref" / "best").tensors
    b = ck.load_checkpoint(tmp_path / "killed" / "best").tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # A finished run is not trained again; a changed config is refused rather than mixed into the old state.
    assert T.train(make_config(corpus, tmp_path / "killed", *args))["best_step"] == reference["best_step"]
    with pytest.raises(C.ConfigError, match="optim.lr"):
        T.train(make_config(corpus, tmp_path / "killed", *args, "optim.lr=0.5"))
    # A moved run directory is still that run.
    (tmp_path / "killed").rename(tmp_path / "moved")
    assert T.train(make_config(corpus, tmp_path / "moved", *args))["best_step"] == reference["best_step"]


def test_config_errors_are_caught_before_training(corpus, tmp_path):
    with pytest.raises(C.ConfigError, match="unknown config key"):
        make_config(corpus, tmp_path, "method.options.lenght=3")
    with pytest.raises(C.ConfigError, match="unknown tuning method|unknown"):
        make_config(corpus, tmp_path, "method.name=nope")
    with pytest.raises(C.ConfigError, match="sequence"):
        make_config(corpus, tmp_path, "data.task=sequence")
    cfg = make_config(corpus, tmp_path, "data.task=multislot")
    assert cfg.verbalizer.slot_separator == "|"


def test_cli_train_help_lists_every_key(capsys):
    from speechprompt.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("data.train_units", "method.options", "optim.lr", "verbalizer.kind", "patience", "resume"):
        assert key in out


def test_ema_checkpoints_hold_the_average_and_training_goes_on_from_the_live_tensors(corpus, tmp_path):
    T.train(make_config(corpus, tmp_path / "r", "max_epochs=2", "method.options.length=3", "ema_decay=0.9"))
    state = torch.load(tmp_path / "r" / "train_state.pt", weights_only=True)
    saved = ck.load_checkpoint(tmp_path / "r" / "last").tensors
    live = {k: v for k, v in state["method"].items() if k != "prompt"}  # the deep prompt's unread input prompt
    assert live and all(not torch.equal(saved[f"method.{k}"], v) for k, v in live.items())  # not the live tensors...
    averages = state["updater"]["ema"]["average"]
    assert all(any(torch.equal(a, saved[f"method.{k}"]) for a in averages) for k in live)  # ...but their average
    with pytest.raises(C.ConfigError, match="ema_decay"):
        make_config(corpus, tmp_path, "ema_decay=1")
