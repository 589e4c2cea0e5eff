"""tests/oracle.py: its rules, checked on small test suites run by a separate pytest (collection fails for an unmarked
test that uses a ``fairseq_*`` fixture and for a test module that imports fairseq; ``run_oracle`` fails, never skips,
when called against the rules or without its environment), and what a failing oracle script reports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import oracle
import pytest
import torch
from oracle import run_oracle

LIB = "fairseq"  # spelled apart so that this module's own source does not import it, by the rule it tests
CONFTEST = "from oracle import pytest_collection_modifyitems, pytest_fixture_setup, pytest_runtest_protocol\n"
INI = "[pytest]\nmarkers =\n    fairseq: uses the fairseq oracle\n"


def _pytest(root: Path, files: dict[str, str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    for name, text in {"conftest.py": CONFTEST, "pytest.ini": INI, **files}.items():
        (root / name).write_text(textwrap.dedent(text))
    env = {**os.environ, "PYTHONPATH": str(Path(oracle.__file__).parent), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(root)], cwd=root,
                          capture_output=True, text=True, timeout=120, env=env)


def test_collection_fails_for_unmarked_users_and_imports(tmp_path: Path) -> None:
    result = _pytest(tmp_path, {
        "test_unmarked.py": """
            import pytest
            from oracle import run_oracle

            @pytest.fixture(scope="module")
            def fairseq_thing(tmp_path_factory):
                return run_oracle("fairseq", "hubert", tmp_path_factory.mktemp("x"))

            @pytest.fixture
            def built_on_it(fairseq_thing):
                return fairseq_thing

            def test_through_another_fixture(built_on_it):
                pass

            @pytest.mark.fairseq
            def test_marked(built_on_it):
                pass
        """,
        "test_imports.py": f"""
            def test_reference_in_process():
                from {LIB}.data import Dictionary
        """,
    })
    assert result.returncode == 4, result.stdout + result.stderr  # a usage error: nothing ran
    err = result.stderr
    assert "test_unmarked.py::test_through_another_fixture: uses fairseq_thing but is not marked" in err
    assert "test_marked" not in err
    assert "test_imports.py: imports fairseq" in err


def test_run_oracle_fails_against_the_rules_or_without_its_environment(tmp_path: Path) -> None:
    result = _pytest(tmp_path, {
        "test_runtime.py": """
            import pytest
            from oracle import run_oracle

            def helper(path):
                return run_oracle("fairseq", "hubert", path)

            @pytest.fixture
            def misnamed(tmp_path):
                return helper(tmp_path)

            @pytest.fixture
            def fairseq_by_the_rules(tmp_path):
                return helper(tmp_path)

            def test_unmarked_through_a_helper(tmp_path):
                helper(tmp_path)

            @pytest.mark.fairseq
            def test_misnamed_fixture(misnamed):
                pass

            @pytest.mark.fairseq
            def test_by_the_rules_without_the_environment(fairseq_by_the_rules):
                pass
        """,
    }, env={"SPEECHPROMPT_FAIRSEQ_PYTHON": str(tmp_path / "no-such-env" / "python")})
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "1 failed, 2 errors" in out and "skipped" not in out
    assert "test_unmarked_through_a_helper runs the fairseq oracle but is not marked @pytest.mark.fairseq" in out
    assert "fixture 'misnamed' runs the fairseq oracle; name it fairseq_..." in out
    assert f"the fairseq oracle environment is missing ({tmp_path / 'no-such-env' / 'python'}); build it with " \
           "`make oracle-env`" in out


@pytest.mark.fairseq
def test_a_failing_script_fails_the_test_with_its_traceback_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(pytest.fail.Exception) as failure:
        run_oracle("fairseq", "schedule", tmp_path, bad={"scheduler": "no_such_schedule", "updates": 1})
    message = str(failure.value)
    assert "oracle fairseq/schedule failed (exit 1)" in message
    assert "KeyError: 'no_such_schedule'" in message  # the script's own traceback
    assert f"run it by hand: cd {oracle.REPO} && " in message and "tests/oracles/fairseq/schedule.py" in message
    # The next run is not disturbed by the failed one.
    out = run_oracle("fairseq", "schedule", tmp_path / "again", good={"scheduler": "inverse_sqrt", "updates": 2,
                                                                      "warmup_updates": 1, "lr": [1.0]})
    assert torch.load(out / "rates.pt", weights_only=True)["good"] == pytest.approx([1.0, 0.5**0.5])
