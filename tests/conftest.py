"""Fixtures that several test modules share: one torch thread, a tiny untrained unit LM saved to disk, a tiny random
HuBERT and a two-tone audio corpus (the SUPERB tests), and two SUPERB checkpoints trained on them; and the hooks that
enforce how tests use the reference oracles (tests/oracle.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

# The oracle rules of tests/oracle.py: these hooks fail collection for a test that uses an oracle's fixtures unmarked,
# or for a test module that imports a reference library, and tell run_oracle which test and fixture are running.
from oracle import pytest_collection_modifyitems, pytest_fixture_setup, pytest_runtest_protocol  # noqa: F401

from speechprompt.config import from_dict, to_dict
from speechprompt.devices import torch_threads
from speechprompt.dictionary import Dictionary
from speechprompt.fairseq_compat import save_fairseq_checkpoint
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.unit_lm import UnitLM, UnitLMConfig, save_unit_lm

SR = 16000
TONES = {"low": 200.0, "high": 4000.0}  # the two classes of the tone corpus, in Hz


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



def _save_tiny_hubert(path: Path, seed: int) -> Path:
    """The "tiny" HuBERT, random after ``torch.manual_seed(seed)``, saved as a fairseq checkpoint (normalised 16 kHz
    input)."""
    torch.manual_seed(seed)
    model = HubertModel(HubertConfig.tiny())
    cfg = {"model": {"_name": "hubert", **to_dict(model.cfg)}, "task": {"normalize": True, "sample_rate": SR}}
    save_fairseq_checkpoint(path, model.state_dict(), cfg)
    return path


def _write_tone_split(root: Path, name: str, per_class: int, rng: np.random.Generator, text: dict[str, str],
                      samples: int | None = None) -> Path:
    """``per_class`` clips of each of :data:`TONES` (random phase, amplitude, length 0.15-0.3 s, light noise) under
    ``root/name/``, with ``root/name.tsv`` and ``root/name.labels`` (``text[class]`` per clip)."""
    rows, labels = [], []
    for i in range(per_class):
        for label, freq in TONES.items():
            n = int(rng.integers(2400, 4800)) if samples is None else samples
            t = np.arange(n) / SR
            wav = rng.uniform(0.2, 0.8) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
            wav = (wav + 0.02 * rng.standard_normal(n)).astype(np.float32)
            rel = f"{name}/{label}_{i}.wav"
            (root / name).mkdir(exist_ok=True)
            sf.write(root / rel, wav, SR)
            rows.append(f"{rel}\t{n}")
            labels.append(text[label])
    (root / f"{name}.tsv").write_text(f"{root}\n" + "".join(r + "\n" for r in rows))
    (root / f"{name}.labels").write_text("".join(label + "\n" for label in labels))
    return root / f"{name}.tsv"


@pytest.fixture(scope="session")
def make_tone_corpus() -> Callable[..., dict[str, Path]]:
    """``make_tone_corpus(root, train, dev, ctc_train, ctc_dev)``: what the SUPERB tests train on, under ``root``.

    Two tiny random HuBERTs saved as fairseq checkpoints (``upstream``, and ``other_upstream``: another
    fingerprint), and manifests of tone clips, the given number per class: ``train``/``dev`` labelled ``low`` and
    ``high``, ``ctc_train``/``ctc_dev`` transcribed ``lo`` and ``hi``. Even a random 2-layer HuBERT separates the
    two tones after mean pooling. ``samples`` fixes every clip's length (a batch then has no padding, whose amount
    changes HuBERT's outputs, as in fairseq); by default clips are 0.15-0.3 s.
    """

    def make(root: Path, train: int, dev: int, ctc_train: int, ctc_dev: int,
             samples: int | None = None) -> dict[str, Path]:
        rng = np.random.default_rng(0)
        classes, chars = {"low": "low", "high": "high"}, {"low": "lo", "high": "hi"}
        return {
            "upstream": _save_tiny_hubert(root / "hubert.pt", 0),
            "other_upstream": _save_tiny_hubert(root / "other.pt", 1),
            "train": _write_tone_split(root, "train", train, rng, classes, samples),
            "dev": _write_tone_split(root, "dev", dev, rng, classes, samples),
            "ctc_train": _write_tone_split(root, "ctc_train", ctc_train, rng, chars),
            "ctc_dev": _write_tone_split(root, "ctc_dev", ctc_dev, rng, chars),
        }

    return make


@pytest.fixture(scope="session")
def superb_runs(tmp_path_factory, make_tone_corpus) -> dict[str, Path]:
    """:func:`make_tone_corpus` and two SUPERB checkpoints trained on it a few steps: ``classification`` (an adapter
    inside HuBERT: method tensors to reload) and ``ctc``. Built once for the session (``infer`` and ``evaluate``
    tests read them; nothing writes to them)."""
    from speechprompt.superb import SuperbConfig, train_superb

    root = tmp_path_factory.mktemp("superb_runs")
    out = make_tone_corpus(root, train=4, dev=3, ctc_train=3, ctc_dev=2)
    runs = {"classification": ("train", "adapter", {"bottleneck": 2}), "ctc": ("ctc_train", "linear_probe", {})}
    with torch_threads(1):
        for head, (train, method, options) in runs.items():
            train_superb(from_dict(SuperbConfig, {
                "data": {"train_manifest": str(out[train])}, "upstream": str(out["upstream"]), "head": head,
                "run_dir": str(root / head), "device": "cpu", "method": {"name": method, "options": options},
                "batch_size": 4, "max_steps": 3, "optim": {"lr": 1e-1},
            }))
            out[head] = root / head / "best.safetensors"
    return out


# --------------------------------------------------------------------------------------------------------------
# Trainers run as users run them: the CLI in a fresh process, killed with SIGKILL in the middle of an update.

REPO = Path(__file__).resolve().parents[1]

_KILLER = """
import os, signal, sys
import torch
from speechprompt.cli import main

target, updates = int(sys.argv[1]), [0]
for cls in (torch.optim.Adam, torch.optim.AdamW):
    def step(self, *args, _real=cls.step, **kwargs):
        updates[0] += 1
        if updates[0] == target:  # inside update `target`, before its optimizer step: as a kill -9 would land
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(self, *args, **kwargs)
    cls.step = step
sys.exit(main(sys.argv[2:]))
"""


def _run_cli(argv: list[str], kill_at_update: int | None = None, torchrun: int = 0) -> subprocess.CompletedProcess:
    """``speechprompt ARGV`` in a fresh process (one torch thread); ``kill_at_update``: SIGKILL it inside that
    update (counted in this process, from 1); ``torchrun``: run it as that many gloo processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at_update is not None:
        cmd = [sys.executable, "-c", _KILLER, str(kill_at_update), *argv]
    elif torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun),
               "-m", "speechprompt.cli", *argv]
    else:
        cmd = [sys.executable, "-m", "speechprompt.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(argv, kill_at_update=None, torchrun=0)``: see :func:`_run_cli`."""
    return _run_cli
