"""One writer per directory: a second process is refused with the holder's name, a dead holder blocks nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from speechprompt.cli import main
from speechprompt.lock import DirectoryLock, LockError

HOLD = textwrap.dedent("""
    import sys, time
    from speechprompt.lock import DirectoryLock
    lock = DirectoryLock(sys.argv[1], command="speechprompt train", name=sys.argv[2]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(directory: Path, name: str = ".lock") -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), name], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_and_told_who_holds_it(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(LockError) as e:
            DirectoryLock(tmp_path, "speechprompt train").acquire()
        message = str(e.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert "speechprompt train" in message and str(tmp_path) in message
        # Another lock name in the same directory (another shard of prepare) is independent.
        with DirectoryLock(tmp_path, name=".lock.other"):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / ".lock").exists()  # the killed holder's file stays behind...
    with DirectoryLock(tmp_path) as lock:  # ...and is simply locked again
        assert lock.held
    assert not lock.held and not (tmp_path / ".lock").exists()  # a holder that finishes removes it


def test_one_process_cannot_hold_a_directory_twice(tmp_path: Path) -> None:
    with DirectoryLock(tmp_path, "first"), pytest.raises(LockError, match=f"pid {os.getpid()}.*first"):
        DirectoryLock(tmp_path, "second").acquire()
    DirectoryLock(tmp_path).acquire().release()  # released on exit


def test_a_second_trainer_on_a_run_dir_exits_2_with_one_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        start = time.monotonic()
        code = main(["pretrain-ulm", f"train={tmp_path / 'a.units'}", f"dev={tmp_path / 'b.units'}",
                     f"run_dir={run_dir}"])
        assert code == 2 and time.monotonic() - start < 30  # refused at once, not after loading anything
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by another process (pid {proc.pid}" in err[0]
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # only the holder's: nothing of the refused run
    finally:
        proc.kill()
        proc.wait()
