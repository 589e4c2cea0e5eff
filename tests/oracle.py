"""Run a reference implementation (fairseq) in its own virtual environment, as an oracle for parity tests.

fairseq needs numpy<2, and the toolkit's users run numpy 2, so fairseq never shares a process with the toolkit under
test. An oracle is a standalone script under ``tests/oracles/<name>/``: it imports only its reference library (never
``speechprompt``), builds or loads what the test asks for, and writes files: checkpoints in the library's own
format and reference outputs as plain tensors (``torch.save`` of tensors, dicts and lists, which the test reads back
with ``torch.load(weights_only=True)``). The test then loads those files with the toolkit and compares.

Each oracle script is called as ``python tests/oracles/<name>/<script>.py OUT_DIR JSON_PARAMS`` by
:func:`run_oracle`, with the interpreter of the oracle's environment:

==========  =====================================  ==============================================================
oracle      environment variable                    default interpreter
==========  =====================================  ==============================================================
fairseq     ``SPEECHPROMPT_FAIRSEQ_PYTHON``         ``<repo>/.venv-fairseq/bin/python`` (``make oracle-env``)
==========  =====================================  ==============================================================

A missing environment fails the test with the command that builds it: a parity test never skips silently.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
ORACLES = REPO / "tests" / "oracles"
_ENV_VARS = {"fairseq": "SPEECHPROMPT_FAIRSEQ_PYTHON"}


def oracle_python(oracle: str) -> Path:
    """The interpreter of ``oracle``'s environment (see the module docstring)."""
    override = os.environ.get(_ENV_VARS[oracle])
    return Path(override) if override else REPO / f".venv-{oracle}" / "bin" / "python"


def run_oracle(oracle: str, script: str, out_dir: str | os.PathLike, timeout: float = 600, **params: Any) -> Path:
    """Run ``tests/oracles/<oracle>/<script>.py OUT_DIR JSON(params)`` in the oracle's environment.

    Returns:
        ``out_dir`` (created), where the script wrote its files.

    Fails the calling test (``pytest.fail``) when the environment is missing or the script fails, with the
    script's stderr.
    """
    python = oracle_python(oracle)
    if not python.is_file():
        pytest.fail(f"the {oracle} oracle environment is missing ({python}); build it with `make oracle-env`, or "
                    f"point {_ENV_VARS[oracle]} at a python that has {oracle}", pytrace=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = ORACLES / oracle / f"{script}.py"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(python), str(path), str(out), json.dumps(params)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)
    if proc.returncode != 0:
        pytest.fail(f"oracle {oracle}/{script} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}",
                    pytrace=False)
    return out
