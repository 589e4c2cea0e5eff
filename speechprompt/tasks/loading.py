"""A trained unit-LM task, rebuilt from its task checkpoint: base LM (fingerprint-checked), method, verbalizer,
head."""

from __future__ import annotations

import os

import torch

from speechprompt.checkpoint import TaskCheckpoint, load_base, load_checkpoint, load_into
from speechprompt.devices import resolve_device
from speechprompt.errors import CheckpointError
from speechprompt.models.hf_decoders import load_speech_lm
from speechprompt.models.unit_vocab import UnitVocab
from speechprompt.tasks.registry import Task, build_task
from speechprompt.tuning import build_method, freeze_except, method_config
from speechprompt.verbalizers import verbalizer_from_dict

# The dtype a task's base was held in at training time (train's `base_dtype`): the fingerprint is of those weights.
_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_task(
    path: str | os.PathLike, base: str | os.PathLike | None = None, device: str = "auto"
) -> tuple[Task, TaskCheckpoint, UnitVocab]:
    """Rebuild a trained task from its checkpoint.

    Args:
        path: The checkpoint (``NAME``, ``NAME.safetensors`` or ``NAME.json``).
        base: The base unit LM (a fairseq checkpoint, or a slamkit / HF causal-LM directory); default: the path
            recorded at training time.
        device: ``auto``, ``cpu``, ``cuda``, ...

    Returns:
        The task (model in eval mode on ``device``), the loaded checkpoint and the LM's unit vocabulary.

    Raises:
        CheckpointError: no base LM found, another base LM, or tensors that do not fit the recorded method.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    dtype = _DTYPES.get((meta.get("config") or {}).get("base_dtype", "float32"))
    model, vocab, _ = load_base(ckpt, base, lambda p: load_speech_lm(p, dtype=dtype), what="base unit LM")
    name = meta["method"]["name"]
    method = build_method(method_config(name, meta["method"].get("config")), model)
    try:
        method.load_exported_state_dict(ckpt.method_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: method tensors do not fit method {name!r} ({e})") from None
    freeze_except(model, method)
    verbalizer = verbalizer_from_dict(meta["verbalizer"], vocab) if meta.get("verbalizer") else None
    if verbalizer is not None:
        verbalizer.check_vocab(vocab)
    task_meta = meta["task"]
    task = build_task(task_meta["kind"], model, method, verbalizer, task_meta.get("labels", []),
                      task_meta.get("decode"))
    if task.head is not None:
        load_into(task.head, ckpt.head_state, "head", ckpt.path)
    dev = resolve_device(device)
    for module in (model, method, task.head):
        if module is not None:
            module.to(dev).eval()
    return task, ckpt, vocab
