"""Strict dataclass configs: YAML + overrides, unknown keys and wrong types are errors."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

import pytest

from speechprompt.config import ConfigError, describe, first_difference, load_config, option, save_config, to_dict


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclasses.dataclass
class Inner:
    lr: float = option(1e-3, help="learning rate")
    betas: tuple[float, float] = option((0.9, 0.98), help="Adam betas")


@dataclasses.dataclass
class Outer:
    name: str = option("run", help="run name")
    steps: int = option(10, help="number of steps")
    mode: Mode = option(Mode.FAST, help="speed")
    tags: list[str] = option([], help="free tags")
    path: str | None = option(None, help="optional path")
    optim: Inner = option(Inner(), help="optimizer")

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError("steps must be positive")


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("# speechprompt train --config c.yaml\nsteps: 5\noptim:\n  lr: 1e-2\n")
    cfg = load_config(Outer, path, ["mode=slow", "optim.betas=[0.8, 0.9]", "tags=[a, b]", "path=x.pt"])
    assert cfg.steps == 5 and cfg.mode is Mode.SLOW and cfg.optim.lr == 0.01
    assert cfg.optim.betas == (0.8, 0.9) and cfg.tags == ["a", "b"] and cfg.path == "x.pt"
    # Mutable defaults are not shared between instances.
    assert Outer().tags is not Outer().tags


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], "unknown config key stepz"),
        (["optim.lrr=3"], "unknown config key optim.lrr"),
        (["steps=3.5"], "steps: expected an integer"),
        (["steps=0"], "steps must be positive"),
        (["mode=medium"], "not one of"),
        (["optim.lr=abc"], "expected a number"),
        (["novalue"], "key=value"),
    ],
)
def test_bad_configs_are_clear_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_save_round_trip_and_describe(tmp_path: Path) -> None:
    cfg = load_config(Outer, None, ["mode=slow", "optim.lr=0.5"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(Outer, tmp_path / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    text = describe(Outer)
    assert "optim.lr (float, default 0.001): learning rate" in text
    assert "mode (Mode, default 'fast')" in text


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, bad)


def test_first_difference_names_the_nested_key_and_ignores_only_top_level_keys():
    saved = {"seed": 1, "optim": {"lr": 0.1, "betas": [0.9, 0.98]}, "threads": 1}
    assert first_difference(saved, dict(saved)) is None
    assert first_difference(saved, {**saved, "optim": {"lr": 0.2, "betas": [0.9, 0.98]}}) == ("optim.lr", 0.1, 0.2)
    assert first_difference(saved, {**saved, "threads": 2}, {"threads"}) is None
    assert first_difference(saved, {**saved, "threads": 2}) == ("threads", 1, 2)
    # "lr" is ignored only at the top level, not inside optim
    assert first_difference(saved, {**saved, "optim": {"lr": 0.2, "betas": [0.9, 0.98]}}, {"lr"})[0] == "optim.lr"
    assert first_difference(saved, {**saved, "new_key": 3}) == ("new_key", None, 3)
