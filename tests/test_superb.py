"""SUPERB protocol on a tiny random HuBERT: weighted layer sum, heads, methods inside the encoder, checkpoints.

The corpus is tones (``make_tone_corpus`` in conftest.py): a low (200 Hz) and a high (4 kHz) class with random phase,
amplitude, length and noise, which even a random 2-layer HuBERT separates after mean pooling.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from speechprompt import config as C
from speechprompt.checkpoint import load_checkpoint
from speechprompt.config import ConfigError
from speechprompt.errors import CheckpointError
from speechprompt.models.hubert import load_hubert
from speechprompt.superb import (
    ClassificationHead,
    CTCHead,
    SuperbConfig,
    WeightedLayerSum,
    build_superb,
    evaluate_superb,
    fit_superb,
    load_audio_split,
    load_superb,
    read_batches,
    train_superb,
)
from speechprompt.superb import train as superb_train
from speechprompt.superb.data import epoch_order
from speechprompt.tasks.ctc import CharVocabulary
from speechprompt.tuning import method_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_tone_corpus):
    return make_tone_corpus(tmp_path_factory.mktemp("superb"), train=8, dev=4, ctc_train=6, ctc_dev=2)


def _config(corpus, run_dir, method="linear_probe", options=None, **kw) -> SuperbConfig:
    data = {"train_manifest": str(corpus["train"]), "dev_manifest": str(corpus["dev"])}
    fields = {
        "data": data, "upstream": str(corpus["upstream"]), "run_dir": str(run_dir), "device": "cpu",
        "method": {"name": method, "options": options or {}}, "batch_size": 4, "max_steps": 4, "eval_every": 4,
        "optim": {"lr": 1e-2}, "log_every": 1,
    }
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(fields.get(key), dict):
            fields[key] = {**fields[key], **value}
        else:
            fields[key] = value
    return C.from_dict(SuperbConfig, fields)


def _upstream_reference(path) -> dict[str, torch.Tensor]:
    model, _ = load_hubert(path)
    model.remove_pretraining_modules()
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- building blocks ---------------------------------------------------------------------------------------------


def test_weighted_layer_sum_starts_as_the_mean_and_normalises():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 5, 8) * (i + 1) + i for i in range(3)]
    wsum = WeightedLayerSum(3)
    torch.testing.assert_close(wsum(hidden), torch.stack(hidden).mean(0))
    with torch.no_grad():
        wsum.weights.copy_(torch.tensor([0.0, 0.0, 50.0]))
    torch.testing.assert_close(wsum(hidden), hidden[2])  # softmax puts all the weight on the last state
    assert wsum.normalized_weights().sum().item() == pytest.approx(1.0)

    normed = WeightedLayerSum(3, layer_norm=True)(hidden)
    expected = torch.stack([torch.nn.functional.layer_norm(h, (8,)) for h in hidden]).mean(0)
    torch.testing.assert_close(normed, expected)
    with pytest.raises(ValueError, match="expected 3"):
        wsum(hidden[:2])


def test_classification_head_pools_only_valid_frames():
    torch.manual_seed(0)
    head = ClassificationHead(4, ["a", "b", "c"])
    feats = torch.randn(1, 6, 4)
    mask = torch.tensor([[False] * 4 + [True] * 2])
    garbage = feats.clone()
    garbage[:, 4:] = 1e3
    torch.testing.assert_close(head(feats, mask), head(garbage, mask))
    torch.testing.assert_close(head(feats, mask), head.proj(feats[:, :4].mean(1)))
    assert head.decode(head(feats, mask), mask)[0] in head.labels
    assert head.metrics(["a", "b"], ["a", "c"]) == {"accuracy": 0.5}
    with pytest.raises(ConfigError, match="at least 2 classes"):
        ClassificationHead.from_train_labels(4, ["a", "a"])


def test_ctc_head_decodes_and_scores():
    vocab = CharVocabulary.from_texts(["ab"])
    head = CTCHead(3, vocab)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(3) * 20)
        head.proj.bias.zero_()
    feats = torch.nn.functional.one_hot(torch.tensor([[1, 1, 0, 2, 2]]), 3).float()  # a a _ b b
    mask = torch.zeros(1, 5, dtype=torch.bool)
    out = head(feats, mask)
    assert head.decode(out, mask) == ["ab"]
    total, terms = head.loss(out, mask, ["ab"])
    assert total.item() < 1e-3 and terms == 1
    assert head.metrics(["a b", "ab"], ["a b", "ab"]) == {"wer": 0.0, "cer": 0.0}


def _labels_in_batches(split, size: int, order: list[int]) -> list[list[str]]:
    groups = [order[i : i + size] for i in range(0, len(order), size)]
    return [batch.labels for batch in read_batches(split, groups)]


@pytest.mark.parametrize("workers", [0, 2])
def test_data_split_and_batches(corpus, tmp_path, workers):
    split = load_audio_split(corpus["train"])
    assert len(split) == 16 and set(split.labels) == {"low", "high"}
    assert epoch_order(16, 3, 1) == epoch_order(16, 3, 1) != epoch_order(16, 3, 2)
    order = _labels_in_batches(split, 5, epoch_order(16, 3, 0))
    assert sorted(sum(order, [])) == sorted(split.labels) and [len(b) for b in order] == [5, 5, 5, 1]
    bad = tmp_path / "bad.labels"
    bad.write_text("low\n")
    with pytest.raises(Exception, match="has 1 lines"):
        load_audio_split(corpus["train"], bad)
    # A file that breaks during training is left out of its batch and of every later epoch, not fatal, whether
    # worker processes read the audio or the loop itself.
    split.paths[2] = tmp_path / "gone.wav"
    groups = [list(range(i, min(i + 5, 16))) for i in range(0, 16, 5)]
    first = list(read_batches(split, groups, num_workers=workers))
    assert [len(b.rows) for b in first] == [4, 5, 5, 1] and list(split.unreadable) == [2]
    assert first[0].failed == {2: split.unreadable[2]} and "gone.wav" in split.unreadable[2]
    again = list(read_batches(split, groups, num_workers=workers))
    assert [b.rows for b in again] == [b.rows for b in first] and not any(b.failed for b in again)


def test_prompt_method_is_refused(corpus, tmp_path):
    with pytest.raises(ConfigError, match="prefix"):
        _config(corpus, tmp_path, method="prompt")


# -- training ----------------------------------------------------------------------------------------------------


def test_frozen_upstream_learns_tones_and_stays_bitwise_unchanged(corpus, tmp_path):
    cfg = _config(corpus, tmp_path / "frozen", max_steps=32, eval_every=8, optim={"lr": 1e-1})
    trained, summary = fit_superb(cfg)
    # Chance is 0.5 on the balanced dev set.
    assert summary["dev"]["accuracy"] >= 0.875, summary
    assert summary["method_parameters"] == 0
    assert summary["trainable_parameters"] == 3 + (32 * 2 + 2)  # 3 layer weights + Linear(32, 2)

    ckpt = load_checkpoint(tmp_path / "frozen" / "best")
    assert set(ckpt.tensors) == {"head.featurizer.weights", "head.head.proj.weight", "head.head.proj.bias"}
    model = load_superb(tmp_path / "frozen" / "best.safetensors")
    reference = _upstream_reference(corpus["upstream"])
    state = trained.upstream.state_dict()
    assert set(state) == set(reference)
    assert not any(p.requires_grad for p in trained.upstream.parameters())
    for k, v in reference.items():
        assert torch.equal(state[k], v), k

    metrics, _ = evaluate_superb(model, load_audio_split(corpus["dev"]))
    assert metrics["accuracy"] == summary["dev"]["accuracy"]
    logged = (tmp_path / "frozen" / "log.csv").read_text()
    assert "dev_accuracy" in logged and "train_loss" in logged
    assert json.loads((tmp_path / "frozen" / "metrics.json").read_text())["best_step"] > 0


METHODS = [
    ("adapter", {"bottleneck": 4}),
    ("lora", {"rank": 2}),
    ("prefix", {"length": 2}),
    ("bitfit", {}),
    ("mask", {"keep_ratio": 0.9}),
    ("full_finetune", {}),
]


@pytest.mark.parametrize("method,options", METHODS, ids=[m for m, _ in METHODS])
def test_methods_inside_the_encoder_save_only_what_trained_and_reload_exactly(corpus, tmp_path, method, options):
    run_dir = tmp_path / method
    # Without dev data the checkpoint is taken after the last update: the in-memory model is what it must hold.
    cfg = _config(corpus, run_dir, method=method, options=options, max_steps=3, data={"dev_manifest": None})
    trained, summary = fit_superb(cfg)
    assert summary["method_parameters"] > 0 and summary["dev"] is None

    ckpt = load_checkpoint(run_dir / "best")
    assert set(ckpt.head_state) == {"featurizer.weights", "head.proj.weight", "head.proj.bias"}
    assert ckpt.meta["base"]["fingerprint"].startswith("sha256:")
    assert set(ckpt.method_state) == set(trained.method.export_state_dict())
    if method not in ("mask", "prefix"):  # those store an inference form (bitmask, folded prefix)
        # The saved method tensors are exactly the upstream's trainable parameters, by their upstream names.
        trainable = {n for n, p in trained.upstream.named_parameters() if p.requires_grad}
        assert set(ckpt.method_state) == trainable

    # Reloading reproduces the trained model's outputs exactly, and they differ from the untrained model's.
    reloaded = load_superb(run_dir / "best")
    fresh, _ = build_superb(corpus["upstream"], method_config(method, options), "classification", ["high", "low"])
    wavs = next(read_batches(load_audio_split(corpus["dev"]), [list(range(8))])).wavs
    with torch.no_grad():
        out_trained, _ = trained(*trained.prepare(wavs))
        out_reloaded, _ = reloaded(*reloaded.prepare(wavs))
        out_fresh, _ = fresh(*fresh.prepare(wavs))
    torch.testing.assert_close(out_reloaded, out_trained, rtol=0, atol=0)
    assert not torch.equal(out_fresh, out_trained)

    # The trained model's frozen upstream weights are bitwise those of the file, except what the method trains
    # in place (BitFit's biases, every weight under full fine-tuning).
    reference = _upstream_reference(corpus["upstream"])
    state = trained.upstream.state_dict()
    in_place = set(ckpt.method_state) if method in ("bitfit", "full_finetune") else set()
    assert set(reference) <= set(state)
    for k, v in reference.items():
        if k not in in_place:
            assert torch.equal(state[k], v), k
    if in_place:
        assert any(not torch.equal(state[k], reference[k]) for k in in_place)


def test_training_mode_reaches_the_method_but_not_the_frozen_upstream(corpus):
    model, _ = build_superb(corpus["upstream"], method_config("lora", LORA), "classification", ["high", "low"])
    lora = [m for m in model.method.modules() if isinstance(m, torch.nn.Dropout)]
    assert lora and all(m.p == LORA["dropout"] for m in lora)
    model.train()
    assert all(m.training for m in lora)  # LoRA's dropout is the task's
    assert not any(m.training for m in model.upstream.modules() if isinstance(m, torch.nn.Dropout) and m not in lora)
    model.eval()
    assert not any(m.training for m in model.modules())


def test_a_different_upstream_is_refused(corpus, tmp_path):
    train_superb(_config(corpus, tmp_path / "a", method="adapter", options={"bottleneck": 2}, max_steps=1,
                         eval_every=1))
    with pytest.raises(CheckpointError, match="another base model"):
        load_superb(tmp_path / "a" / "best", upstream=corpus["other_upstream"])


def test_ctc_head_trains_and_reports_wer_cer(corpus, tmp_path):
    cfg = _config(corpus, tmp_path / "ctc", head="ctc", max_steps=6, eval_every=3, optim={"lr": 5e-2},
                  data={"train_manifest": str(corpus["ctc_train"]), "dev_manifest": str(corpus["ctc_dev"])})
    summary = train_superb(cfg)
    assert set(summary["dev"]) == {"wer", "cer", "loss", "n", "unreadable"}
    log = (tmp_path / "ctc" / "log.csv").read_text().splitlines()
    losses = [float(r.split(",")[2]) for r in log if ",train_loss," in r]
    assert losses[-1] < losses[0]  # the CTC loss goes down
    model = load_superb(tmp_path / "ctc" / "best")
    assert model.head.vocab.symbols == ["h", "i", "l", "o"]
    metrics, hyps = evaluate_superb(model, load_audio_split(corpus["ctc_dev"]))
    assert metrics["wer"] == summary["dev"]["wer"] and len(hyps) == 4


def test_cli_runs_a_config_file(corpus, tmp_path, capsys):
    from speechprompt.cli import main

    cfg = _config(corpus, tmp_path / "cli", max_steps=2, eval_every=2)
    path = tmp_path / "c.yaml"
    C.save_config(cfg, path)
    assert main(["superb", "--config", str(path), "seed=3", f"run_dir={tmp_path / 'cli2'}"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["steps"] == 2 and (tmp_path / "cli2" / "best.safetensors").is_file()
    assert main(["superb", "--config", str(path), "method.name=prompt"]) == 2
    assert "prefix" in capsys.readouterr().err


RECIPE_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "recipes" / "superb_hubert" / "conf").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=[p.name for p in RECIPE_CONFIGS])
def test_recipe_configs_load_and_their_first_line_runs_them(path):
    words = shlex.split(path.read_text(encoding="utf-8").splitlines()[0][2:])
    assert words[:3] == ["speechprompt", "superb", "--config"]
    assert path.as_posix().endswith(words[3])
    cfg = C.load_config(SuperbConfig, path, [w for w in words[4:] if "=" in w])
    assert C.from_dict(SuperbConfig, C.to_dict(cfg)) == cfg


def test_recipe_configs_cover_every_method_and_both_heads():
    loaded = [C.load_config(SuperbConfig, p) for p in RECIPE_CONFIGS]
    assert {c.method.name for c in loaded} == {"linear_probe", "full_finetune", "adapter", "lora", "prefix", "bitfit",
                                               "mask"}
    assert {c.head for c in loaded} == {"classification", "ctc"}


# -- resuming ----------------------------------------------------------------------------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# LoRA with dropout and the upstream's dropout on: the result depends on the upstream's trainable tensors, Adam's
# moments and the RNG.
LORA = {"rank": 2, "dropout": 0.3}


def _lora_config(corpus, run_dir, max_steps: int, **kw) -> SuperbConfig:
    """LoRA runs of 4 batches per epoch, evaluated every 3 updates."""
    return _config(corpus, run_dir, "lora", LORA, max_steps=max_steps, eval_every=3, upstream_dropout=True, **kw)


class _Killed(Exception):
    """Stands in for the signal that ends a run between two saves."""


def _kill_at_evaluation(monkeypatch, n: int) -> None:
    """Make the ``n``-th dev evaluation of the next run raise :class:`_Killed`."""
    real, calls = superb_train.evaluate_superb, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(superb_train, "evaluate_superb", evaluate)


def _state(run_dir) -> dict:
    return torch.load(run_dir / "train_state.pt", weights_only=True)


def _log_rows(run_dir) -> list[tuple[str, str, str]]:
    """``log.csv`` without its time column."""
    return [tuple(line.split(",")[:3]) for line in (run_dir / "log.csv").read_text().splitlines()]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory, one_thread):
    """A 10-update LoRA run (4 batches per epoch, evaluations at 3, 6, 9, 10), never interrupted."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = train_superb(_lora_config(corpus, run_dir, 10))
    return run_dir, summary


def test_a_killed_run_resumes_to_the_same_tensors_log_and_checkpoint(corpus, tmp_path, uninterrupted, monkeypatch):
    reference_dir, reference = uninterrupted
    cfg = _lora_config(corpus, tmp_path, 10)
    _kill_at_evaluation(monkeypatch, 3)  # at step 9: the last state is step 6's, halfway through epoch 1
    with pytest.raises(_Killed):
        train_superb(cfg)
    progress = _state(tmp_path)["position"]
    assert (progress["step"], progress["epoch"], progress["batch_in_epoch"]) == (6, 1, 2)
    assert _log_rows(tmp_path)[-1][0] == "9"  # the killed run logged steps 7 to 9: the resumed one takes them again
    monkeypatch.undo()

    summary = train_superb(cfg)
    assert _state(tmp_path)["position"]["step"] == 10
    _assert_same_tensors(_state(tmp_path)["trainable"], _state(reference_dir)["trainable"])
    _assert_same_tensors(load_checkpoint(tmp_path / "best").tensors, load_checkpoint(reference_dir / "best").tensors)
    assert _log_rows(tmp_path) == _log_rows(reference_dir)  # the replayed steps are logged once
    measured = ("seconds", "mean_step_seconds", "checkpoint", "peak_rss_bytes", "peak_cuda_allocated_bytes")
    assert {k: v for k, v in summary.items() if k not in measured} == {
        k: v for k, v in reference.items() if k not in measured}
    assert (tmp_path / "learning_curves.png").read_bytes().startswith(PNG_MAGIC)


def test_a_finished_run_started_again_reports_without_training(corpus, uninterrupted, monkeypatch):
    run_dir, reference = uninterrupted
    log_before = (run_dir / "log.csv").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run read training batches")

    monkeypatch.setattr(superb_train, "read_batches", no_training)
    cfg = _lora_config(corpus, run_dir, 10, threads=1)  # threads may change
    assert train_superb(cfg) == reference
    assert (run_dir / "log.csv").read_text() == log_before


def test_raising_max_steps_continues_a_finished_run(corpus, tmp_path, uninterrupted):
    reference_dir, _ = uninterrupted
    train_superb(_lora_config(corpus, tmp_path, 5))  # stops in epoch 1
    summary = train_superb(_lora_config(corpus, tmp_path, 10))
    assert summary["steps"] == 10
    # The extra evaluation at step 5 only adds a dev row: the updates are those of the 10-step run.
    _assert_same_tensors(_state(tmp_path)["trainable"], _state(reference_dir)["trainable"])


def test_resume_refuses_a_changed_run(corpus, tmp_path):
    cosine = {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 3}
    train_superb(_config(corpus, tmp_path / "a", max_steps=2, eval_every=1, optim=cosine))
    with pytest.raises(ConfigError, match=r"train_state\.pt holds an earlier run and resume=false"):
        train_superb(_config(corpus, tmp_path / "a", max_steps=2, eval_every=1, optim=cosine, resume=False))
    with pytest.raises(ConfigError, match=r"optim\.lr=0\.01.*0\.02"):
        train_superb(_config(corpus, tmp_path / "a", max_steps=2, eval_every=1, optim={**cosine, "lr": 2e-2}))
    # Two updates into a 3-update warmup the cosine has not started: a longer run is still the same run...
    train_superb(_config(corpus, tmp_path / "a", max_steps=4, eval_every=1, optim=cosine))
    # ...but four updates in, the decay over max_steps has shaped the updates already taken.
    with pytest.raises(ConfigError, match="changes the learning rate"):
        train_superb(_config(corpus, tmp_path / "a", max_steps=6, eval_every=1, optim=cosine))

    upstream = tmp_path / "hubert.pt"
    upstream.write_bytes(corpus["upstream"].read_bytes())
    train_superb(_config(corpus, tmp_path / "b", upstream=str(upstream), max_steps=2, eval_every=1))
    upstream.write_bytes(corpus["other_upstream"].read_bytes())  # the same path, other weights
    with pytest.raises(CheckpointError, match="fingerprint"):
        train_superb(_config(corpus, tmp_path / "b", upstream=str(upstream), max_steps=4, eval_every=1))


def test_any_encoder_is_an_upstream_hugging_face_directory_included(corpus, tmp_path, capsys):
    from tiny_encoders import our_tiny, write_hf_directory

    from speechprompt.cli import main

    upstream = write_hf_directory(our_tiny("wav2vec2"), tmp_path / "w2v2_hf")
    summary = train_superb(_config(corpus, tmp_path / "w2v2", method="lora", options={"rank": 2},
                                   upstream=str(upstream), max_steps=2, eval_every=2))
    ckpt = load_checkpoint(tmp_path / "w2v2" / "best")
    assert ckpt.meta["base"]["kind"] == "wav2vec2" and ckpt.meta["base"]["path"] == str(upstream)
    model = load_superb(tmp_path / "w2v2" / "best")
    assert type(model.upstream).__name__ == "Wav2Vec2Model"
    metrics, _ = evaluate_superb(model, load_audio_split(corpus["dev"]))
    assert metrics["accuracy"] == summary["dev"]["accuracy"]
    wav = str(load_audio_split(corpus["dev"]).paths[0])
    assert main(["infer", "--checkpoint", str(tmp_path / "w2v2" / "best.safetensors"), wav]) == 0
    assert json.loads(capsys.readouterr().out.strip())["prediction"] in ("low", "high")
