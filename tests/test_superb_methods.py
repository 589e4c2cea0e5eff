"""The new methods inside SUPERB: S3-Router masks with the CTC head (the head always trains, the masks train their
scores, the frozen upstream gets no gradient), and a trained mask or CNN-adapter checkpoint reloads to the same
model."""

from __future__ import annotations

import pytest
import torch

from speechprompt.audio import load_audio
from speechprompt.config import from_dict
from speechprompt.superb import SuperbConfig, build_superb, fit_superb, load_audio_split, load_superb

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tones(tmp_path_factory, make_tone_corpus, one_thread):
    return make_tone_corpus(tmp_path_factory.mktemp("tones"), train=3, dev=2, ctc_train=3, ctc_dev=2)


def test_masks_with_the_ctc_head_train_the_head_and_the_scores_only(tones):
    split = load_audio_split(tones["ctc_train"])
    model, _ = build_superb(tones["upstream"], "mask", "ctc", split.labels)
    params = model.trainable_parameters()
    head = list(model.head.parameters())
    assert all(any(p is q for q in params) for p in head)  # the CTC projection trains with the masks
    wav, pad = model.prepare([load_audio(path) for path in split.paths[:4]])
    output, frame_mask = model(wav, pad)
    loss, _ = model.head.loss(output, frame_mask, split.labels[:4])
    loss.backward()
    assert model.head.proj.weight.grad.abs().sum() > 0
    assert all(r.scores.grad is not None and r.scores.grad.abs().sum() > 0 for r in model.method.routers().values())
    assert all(p.grad is None for p in model.upstream.parameters() if not any(p is q for q in params))


@pytest.mark.parametrize("method,head,options", [("mask", "ctc", {"keep_ratio": 0.8}),
                                                 ("cnn_adapter", "classification", {"bottleneck": 4})])
def test_a_trained_checkpoint_reloads_to_the_same_model(tones, tmp_path, method, head, options):
    train = tones["ctc_train" if head == "ctc" else "train"]
    cfg = from_dict(SuperbConfig, {
        "data": {"train_manifest": str(train)}, "upstream": str(tones["upstream"]), "head": head,
        "run_dir": str(tmp_path / "run"), "device": "cpu", "method": {"name": method, "options": options},
        "batch_size": 3, "max_steps": 2, "optim": {"lr": 1e-1},
    })
    trained, _ = fit_superb(cfg)
    reloaded = load_superb(tmp_path / "run" / "best.safetensors")
    split = load_audio_split(train)
    wav, pad = reloaded.prepare([load_audio(path) for path in split.paths[:3]])
    trained.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(wav, pad)[0], trained(wav, pad)[0], rtol=0, atol=1e-6)
