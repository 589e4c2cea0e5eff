"""Run a reference implementation (fairseq) in its own virtual environment, as an oracle for parity tests.

fairseq needs numpy<2, and the toolkit's users run numpy 2, so fairseq never shares a process with the toolkit under
test. An oracle is a standalone script under ``tests/oracles/<name>/``: it imports only its reference library (never
``speechprompt``), builds or loads what the test asks for, and writes files: checkpoints in the library's own
format and reference outputs as plain tensors (``torch.save`` of tensors, dicts and lists, which the test reads back
with ``torch.load(weights_only=True)``). The test then loads those files with the toolkit and compares.

Each oracle script is run as ``python tests/oracles/<name>/<script>.py OUT_DIR JSON_PARAMS`` by :func:`run_oracle`,
with the interpreter of the oracle's environment; to pay fairseq's import (seconds) once per session rather than once
per call, the command runs in a fork of a server that has imported the library (tests/oracles/serve.py), which
gives the same result. A failing script's message says how to run it by hand.

==========  =====================================  ==============================================================
oracle      environment variable                    default interpreter
==========  =====================================  ==============================================================
fairseq     ``SPEECHPROMPT_FAIRSEQ_PYTHON``         ``<repo>/.venv-fairseq/bin/python`` (``make oracle-env``)
==========  =====================================  ==============================================================

A missing environment fails the test with the command that builds it: a parity test never skips silently.

The rules, enforced by the pytest hooks below (``tests/conftest.py`` imports them) and by :func:`run_oracle`, so that
``-m "not fairseq"`` deselects exactly the tests that need the oracle and no test uses it unmarked by accident:

1. A test that uses an oracle carries its marker, ``@pytest.mark.fairseq``.
2. A fixture that calls :func:`run_oracle` is named after the oracle, ``fairseq_*`` (``fairseq_hubert``,
   ``fairseq_scores``...), and the prefix is kept for such fixtures. Collection fails for a test that has a
   ``fairseq_*`` fixture anywhere in its fixture closure (directly, or through fixtures built on it) and lacks the
   marker.
3. :func:`run_oracle` fails unless the test being set up or run carries the marker and, when it is called while a
   fixture is set up, unless that fixture is a ``fairseq_*`` one. A call hidden in a helper, in a fixture of
   another name or at import time fails the first time it runs.
4. No test module imports the reference library (a line ``import fairseq`` or ``from fairseq ...`` fails
   collection): it runs only in its own environment.

Oracle work is batched per test module: a module-scoped ``fairseq_*`` fixture asks one script for everything the
module compares against, so that fairseq is imported once per module, not once per test.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
ORACLES = REPO / "tests" / "oracles"
_ENV_VARS = {"fairseq": "SPEECHPROMPT_FAIRSEQ_PYTHON"}
_PRELOAD = {"fairseq": ("torch", "numpy", "omegaconf", "fairseq")}  # what the oracle's server imports once
NAMES = tuple(_ENV_VARS)  # each name is also the oracle's marker, and ``<name>_`` the prefix of its fixtures
_IMPORTS = {name: re.compile(rf"^[ \t]*(?:import|from)[ \t]+{name}\b", re.MULTILINE) for name in NAMES}


# ---------------------------------------------------------------------------------------------------------------
# pytest hooks (rules 2 to 4)


class _Running:
    """What pytest is doing now, kept up to date by the hooks below: the test item being set up, run or torn down
    (None outside one) and the stack of fixtures being set up (innermost last)."""

    def __init__(self) -> None:
        self.item: pytest.Item | None = None
        self.fixtures: list[str] = []


RUNNING = _Running()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Rules 2 and 4: fail collection, listing every offending test and module."""
    problems, modules = [], set()
    for item in items:
        path = Path(item.path)
        if path.suffix == ".py" and path not in modules:
            modules.add(path)
            source = path.read_text()
            problems += [f"{path}: imports {name}, which runs only in its oracle environment (tests/oracle.py)"
                         for name, pattern in _IMPORTS.items() if pattern.search(source)]
        for name in NAMES:
            used = sorted(f for f in item.fixturenames if f.startswith(f"{name}_"))
            if used and item.get_closest_marker(name) is None:
                problems.append(f"{item.nodeid}: uses {', '.join(used)} but is not marked @pytest.mark.{name}")
    if problems:
        raise pytest.UsageError("tests that break the oracle rules of tests/oracle.py:\n  " + "\n  ".join(problems))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """Rule 3: which test is being set up, run or torn down."""
    RUNNING.item = item
    try:
        return (yield)
    finally:
        RUNNING.item = None


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    """Rule 3: which fixture is being set up."""
    RUNNING.fixtures.append(fixturedef.argname)
    try:
        return (yield)
    finally:
        RUNNING.fixtures.pop()


# ---------------------------------------------------------------------------------------------------------------
# Running an oracle


def _check_caller(oracle: str) -> None:
    """Rule 3 of the module docstring: fail unless the running test is marked, and the fixture being set up (if
    any) has the oracle's prefix."""
    item = RUNNING.item
    if item is None:
        pytest.fail(f"run_oracle({oracle!r}) called outside a test (at import or collection time?); call it from a "
                    f"{oracle}_* fixture or a test marked @pytest.mark.{oracle}", pytrace=False)
    if item.get_closest_marker(oracle) is None:
        pytest.fail(f"{item.nodeid} runs the {oracle} oracle but is not marked @pytest.mark.{oracle} (see "
                    "tests/oracle.py)", pytrace=False)
    if RUNNING.fixtures and not RUNNING.fixtures[-1].startswith(f"{oracle}_"):
        pytest.fail(f"fixture {RUNNING.fixtures[-1]!r} runs the {oracle} oracle; name it {oracle}_... so that every "
                    f"test using it must be marked @pytest.mark.{oracle} (see tests/oracle.py)", pytrace=False)


def oracle_python(oracle: str) -> Path:
    """The interpreter of ``oracle``'s environment (see the module docstring)."""
    override = os.environ.get(_ENV_VARS[oracle])
    return Path(override) if override else REPO / f".venv-{oracle}" / "bin" / "python"


def require_oracle_python(oracle: str) -> Path:
    """:func:`oracle_python`, or fail the calling test (``pytest.fail``) with how to build it when it is missing."""
    python = oracle_python(oracle)
    if not python.is_file():
        pytest.fail(f"the {oracle} oracle environment is missing ({python}); build it with `make oracle-env`, or "
                    f"point {_ENV_VARS[oracle]} at a python that has {oracle}", pytrace=False)
    return python


class _Server:
    """tests/oracles/serve.py in an oracle's environment: the library imported once, each script run in a fork."""

    def __init__(self, python: Path, preload: tuple[str, ...]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="oracle-server-", suffix=".log", delete=False)  # noqa: SIM115
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # no thread pool may exist when it forks
        self.proc = subprocess.Popen([str(python), str(ORACLES / "serve.py"), *preload], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=REPO, env=env,
                                     start_new_session=True)

    def run(self, argv: list[str], log: str, timeout: float) -> int | None:
        """The script's exit status; None if it ran past ``timeout`` or the server died (it is then stopped)."""
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline() if ready else ""
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.stop(kill=True)
            return None
        return json.loads(line)["returncode"]

    def server_log(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-4000:]

    def stop(self, kill: bool = False) -> None:
        """End the server: at the end of its input, or (``kill``, or after 10 s) with the script it runs."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=0 if kill else 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and the script it runs
                self.proc.wait()
        self.log.close()


_SERVERS: dict[Path, _Server] = {}


@atexit.register
def _stop_servers() -> None:
    for server in _SERVERS.values():
        server.stop()
        Path(server.log.name).unlink(missing_ok=True)
    _SERVERS.clear()


def run_oracle(oracle: str, script: str, out_dir: str | os.PathLike, timeout: float = 600, **params: Any) -> Path:
    """Run ``tests/oracles/<oracle>/<script>.py OUT_DIR JSON(params)`` in the oracle's environment.

    The script runs as that command would, in a fork of a server process that imported the oracle's library once
    for the session (tests/oracles/serve.py); a failure message gives the command to run it by hand.

    Returns:
        ``out_dir`` (created), where the script wrote its files.

    Fails the calling test (``pytest.fail``) when the environment is missing, when the script fails (with its
    output), or when the caller breaks the marking rules of the module docstring.
    """
    _check_caller(oracle)
    python = require_oracle_python(oracle)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    argv = [str(ORACLES / oracle / f"{script}.py"), str(out), json.dumps(params)]
    server = _SERVERS.get(python)
    if server is None or server.proc.poll() is not None:
        server = _SERVERS[python] = _Server(python, _PRELOAD[oracle])
    fd, log = tempfile.mkstemp(prefix=f"oracle-{oracle}-{script}-", suffix=".log")
    os.close(fd)
    try:
        returncode = server.run(argv, log, timeout)
        output = Path(log).read_text(errors="replace")[-4000:]
    finally:
        Path(log).unlink(missing_ok=True)
    by_hand = f"run it by hand: cd {REPO} && {shlex.join([str(python), *argv])}"
    if returncode is None:
        del _SERVERS[python]
        server_log = server.server_log()
        Path(server.log.name).unlink(missing_ok=True)
        pytest.fail(f"oracle {oracle}/{script} ran past {timeout} s, or its server died; {by_hand}\n{output}\n"
                    f"server log:\n{server_log}", pytrace=False)
    if returncode != 0:
        pytest.fail(f"oracle {oracle}/{script} failed (exit {returncode}); {by_hand}\n{output}", pytrace=False)
    return out
