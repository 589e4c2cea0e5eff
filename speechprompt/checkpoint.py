"""Task-only checkpoints: ``NAME.safetensors`` (only what was trained) plus a ``NAME.json`` sidecar.

The safetensors file holds the trained tensors and nothing else: the tuning method's state dict under
``method.*`` and, when the task has one, the head (learnable verbalizer, linear probe) under ``head.*``. There is
no pickle, so a checkpoint loads on any torch version and cannot run code.

The sidecar says everything needed to use it, so that ``speechprompt infer --checkpoint NAME.safetensors`` needs
nothing else::

    format, format_version, toolkit_version, created
    task        {type, labels}
    method      {name, config}
    head        name of the task head, or null
    verbalizer  the verbalizer's to_dict(), or null
    base        {path, abs_path, fingerprint, ...}: the frozen base model at training time (:func:`base_record`)
    units       {features, quantizer {path, fingerprint, k, dim}, dedup, max_len}: the audio -> units pipeline
    tensors     {sha256, bytes, shapes}: of the safetensors file, so a torn or swapped pair is detected
    training    summary (steps, seconds, trainable parameters, ...) and metrics

The fingerprint of a base model is the sha256 of its frozen state dict (names, dtypes, shapes and bytes), taken
before any method is attached. Loading a checkpoint into a model whose fingerprint differs is refused with a
:class:`~speechprompt.errors.CheckpointError` naming both fingerprints and the base path.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from speechprompt import __version__
from speechprompt.errors import CheckpointError
from speechprompt.fileio import atomic_open, write_json

FORMAT = "speechprompt-task-checkpoint"
FORMAT_VERSION = 1
METHOD_PREFIX = "method."
HEAD_PREFIX = "head."


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` from either file's path or the bare ``NAME``."""
    p = Path(path)
    if p.suffix in (".safetensors", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".json")


def base_fingerprint(model: torch.nn.Module) -> str:
    """``sha256:<hex>`` of a frozen base model's state dict (names, dtypes, shapes, bytes; order-independent).

    Take it before a tuning method attaches: attached modules add state-dict entries.
    """
    from speechprompt.models.unit_lm import state_fingerprint

    return f"sha256:{state_fingerprint(model)}"


@dataclasses.dataclass
class TaskCheckpoint:
    """A loaded checkpoint: its tensors and its sidecar.

    Attributes:
        tensors: Every saved tensor by its full key (``method.*``, ``head.*``).
        meta: The sidecar (see the module docstring).
        path: The safetensors file it was read from.
    """

    tensors: dict[str, Tensor]
    meta: dict[str, Any]
    path: Path

    def group(self, prefix: str) -> dict[str, Tensor]:
        """Tensors under ``prefix`` (``METHOD_PREFIX`` or ``HEAD_PREFIX``) with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def method_state(self) -> dict[str, Tensor]:
        return self.group(METHOD_PREFIX)

    @property
    def head_state(self) -> dict[str, Tensor]:
        return self.group(HEAD_PREFIX)

    def check_base(self, fingerprint: str, base_path: str | os.PathLike | None = None) -> None:
        """Refuse a base model other than the one the checkpoint was trained on.

        Raises:
            CheckpointError: the fingerprints differ; the message names both and both paths.
        """
        expected = self.meta.get("base", {}).get("fingerprint")
        if expected and expected != fingerprint:
            trained = self.meta.get("base", {}).get("path")
            raise CheckpointError(
                f"{self.path} was trained on another base model: it expects base fingerprint {expected} "
                f"(trained with {trained}), but {base_path or 'the given model'} has {fingerprint}; "
                "pass the original base model with --base"
            )

    def check_quantizer(self, fingerprint: str | None, quantizer_path: str | os.PathLike | None = None) -> None:
        """Refuse a k-means quantizer other than the one that made the training units (when both are known)."""
        expected = (self.meta.get("units") or {}).get("quantizer", {}) or {}
        want = expected.get("fingerprint")
        if want and fingerprint and want != fingerprint:
            raise CheckpointError(
                f"{self.path} was trained on units of another quantizer: it expects {want} (trained with "
                f"{expected.get('path')}), but {quantizer_path} has {fingerprint}; pass the original with --kmeans"
            )


def save_checkpoint(
    path: str | os.PathLike,
    method_state: dict[str, Tensor],
    head_state: dict[str, Tensor] | None,
    meta: dict[str, Any],
) -> Path:
    """Write ``NAME.safetensors`` and then ``NAME.json``, each atomically.

    The sidecar is written last and carries the safetensors file's sha256, so a reader never pairs a sidecar
    with tensors it does not describe, even if a run is killed between the two writes.

    Args:
        path: ``NAME``, ``NAME.safetensors`` or ``NAME.json``.
        method_state: The tuning method's own state dict (only the trained tensors).
        head_state: The task head's state dict, or ``None``.
        meta: Sidecar fields (``task``, ``method``, ``verbalizer``, ``base``, ``units``, ``training``...). The
            format fields and ``tensors`` are filled in here.

    Returns:
        The safetensors path.
    """
    from safetensors.torch import save

    st_path, json_path = checkpoint_paths(path)
    tensors = {METHOD_PREFIX + k: v for k, v in method_state.items()}
    tensors.update({HEAD_PREFIX + k: v for k, v in (head_state or {}).items()})
    # safetensors refuses shared or non-contiguous storage; a copy per tensor is cheap at task-only sizes.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    blob = save(tensors, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    with atomic_open(st_path, "wb") as f:
        f.write(blob)
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "toolkit_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **{k: v for k, v in meta.items() if k not in ("format", "format_version", "toolkit_version", "tensors")},
        "tensors": {
            "sha256": f"sha256:{hashlib.sha256(blob).hexdigest()}",
            "bytes": len(blob),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        },
    }
    write_json(json_path, sidecar)
    return st_path


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """The sidecar of a checkpoint (without reading its tensors)."""
    st_path, json_path = checkpoint_paths(path)
    if not json_path.is_file():
        raise CheckpointError(
            f"{json_path}: no such file; a task checkpoint is a pair NAME.safetensors + NAME.json (the sidecar "
            "holds the method, verbalizer and base model), copy both"
        )
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{json_path}: unreadable checkpoint sidecar ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a speechprompt task checkpoint sidecar (format {FORMAT!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format {meta['format_version']} is newer than this toolkit reads "
            f"({FORMAT_VERSION}); upgrade speechprompt"
        )
    return meta


def checkpoint_kind(path: str | os.PathLike) -> str:
    """``"superb"`` (an encoder with a SUPERB head, reads audio) or ``"unit_lm"`` (a unit-LM task, reads units):
    which family a checkpoint belongs to, from its sidecar alone."""
    meta = read_sidecar(path)
    superb = str(meta.get("head") or "").startswith("superb_") or "superb" in meta
    return "superb" if superb else "unit_lm"


def load_checkpoint(path: str | os.PathLike) -> TaskCheckpoint:
    """Read and verify a task checkpoint.

    Raises:
        CheckpointError: a missing file, a sidecar that does not describe these tensors (torn write, files from
            two runs), or a truncated/corrupt safetensors file.
    """
    from safetensors.torch import load

    st_path, json_path = checkpoint_paths(path)
    meta = read_sidecar(path)
    if not st_path.is_file():
        raise CheckpointError(f"{st_path}: no such file (its sidecar {json_path} exists)")
    blob = st_path.read_bytes()
    expected = meta.get("tensors", {})
    digest = f"sha256:{hashlib.sha256(blob).hexdigest()}"
    if expected.get("sha256") and expected["sha256"] != digest:
        raise CheckpointError(
            f"{st_path} is corrupt or truncated, or does not belong to {json_path}: its sha256 is {digest} "
            f"({len(blob)} bytes) but the sidecar expects {expected['sha256']} ({expected.get('bytes')} bytes)"
        )
    try:
        tensors = load(blob)
    except Exception as e:  # safetensors raises its own error types for every malformed header
        raise CheckpointError(f"{st_path}: not a readable safetensors file ({e})") from None
    shapes = expected.get("shapes")
    if shapes is not None and {k: list(v.shape) for k, v in tensors.items()} != shapes:
        raise CheckpointError(f"{st_path}: its tensors do not match the shapes listed in {json_path}")
    return TaskCheckpoint(tensors, meta, st_path)


def base_record(path: str | os.PathLike, fingerprint: str, **extra: Any) -> dict[str, Any]:
    """The sidecar's ``base`` section: the path as given (portable when relative to a repository root), the absolute
    path (found from any working directory), the fingerprint, and ``extra`` (parameter count, kind)."""
    return {"path": str(path), "abs_path": str(Path(path).resolve()), "fingerprint": fingerprint, **extra}


def resolve_base(meta: dict[str, Any], override: str | os.PathLike | None, source: str | os.PathLike,
                 what: str = "base model", flag: str = "--base") -> Path:
    """Where a checkpoint's base model is: ``override`` if given, else the path recorded at training time as given,
    else as an absolute path.

    Raises:
        CheckpointError: none of them exists; the message names the flag to pass and the fingerprint to match.
    """
    recorded = meta.get("base") or {}
    # path_absolute: the spelling of SUPERB checkpoints written before 0.2.
    candidates = [override] if override is not None else [
        recorded.get("path"), recorded.get("abs_path") or recorded.get("path_absolute")]
    found = next((Path(c) for c in candidates if c and Path(c).exists()), None)
    if found is None:
        raise CheckpointError(f"{source}: {what} {candidates[0] or '(not recorded)'} not found; pass it with {flag} "
                              f"(its fingerprint must be {recorded.get('fingerprint')})")
    return found


def load_base(
    ckpt: TaskCheckpoint,
    override: str | os.PathLike | None,
    load: Callable[[Path], tuple[torch.nn.Module, Any]],
    what: str = "base model",
    flag: str = "--base",
) -> tuple[torch.nn.Module, Any, Path]:
    """Find (:func:`resolve_base`), load and fingerprint-check the frozen base model of a task checkpoint.

    Every consumer of a checkpoint (``evaluate``, ``infer``, SUPERB, serving) goes through here.

    Args:
        load: path -> (model as stored, whatever else its loader returns: a dictionary, a task config).

    Returns:
        The model, the loader's extra value, and the path it was loaded from.

    Raises:
        CheckpointError: no base model found, or one whose fingerprint is not the one trained on.
    """
    path = resolve_base(ckpt.meta, override, ckpt.path, what, flag)
    model, extra = load(path)
    ckpt.check_base(base_fingerprint(model), path)
    return model, extra, path


def load_into(module: torch.nn.Module, state: dict[str, Tensor], what: str, source: str | os.PathLike) -> None:
    """``module.load_state_dict(state)`` with a clear error naming missing and unexpected keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: the {what} tensors do not fit the {what} built from its sidecar "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]})"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: {what} tensor {k} has shape {tuple(v.shape)} but the model expects {tuple(own[k].shape)}"
            )
    module.load_state_dict(state)
