"""Time and memory measurement shared by the benchmarks and their fairseq oracle side. It imports torch and the
standard library only: the oracle side runs in fairseq's environment and may not import the toolkit."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Make the kernel's peak RSS (VmHWM) the current RSS, so that a loading transient is not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    kib = _status_kib("VmRSS")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_rss_mb() -> float:
    kib = _status_kib("VmHWM")
    return (kib if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def warm_up_runtime() -> None:
    """Import and initialise what a training step loads lazily (the optimizer's step pulls in torch._dynamo, about
    70 MB), so that the peak memory measured from here on is the step's: model, gradients, optimizer state and
    activations."""
    p = torch.zeros(8, requires_grad=True)
    (p * 2).sum().backward()
    torch.nn.utils.clip_grad_norm_([p], 1.0)
    torch.optim.AdamW([p], lr=1e-3).step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Any, repeats: int, device: torch.device) -> tuple[dict[str, list[float]], Any]:
    """Wall and CPU seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call (allocations, caches,
    optimizer state), and the last call's result. CPU seconds are the process's: with one thread they barely move
    when other processes share the cores, which wall seconds do."""
    out = fn()
    wall, cpu = [], []
    for _ in range(repeats):
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"seconds": wall, "cpu_seconds": cpu}, out


def pad_batch(wavs: list[torch.Tensor], idx: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``idx`` of ``wavs`` as one zero-padded ``(B, T)`` batch and its ``(B, T)`` padding mask (True = pad), as
    both sides of the extraction benchmark batch them."""
    lengths = [wavs[i].numel() for i in idx]
    source = wavs[0].new_zeros(len(idx), max(lengths))
    padding = torch.ones(len(idx), max(lengths), dtype=torch.bool, device=device)
    for row, (i, n) in enumerate(zip(idx, lengths)):
        source[row, :n] = wavs[i]
        padding[row, :n] = False
    return source, padding
