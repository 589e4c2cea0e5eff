"""Safe reading of Hugging Face model directories without transformers: ``config.json``, weights and tokenizer files.

A directory holds ``config.json`` and its weights in one of these forms (looked for in this order):

* ``model.safetensors``, or shards listed by ``model.safetensors.index.json``;
* ``pytorch_model.bin``, or shards listed by ``pytorch_model.bin.index.json``: pickles, read with
  ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers and refuses anything else, so no
  code in them runs.

Every problem (no such directory, no weights, a truncated or corrupt file, a shard missing, a pickle that is not a
plain state dict) is a :class:`~speechprompt.errors.CheckpointError` of one line naming the file and what was found.
What the weights mean is the models' business (:mod:`speechprompt.models.hf_keys`).
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from speechprompt.errors import CheckpointError

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)


def is_hf_directory(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory with a ``config.json``."""
    return (Path(path) / CONFIG).is_file()


def _listing(directory: Path, limit: int = 8) -> str:
    try:
        names = sorted(p.name for p in directory.iterdir())
    except OSError:
        return "nothing readable"
    if not names:
        return "an empty directory"
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from ``path``; an unreadable file or another JSON value is a :class:`CheckpointError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, found {type(data).__name__}")
    return data


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model directory, as a dict (interpreting it is the caller's job)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"{directory}: not a Hugging Face model directory (no {CONFIG}; found "
                              f"{_listing(directory)})")
    return read_json(directory / CONFIG, "model config")


def read_optional_json(directory: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """``directory/name`` as a JSON object, or ``None`` when the file does not exist."""
    path = Path(directory) / name
    return read_json(path, name) if path.is_file() else None


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt? {e})") from None


def _load_torch_bin(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: not a plain tensor state dict (weights_only loading: "
                              f"{first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch file (truncated or corrupt? {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: not a state dict of named tensors")
    return state


def _load_sharded(directory: Path, index_name: str, load: Any) -> dict[str, Tensor]:
    index = read_json(directory / index_name, "weight index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{directory / index_name}: no 'weight_map' of tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    state: dict[str, Tensor] = {}
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{directory / index_name}: shard name {shard!r} is not a file in the directory")
        path = directory / shard
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {index_name} does not exist")
        state.update(load(path))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointError(f"{directory / index_name}: tensors listed but not in their shards: "
                              + ", ".join(missing[:5]))
    return state


def read_weights(directory: str | os.PathLike) -> tuple[dict[str, Tensor], Path]:
    """All tensors of a model directory, by their names in the file, and the file (or index) they came from."""
    directory = Path(directory)
    if (directory / SAFETENSORS).is_file():
        return _load_safetensors(directory / SAFETENSORS), directory / SAFETENSORS
    if (directory / SAFETENSORS_INDEX).is_file():
        return _load_sharded(directory, SAFETENSORS_INDEX, _load_safetensors), directory / SAFETENSORS_INDEX
    if (directory / TORCH_BIN).is_file():
        return _load_torch_bin(directory / TORCH_BIN), directory / TORCH_BIN
    if (directory / TORCH_BIN_INDEX).is_file():
        return _load_sharded(directory, TORCH_BIN_INDEX, _load_torch_bin), directory / TORCH_BIN_INDEX
    raise CheckpointError(f"{directory}: no weights (looked for {', '.join(WEIGHT_FILES)}; found "
                          f"{_listing(directory)})")
