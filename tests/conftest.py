"""Fixtures that several test modules share: one torch thread, and a tiny untrained unit LM saved to disk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from speechprompt.devices import torch_threads
from speechprompt.fairseq_compat import Dictionary
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig, save_unit_lm


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch intra-op thread for a whole test module, its module-scoped fixtures included.

    Two CPU cores are shared by the whole suite, and one thread is also several times faster for models this small.
    A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``; a module-scoped fixture that
    trains names it as an argument, so that it is set up first.
    """
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def save_tiny_unit_lm() -> Callable[..., Path]:
    """``save_tiny_unit_lm(path, n_units, max_positions=64, seed=0)``: the "tiny" unit LM over ``n_units`` units,
    built after ``torch.manual_seed(seed)`` and untrained, saved as a fairseq checkpoint with its dict.txt beside it.
    Returns ``path``."""

    def save(path: Path, n_units: int, max_positions: int = 64, seed: int = 0) -> Path:
        torch.manual_seed(seed)
        config = UnitLMConfig.named("tiny", vocab_size=n_units + 4, max_positions=max_positions)  # + 4 specials
        save_unit_lm(UnitLM(config).eval(), Dictionary.for_units(n_units), path)
        return path

    return save

