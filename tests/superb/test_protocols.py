"""The protocols end to end on tiny encoders and the tone corpus: s3prl's BiLSTM-CTC head learning to transcribe,
fairseq's CTC fine-tuning (frozen conv front end, frozen first updates, span masking), S3-Router's masks with a
trainable CTC projection, s3prl's IC head, AST with its own head, and the data options (crops, balanced sampling).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from speechprompt import config as C
from speechprompt.checkpoint import load_checkpoint
from speechprompt.config import ConfigError
from speechprompt.superb import (
    SuperbConfig,
    build_superb,
    evaluate_superb,
    fit_superb,
    load_audio_split,
    load_superb,
    read_batches,
    train_superb,
)
from speechprompt.superb.data import Crop, balanced_order
from speechprompt.tuning import TuningError, method_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_tone_corpus):
    return make_tone_corpus(tmp_path_factory.mktemp("protocols"), train=8, dev=4, ctc_train=6, ctc_dev=3)


def _config(corpus, run_dir: Path, **fields) -> SuperbConfig:
    base = {
        "data": {"train_manifest": str(corpus["ctc_train"]), "dev_manifest": str(corpus["ctc_dev"])},
        "upstream": str(corpus["upstream"]), "run_dir": str(run_dir), "device": "cpu", "batch_size": 4,
        "max_steps": 4, "eval_every": 4, "optim": {"lr": 1e-2}, "log_every": 1,
    }
    for key, value in fields.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return C.from_dict(SuperbConfig, base)


def _upstream_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.upstream.state_dict().items()}


def _dev_outputs(model, corpus, split: str = "ctc_dev") -> torch.Tensor:
    wavs = next(read_batches(load_audio_split(corpus[split]), [list(range(6))])).wavs
    model.eval()
    with torch.no_grad():
        return model(*model.prepare(wavs))[0]


@pytest.mark.slow
def test_bilstm_ctc_head_learns_to_transcribe_lo_and_hi(corpus, tmp_path):
    # The tones are stationary: the LSTMs must learn *where* in the clip to put the first letter (300 updates).
    head_options = {"project_dim": 16, "hidden": [16, 16], "dropout": 0.0, "time_masks": 0, "freq_masks": 0}
    cfg = _config(corpus, tmp_path / "asr", head="bilstm_ctc", head_options=head_options, max_steps=300,
                  eval_every=50, optim={"lr": 1e-2})
    model, summary = fit_superb(cfg)
    log = [line.split(",") for line in (tmp_path / "asr" / "log.csv").read_text().splitlines()[1:]]
    wers = [float(v) for step, key, v, *_ in log if key == "dev_wer"]
    losses = [float(v) for step, key, v, *_ in log if key == "train_loss"]
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])
    assert wers[0] == 1.0 and summary["dev"]["wer"] <= 1 / 6, wers  # from nothing right to at most 1 of 6 wrong
    ckpt = load_checkpoint(tmp_path / "asr" / "best")
    assert {k.split(".")[1] for k in ckpt.head_state if k.startswith("head.")} == {"projector", "rnns", "proj"}
    reloaded = load_superb(tmp_path / "asr" / "best")
    metrics, hyps = evaluate_superb(reloaded, load_audio_split(corpus["ctc_dev"]))
    assert metrics["wer"] == summary["dev"]["wer"] and {"lo", "hi"} <= set(hyps)
    assert reloaded.head.options.hidden == [16, 16]


def test_ctc_finetuning_keeps_the_front_end_frozen_and_the_encoder_frozen_first(corpus, tmp_path):
    fine_tune = {"method": {"name": "full_finetune", "options": {"frozen": ["feature_extractor"]}},
                 "head": "encoder_ctc", "freeze_upstream_updates": 3, "upstream_dropout": True,
                 "feature_mask": {"time_prob": 0.3, "time_length": 2, "channel_prob": 0.2, "channel_length": 4},
                 "optim": {"lr": 5e-3, "schedule": "tri_stage", "warmup_steps": 1, "min_lr_ratio": 0.05,
                           "decay_steps": 6}}
    reference, _ = build_superb(corpus["upstream"], "linear_probe", "encoder_ctc", ["lo", "hi"])
    before = _upstream_state(reference)

    model, summary = fit_superb(_config(corpus, tmp_path / "ft", max_steps=3, eval_every=3, **fine_tune))
    assert summary["layer_weights"] is None  # the head reads the encoder's output, not a weighted sum
    after = _upstream_state(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # 3 updates, all with the encoder frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("upstream.feature_extractor.") for n in trainable)
    assert "upstream.encoder.layers.0.fc1.weight" in trainable and "head.proj.weight" in trainable
    n_conv = sum(p.numel() for p in model.upstream.feature_extractor.parameters())
    assert summary["trainable_parameters"] == sum(p.numel() for p in model.upstream.parameters()) - n_conv + \
        sum(p.numel() for p in model.head.parameters())

    model, summary = fit_superb(_config(corpus, tmp_path / "ft", max_steps=6, eval_every=3, **fine_tune))
    # Continued after 3 updates, it ends where an uninterrupted run does: span masks and dropout replay exactly.
    fit_superb(_config(corpus, tmp_path / "whole", max_steps=6, eval_every=3, **fine_tune))
    resumed, whole = (torch.load(tmp_path / r / "train_state.pt", weights_only=True)["trainable"]
                      for r in ("ft", "whole"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    after = _upstream_state(model)
    conv = [k for k in before if k.startswith("feature_extractor.")]
    assert conv and all(torch.equal(after[k], before[k]) for k in conv)  # never trains
    assert not torch.equal(after["encoder.layers.0.fc1.weight"], before["encoder.layers.0.fc1.weight"])
    ckpt = load_checkpoint(tmp_path / "ft" / "best")
    assert not any(k.startswith("feature_extractor.") for k in ckpt.method_state)
    assert set(ckpt.head_state) == {"head.proj.weight", "head.proj.bias"}  # no layer weights either
    # Evaluation is deterministic (no masking, no dropout), and the reloaded model gives the trained one's outputs.
    reloaded = load_superb(tmp_path / "ft" / "best")
    torch.testing.assert_close(_dev_outputs(reloaded, corpus), _dev_outputs(reloaded, corpus), rtol=0, atol=0)
    with pytest.raises(TuningError, match="frozen module 'front_end'"):
        build_superb(corpus["upstream"], method_config("full_finetune", {"frozen": ["front_end"]}), "encoder_ctc",
                     ["lo"])


def test_feature_mask_changes_training_outputs_but_not_evaluation(corpus):
    from speechprompt.superb.feature_mask import FeatureMaskConfig

    model, _ = build_superb(corpus["upstream"], "linear_probe", "encoder_ctc", ["lo", "hi"],
                            feature_mask=FeatureMaskConfig(time_prob=0.5, time_length=2))
    plain, _ = build_superb(corpus["upstream"], "linear_probe", "encoder_ctc", ["lo", "hi"])
    plain.head.load_state_dict(model.head.state_dict())
    wavs = next(read_batches(load_audio_split(corpus["ctc_dev"]), [list(range(4))])).wavs
    batch = model.prepare(wavs)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(*batch)[0], plain.eval()(*batch)[0], rtol=0, atol=0)
        torch.manual_seed(0)
        assert not torch.equal(model.train()(*batch)[0], plain.train()(*batch)[0])
    with pytest.raises(ConfigError, match="wav2vec 2.0-family"):
        from tiny_encoders import our_tiny, write_hf_ast_directory

        ast_dir = write_hf_ast_directory(our_tiny("ast"), corpus["upstream"].parent / "ast_mask")
        build_superb(ast_dir, "linear_probe", "ast", ["lo", "hi"], feature_mask=FeatureMaskConfig(channel_prob=0.2))


def test_s3router_protocol_masks_the_ffn_and_trains_the_ctc_projection(corpus, tmp_path):
    mask = {"name": "mask", "options": {"keep_ratio": 0.9, "init": "rank", "ffn_only": True}}
    trained, summary = fit_superb(_config(corpus, tmp_path / "router", method=mask, head="encoder_ctc",
                                          max_steps=3, eval_every=3))
    ckpt = load_checkpoint(tmp_path / "router" / "best")
    masked = {k.rsplit(".router", 1)[0] for k in ckpt.method_state}
    assert masked == {f"encoder.layers.{i}.{fc}" for i in range(2) for fc in ("fc1", "fc2")}
    assert set(ckpt.head_state) == {"head.proj.weight", "head.proj.bias"}
    reloaded = load_superb(tmp_path / "router" / "best")
    torch.testing.assert_close(_dev_outputs(reloaded, corpus), _dev_outputs(trained, corpus), rtol=0, atol=0)
    assert summary["method_parameters"] == sum(2 * 32 * 64 for _ in range(2))  # one score per FFN weight


def test_multislot_head_trains_on_two_slots_and_reports_all_slots_accuracy(corpus, tmp_path):
    split = load_audio_split(corpus["train"])
    labels = tmp_path / "train.labels"
    labels.write_text("".join(f"{y}|{'up' if y == 'high' else 'down'}\n" for y in split.labels))
    dev = load_audio_split(corpus["dev"])
    dev_labels = tmp_path / "dev.labels"
    dev_labels.write_text("".join(f"{y}|{'up' if y == 'high' else 'down'}\n" for y in dev.labels))
    data = {"train_manifest": str(corpus["train"]), "train_labels": str(labels), "dev_manifest": str(corpus["dev"]),
            "dev_labels": str(dev_labels)}
    summary = train_superb(_config(corpus, tmp_path / "ic", data=data, head="multislot",
                                   head_options={"projector_dim": 8}, max_steps=32, eval_every=8,
                                   optim={"lr": 1e-1}))
    assert set(summary["dev"]) >= {"accuracy", "slot_accuracy"}
    assert summary["dev"]["accuracy"] >= 0.875  # chance: 0.5 (the two slots agree)
    model = load_superb(tmp_path / "ic" / "best")
    assert model.head.slots == [["high", "low"], ["down", "up"]]


def test_ast_upstream_with_its_own_classifier_head(corpus, tmp_path, capsys):
    from tiny_encoders import our_tiny, write_hf_ast_directory

    from speechprompt.cli import main

    upstream = write_hf_ast_directory(our_tiny("ast"), tmp_path / "ast")
    adapter = {"name": "adapter", "options": {"slots": ["post_attn", "parallel_ffn"], "bottleneck_ratio": 0.25}}
    data = {"train_manifest": str(corpus["train"]), "dev_manifest": str(corpus["dev"])}
    summary = train_superb(_config(corpus, tmp_path / "aat", data=data, upstream=str(upstream), head="ast",
                                   method=adapter, max_steps=2, eval_every=2))
    assert summary["layer_weights"] is None and summary["method_parameters"] > 0
    ckpt = load_checkpoint(tmp_path / "aat" / "best")
    assert ckpt.meta["superb"]["head"] == "ast" and ckpt.meta["base"]["kind"] == "ast"
    assert ckpt.meta["base"]["parameters"] == sum(p.numel() for p in our_tiny("ast").parameters())
    model = load_superb(tmp_path / "aat" / "best")
    metrics, _ = evaluate_superb(model, load_audio_split(corpus["dev"]))
    assert metrics["accuracy"] == summary["dev"]["accuracy"]
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(tmp_path / "aat" / "best.safetensors"), "--manifest",
                 str(corpus["dev"]), "--labels", str(corpus["dev"].with_suffix(".labels")), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == metrics["accuracy"]
    assert any(p.suffix == ".png" for p in out.iterdir())  # the confusion matrix of a head with classes


def test_balanced_order_draws_every_class_equally_often():
    labels = ["a"] * 90 + ["b"] * 9 + ["c"] * 1
    order = balanced_order(labels, seed=1, epoch=0)
    assert len(order) == 100 and order == balanced_order(labels, seed=1, epoch=0) != balanced_order(labels, 1, 1)
    many = labels * 30
    counts = Counter(many[i] for i in balanced_order(many, seed=2, epoch=0))
    assert all(abs(n / 3000 - 1 / 3) < 0.04 for n in counts.values())


def test_crop_is_a_window_of_the_utterance_drawn_from_seed_epoch_and_row():
    wav = np.arange(100, dtype=np.float32)
    crop = Crop(30, seed=0, epoch=2)
    window = crop(wav, row=5)
    assert len(window) == 30 and np.array_equal(window, np.arange(window[0], window[0] + 30))
    assert np.array_equal(crop(wav, 5), window)
    assert len({int(Crop(30, 0, e)(wav, 5)[0]) for e in range(20)}) > 5
    assert np.array_equal(crop(wav[:20], 5), wav[:20])  # a short one stays whole


def test_training_with_crops_and_balanced_sampling_resumes_identically(corpus, tmp_path):
    data = {"train_manifest": str(corpus["train"]), "dev_manifest": str(corpus["dev"]), "crop_seconds": 0.1,
            "class_balanced": True}
    seen: list[int] = []
    real = read_batches

    def spy(split, groups, num_workers=0, crop=None):
        for batch in real(split, groups, num_workers, crop):
            seen.extend(len(w) for w in batch.wavs)
            yield batch

    import speechprompt.superb.train as superb_train

    superb_train.read_batches = spy
    try:
        train_superb(_config(corpus, tmp_path / "a", data=data, max_steps=4, eval_every=2))
    finally:
        superb_train.read_batches = real
    assert seen and max(seen) == 1600  # 0.1 s windows of 0.15-0.3 s clips
    train_superb(_config(corpus, tmp_path / "b", data=data, max_steps=2, eval_every=2))
    train_superb(_config(corpus, tmp_path / "b", data=data, max_steps=4, eval_every=2))
    a, b = (torch.load(tmp_path / r / "train_state.pt", weights_only=True)["trainable"] for r in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
