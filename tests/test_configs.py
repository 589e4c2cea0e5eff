"""Every YAML config shipped under recipes/ loads and validates, and its first comment line is the command that
runs it (torchtune's test_configs)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from speechprompt import config as C

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "recipes").rglob("*.yaml"))


def config_class(command: str) -> type:
    """The config dataclass of a ``speechprompt`` subcommand that takes ``--config``."""
    from speechprompt.compare import CompareConfig
    from speechprompt.pretrain import PretrainConfig
    from speechprompt.pretrain_hubert import PretrainHubertConfig
    from speechprompt.superb import SuperbConfig
    from speechprompt.train import TrainConfig

    classes = {"train": TrainConfig, "pretrain-ulm": PretrainConfig, "compare": CompareConfig, "superb": SuperbConfig,
               "pretrain-hubert": PretrainHubertConfig}
    assert command in classes, f"no config class known for `speechprompt {command}`: add it to this test"
    return classes[command]


def test_recipes_ship_configs():
    assert any("synthetic_commands" in str(p) for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_loads_and_first_line_runs_it(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# speechprompt "), f"{path}: the first line must be the command that runs it"
    words = shlex.split(first[2:])
    command = words[1]
    assert words[words.index("--config") + 1] == str(path.relative_to(ROOT)), "the command must name this file"
    overrides = [w for w in words[words.index("--config") + 2:] if "=" in w]
    cfg = C.load_config(config_class(command), path, overrides)
    # The saved form reads back to the same config (what a run directory's config.yaml holds).
    assert C.from_dict(type(cfg), C.to_dict(cfg)) == cfg


def test_unknown_keys_in_a_recipe_config_are_errors(tmp_path):
    from speechprompt.train import TrainConfig

    source = ROOT / "recipes" / "synthetic_commands" / "conf" / "deep_prompt.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(source.read_text().replace("max_epochs:", "max_epoch:"))
    with pytest.raises(C.ConfigError, match="max_epoch"):
        C.load_config(TrainConfig, bad)
    bad.write_text(source.read_text().replace("length: 20", "length: twenty"))
    with pytest.raises(C.ConfigError, match="length"):
        C.load_config(TrainConfig, bad)
