"""Where torch runs: the device a config names, and how many CPU threads it may use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use ``n`` intra-op threads (0: leave torch's setting) and restore the previous count on exit.

    On a small or shared CPU, one thread per process is often several times faster than torch's default of one
    per core: a 2-thread step of a small transformer ran 3-10x slower than a 1-thread step on a 2-core VM whose
    other core was busy.
    """
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
