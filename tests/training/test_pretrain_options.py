"""PretrainOptions: the keys both pretraining trainers share, after each trainer's own, with each trainer's defaults."""

from __future__ import annotations

import dataclasses

import pytest

from speechprompt.config import ConfigError, describe, from_dict, option
from speechprompt.training.config import PretrainOptions, RunOptions

SHARED = ["max_steps", "lr", "warmup_steps", "schedule", "lr_decay_steps", "min_lr_ratio", "betas", "adam_eps",
          "weight_decay", "clip_norm", "eval_every", "save_every", "num_workers"]


@dataclasses.dataclass(kw_only=True)
class _Trainer(PretrainOptions, max_steps=50, lr=2e-4, eval_every=option(5, help="evaluate every 5")):
    data: str = option("x", help="what it trains on")
    seed: int = option(7, help="a trainer's own seed")


def _help(cls: type, key: str) -> str:
    return next(f.metadata["help"] for f in dataclasses.fields(cls) if f.name == key)


def test_a_trainer_lists_its_own_keys_then_the_shared_ones_with_its_defaults() -> None:
    names = [f.name for f in dataclasses.fields(_Trainer)]
    run = [f.name for f in dataclasses.fields(RunOptions)]
    assert names == run + ["data"] + SHARED  # seed, redeclared, keeps its place among RunOptions' keys
    cfg = _Trainer()
    assert (cfg.max_steps, cfg.lr, cfg.eval_every, cfg.seed) == (50, 2e-4, 5, 7)
    assert (cfg.warmup_steps, cfg.schedule, cfg.betas) == (200, "inverse_sqrt", (0.9, 0.98))  # not named: shared
    assert _help(_Trainer, "max_steps") == "number of updates to train for"  # a value keeps the shared help
    assert _help(_Trainer, "eval_every") == "evaluate every 5"  # an option replaces it
    assert "  max_steps (int, default 50): number of updates to train for" in describe(_Trainer).splitlines()


def test_the_shared_keys_are_checked_and_read_as_one_optimizer_config() -> None:
    cfg = from_dict(_Trainer, {"betas": [0.9, 0.95], "lr_decay_steps": 10, "schedule": "cosine"})
    assert cfg.betas == (0.9, 0.95)
    optim = cfg.optim()
    assert (optim.lr, optim.betas, optim.decay_steps, optim.schedule) == (2e-4, [0.9, 0.95], 10, "cosine")
    with pytest.raises(ConfigError, match="save_every must be positive, got 0"):
        from_dict(_Trainer, {"save_every": 0})
    with pytest.raises(ConfigError, match="num_workers must be >= 0, got -1"):
        from_dict(_Trainer, {"num_workers": -1})
    with pytest.raises(ConfigError, match="schedule"):
        from_dict(_Trainer, {"schedule": "sawtooth"})


def test_a_subclass_of_a_trainer_config_keeps_the_trainers_defaults() -> None:
    @dataclasses.dataclass(kw_only=True)
    class Variant(_Trainer):
        extra: int = option(1, help="one more key")

    assert (Variant().max_steps, Variant().eval_every) == (50, 5)
    assert [f.name for f in dataclasses.fields(Variant)][-1] == "extra"


def test_misdeclared_shared_keys_fail_when_the_class_is_defined() -> None:
    with pytest.raises(TypeError, match="not keys of PretrainOptions"):
        class Typo(PretrainOptions, max_step=10):
            pass
    with pytest.raises(TypeError, match="declares lr"):
        class Redeclared(PretrainOptions):
            lr: float = option(1.0, help="peak learning rate")
