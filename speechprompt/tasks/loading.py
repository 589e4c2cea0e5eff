"""A trained unit-LM task, rebuilt from its task checkpoint: base LM (fingerprint-checked), method, verbalizer,
head."""

from __future__ import annotations

import os

from speechprompt.checkpoint import TaskCheckpoint, load_base, load_checkpoint, load_into
from speechprompt.devices import resolve_device
from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError
from speechprompt.models.unit_lm import load_unit_lm
from speechprompt.tasks.registry import Task, build_task
from speechprompt.tuning import build_method, freeze_except, method_config
from speechprompt.verbalizers import verbalizer_from_dict


def load_task(
    path: str | os.PathLike, base: str | os.PathLike | None = None, device: str = "auto"
) -> tuple[Task, TaskCheckpoint, Dictionary]:
    """Rebuild a trained task from its checkpoint.

    Args:
        path: The checkpoint (``NAME``, ``NAME.safetensors`` or ``NAME.json``).
        base: The base unit LM; default: the path recorded at training time.
        device: ``auto``, ``cpu``, ``cuda``, ...

    Returns:
        The task (model in eval mode on ``device``), the loaded checkpoint and the LM's dictionary.

    Raises:
        CheckpointError: no base LM found, another base LM, or tensors that do not fit the recorded method.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt.meta
    model, dictionary, _ = load_base(ckpt, base, load_unit_lm, what="base unit LM")
    name = meta["method"]["name"]
    method = build_method(method_config(name, meta["method"].get("config")), model)
    try:
        method.load_exported_state_dict(ckpt.method_state)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: method tensors do not fit method {name!r} ({e})") from None
    freeze_except(model, method)
    verbalizer = verbalizer_from_dict(meta["verbalizer"]) if meta.get("verbalizer") else None
    if verbalizer is not None:
        verbalizer.check_vocab(len(dictionary))
    task_meta = meta["task"]
    task = build_task(task_meta["kind"], model, method, verbalizer, task_meta.get("labels", []),
                      task_meta.get("decode"))
    if task.head is not None:
        load_into(task.head, ckpt.head_state, "head", ckpt.path)
    dev = resolve_device(device)
    for module in (model, method, task.head):
        if module is not None:
            module.to(dev).eval()
    return task, ckpt, dictionary
