"""Typed errors. The CLI turns any :class:`SpeechPromptError` into one clear line and exit code 2."""

from __future__ import annotations


class SpeechPromptError(Exception):
    """Base class of the errors a user can cause and fix (bad input, mismatched files, bad arguments)."""


class AudioError(SpeechPromptError, ValueError):
    """An audio file that cannot be used. The message names the file and the problem."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class UnsafeCheckpointError(SpeechPromptError):
    """A pickle that asks for a class or function outside the allow-list."""


class CheckpointError(SpeechPromptError):
    """A checkpoint that is unreadable, incomplete, or does not belong to the model it is loaded into."""
