"""The `speechprompt` command: every subcommand has --help, and bad arguments exit with code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from speechprompt.cli import COMMANDS, main


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_subcommand_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: speechprompt" in capsys.readouterr().out


def test_unknown_command_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "speechprompt.cli", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
