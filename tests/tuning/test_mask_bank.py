"""The S3-Router mask bank: one backbone, a packed mask per task; a selected task is exactly that task's model, and a
batch of mixed tasks gets each row its own task's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_encoders import our_tiny, waveforms

from speechprompt.checkpoint import base_fingerprint, base_record, save_checkpoint
from speechprompt.config import to_dict
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig
from speechprompt.tuning import MaskConfig, TuningError, build_method
from speechprompt.tuning.base import LinearName
from speechprompt.tuning.mask import ScoreInit
from speechprompt.tuning.mask_bank import MaskBank

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = MaskConfig(keep_ratio=0.6, init=ScoreInit.KAIMING)


def _masks(model: torch.nn.Module, seed: int, config: MaskConfig = CONFIG) -> dict[str, torch.Tensor]:
    """A task's packed masks: random scores (kaiming) stand in for trained ones, each seed another task."""
    torch.manual_seed(seed)
    method = build_method(config, model)
    exported = method.export_state_dict()
    method.detach()
    return exported


def _alone(encoder: str, packed: dict[str, torch.Tensor], x, pad) -> torch.Tensor:
    """The task's model as its checkpoint loads it by itself: a fresh backbone, one router, the bitmask."""
    model = our_tiny(encoder)
    method = build_method(CONFIG, model)
    method.load_exported_state_dict(packed)
    with torch.no_grad():
        return model.extract_features(x, pad)


@pytest.mark.parametrize("encoder", ["hubert", "ast"])
def test_switching_gives_each_task_alone_bit_for_bit(encoder):
    model = our_tiny(encoder)
    x, pad = waveforms(batch=3, samples=1600)
    with torch.no_grad():
        frozen = model.extract_features(x, pad)
    tasks = {name: _masks(model, seed) for seed, name in enumerate(["ks", "er", "sid"])}
    bank = MaskBank(model)
    for name, packed in tasks.items():
        bank.add(name, packed)
    assert bank.tasks == ["ks", "er", "sid"] and bank.active == "ks"
    alone = {name: _alone(encoder, packed, x, pad) for name, packed in tasks.items()}
    assert not torch.equal(alone["ks"], alone["er"])
    with torch.no_grad():
        for name in ["sid", "ks", "er", "ks"]:
            bank.select(name)
            assert torch.equal(model.extract_features(x, pad), alone[name]), name
        with bank.use(None):
            assert torch.equal(model.extract_features(x, pad), frozen)
        assert bank.active == "ks"
    bank.close()
    with torch.no_grad():
        assert torch.equal(model.extract_features(x, pad), frozen)


def test_a_mixed_batch_is_routed_per_group_in_row_order():
    model = our_tiny("wav2vec2")
    tasks = {"a": _masks(model, 1), "b": _masks(model, 2)}
    bank = MaskBank(model)
    for name, packed in tasks.items():
        bank.add(name, packed)
    bank.select("b")
    x, pad = waveforms(batch=5, samples=1600)
    rows_of = ["a", "b", "a", "a", "b"]
    calls = []

    def run(rows: torch.Tensor) -> torch.Tensor:
        calls.append((bank.active, rows.tolist()))
        return model.extract_features(x[rows], pad[rows])

    with torch.no_grad():
        out = bank.routed(rows_of, run)
    assert calls == [("a", [0, 2, 3]), ("b", [1, 4])]  # one forward per task present, not per row
    assert bank.active == "b"  # restored
    for name, rows in (("a", [0, 2, 3]), ("b", [1, 4])):
        group = _alone("wav2vec2", tasks[name], x[rows], pad[rows])
        assert torch.equal(out[rows], group)  # each group is exactly its task's model on those rows
        whole = _alone("wav2vec2", tasks[name], x, pad)  # ... and each row what the task gives the whole batch
        torch.testing.assert_close(out[rows], whole[rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(TuningError, match=r"unknown task\(s\) \['c'\]"):
        bank.routed(["a", "c"], run)


def _save_task(tmp_path: Path, name: str, model: torch.nn.Module, packed, config: MaskConfig = CONFIG,
               method: str = "mask", fingerprint: str | None = None) -> Path:
    meta = {"task": {"type": "test", "labels": []}, "method": {"name": method, "config": to_dict(config)},
            "base": base_record(tmp_path / "base.pt", fingerprint or base_fingerprint(model))}
    return save_checkpoint(tmp_path / name, packed, None, meta)


def _lm() -> UnitLM:
    torch.manual_seed(0)
    return UnitLM(UnitLMConfig.named("tiny")).eval()


def test_tasks_from_checkpoints_are_checked_against_the_backbone(tmp_path):
    lm = _lm()
    tokens = torch.randint(4, 104, (2, 7), generator=torch.Generator().manual_seed(0))
    config = MaskConfig(keep_ratio=0.7, init=ScoreInit.KAIMING, ffn_only=True)
    en, fr = _masks(lm, 1, config), _masks(lm, 2, config)
    bank = MaskBank(lm)
    assert bank.add_checkpoint(_save_task(tmp_path, "en", lm, en, config)) == "en"
    bank.add_checkpoint(_save_task(tmp_path, "fr_best", lm, fr, config), name="fr")
    alone_model = _lm()
    build_method(config, alone_model).load_exported_state_dict(fr)
    with torch.no_grad():
        bank.select("fr")
        assert torch.equal(lm(tokens), alone_model(tokens))

    with pytest.raises(Exception, match="trained on another base model"):
        bank.add_checkpoint(_save_task(tmp_path, "other", lm, fr, config, fingerprint="sha256:0"), name="x")
    with pytest.raises(TuningError, match="a 'lora' checkpoint, not S3-Router masks"):
        bank.add_checkpoint(_save_task(tmp_path, "lora", lm, fr, config, method="lora"), name="y")
    all_linears = MaskConfig(keep_ratio=0.7, init=ScoreInit.KAIMING, targets=[LinearName.FC1])
    with pytest.raises(TuningError, match="one set of linears"):
        bank.add_checkpoint(_save_task(tmp_path, "fc1", lm, _masks(_lm(), 3, all_linears), all_linears), name="z")
    with pytest.raises(TuningError, match="already in the mask bank"):
        bank.add("en", en)
    assert bank.tasks == ["en", "fr"]


def test_a_bad_first_mask_leaves_the_backbone_untouched():
    model = our_tiny("hubert")
    keys = set(model.state_dict())
    packed = _masks(model, 0)
    key = next(iter(packed))
    bank = MaskBank(model)
    with pytest.raises(TuningError, match="packed bytes"):
        bank.add("bad", {**packed, key: packed[key][:-1]})
    assert set(model.state_dict()) == keys and bank.tasks == []
    with pytest.raises(TuningError, match="empty"):
        bank.select("bad")
