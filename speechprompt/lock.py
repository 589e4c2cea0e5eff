"""One writer per directory: an advisory lock that names its holder and dies with it.

A second process that starts writing into a run directory (or ``prepare``'s output directory) while the first is
still running would interleave checkpoints, logs and training states. :class:`DirectoryLock` refuses it at once::

    with DirectoryLock("exp/run1", command="train"):
        ...  # only this process writes here

The lock is ``fcntl.flock`` on a file in the directory (``.lock`` by default). The kernel releases it when the
holding process exits, however it exits (``kill -9`` included), so a stale lock never blocks a rerun: a killed
holder's file is simply locked again. A holder that finishes removes the file. The file records who holds it (pid,
host, command, start time), which the refusal message quotes.

On a filesystem without working ``flock`` (some network mounts) the lock is not taken and a warning says so: the
toolkit still runs, without the protection.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from types import TracebackType

from speechprompt.errors import SpeechPromptError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class LockError(SpeechPromptError):
    """Another process holds the lock of a directory."""


class DirectoryLock:
    """An exclusive, non-blocking lock on ``directory`` (created if needed) for as long as the object is held.

    Args:
        directory: the directory to guard.
        command: what the holder is doing, for the message another process gets (e.g. ``train``).
        name: the lock file's name inside ``directory``; different names guard different outputs of one directory
            (``prepare`` locks each shard of each manifest on its own, so array jobs run side by side).

    Raises:
        LockError: (from :meth:`acquire`) another live process holds it; the message names its pid, host, command
            and start time.
    """

    def __init__(self, directory: str | os.PathLike, command: str = "", name: str = LOCK_NAME) -> None:
        self.directory = Path(directory)
        self.path = self.directory / name
        self.command = command
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirectoryLock:
        if self._fd is not None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise LockError(f"{self.directory} is in use by another process ({holder}); wait for it to "
                                    "finish or stop it, or choose another directory") from None
                logger.warning("%s: cannot lock (%s); running without protection against a second writer",
                               self.path, e.strerror)
                return self
            # The previous holder may have removed the file between our open and our lock: then we hold a lock on
            # a file nobody else will open. Lock the file that is there now instead.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_holder_record(self.command)).encode() + b"\n")
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up and remove its file (removed first, so that no one locks it after us)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder_record(command: str) -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _read_holder(fd: int) -> str:
    """``pid N on host H (command, since T)`` from a held lock file, or what is known of it."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or "pid" not in record:
        return "holder unknown"
    what = f", {record['command']}" if record.get("command") else ""
    return f"pid {record['pid']} on host {record.get('host', '?')}{what}, since {record.get('started', '?')}"
