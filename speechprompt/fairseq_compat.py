"""Safe reading and writing of fairseq artefacts without fairseq: checkpoints and ``dict.txt`` (``km.bin`` k-means
pickles are read by :mod:`speechprompt.kmeans_pickle` through the same restricted unpickler).

Pickles run code by design, so every pickle here goes through a restricted unpickler. It rebuilds tensors, plain
containers, ``argparse.Namespace`` and numpy arrays, and turns the few foreign classes a fairseq or sklearn pickle
legitimately holds (omegaconf containers, fairseq's ``Dictionary``, sklearn's ``MiniBatchKMeans``) into inert
records of their state. Anything else is refused with :class:`UnsafeCheckpointError`, before it is called.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import copyreg
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from speechprompt.dictionary import Dictionary
from speechprompt.errors import CheckpointError, UnsafeCheckpointError
from speechprompt.fileio import atomic_open

# --------------------------------------------------------------------------------------------------------------
# Inert records of foreign objects


class Record:
    """A foreign object rebuilt as data only: its class name, constructor args and pickled state."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        # (dict_state, slot_state) pairs come from classes with __slots__; keep both, flattened.
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            merged = dict(state[0] or {})
            merged.update(state[1])
            state = merged
        self.state = state

    def __getitem__(self, key: str) -> Any:
        return self.state[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.state.get(key, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"<record of {self.qualname}>"


def record_class(module: str, name: str) -> type[Record]:
    return type(name, (Record,), {"qualname": f"{module}.{name}", "__module__": __name__})


def omegaconf_to_plain(obj: Any) -> Any:
    """Turn records of omegaconf ``DictConfig``/``ListConfig``/value nodes (and anything nested) into plain
    Python values. Interpolations such as ``${task.label_rate}`` stay strings, as saved."""
    if isinstance(obj, Record):
        if obj.qualname.startswith("omegaconf."):
            state = obj.state if isinstance(obj.state, dict) else {}
            if "_content" in state:
                return omegaconf_to_plain(state["_content"])
            if "_val" in state:
                return omegaconf_to_plain(state["_val"])
            return None
        return obj
    if isinstance(obj, dict):
        return {k: omegaconf_to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [omegaconf_to_plain(v) for v in obj]
    if isinstance(obj, argparse.Namespace):
        return {k: omegaconf_to_plain(v) for k, v in vars(obj).items()}
    return obj


# --------------------------------------------------------------------------------------------------------------
# The restricted unpickler

# Globals that are data constructors and cannot reach the file system, the network or an interpreter.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("argparse", "Namespace"): argparse.Namespace,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "object"): object,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "str"): str,
    ("builtins", "bool"): bool,
    ("builtins", "bytes"): bytes,
    ("typing", "Any"): Any,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
}
for _dtype_name in ("float16", "float32", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
                    "bool", "complex64", "complex128"):
    _ALLOWED[("torch", _dtype_name)] = getattr(torch, _dtype_name)
_ALLOWED[("numpy", "ndarray")] = np.ndarray
_ALLOWED[("numpy", "dtype")] = np.dtype

try:  # numpy 2 moved the module; pickles name either path
    from numpy._core.multiarray import _reconstruct as _np_reconstruct_impl
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct as _np_reconstruct_impl

_NUMPY_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")


def _safe_encode(obj: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode``: numpy scalars pickled under protocol 2 carry their bytes as latin-1 strings."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("refusing _codecs.encode with non-string or non-latin1 arguments")
    return obj.encode(encoding)


def _np_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise UnsafeCheckpointError(f"refusing to rebuild a numpy array of type {subtype!r}")
    return _np_reconstruct_impl(subtype, shape, dtype)


def _np_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafeCheckpointError("refusing a numpy scalar of object dtype")
    return np.frombuffer(data if data is not None else b"\x00" * dtype.itemsize, dtype=dtype)[0]


# Modules whose classes become inert records, by what may legitimately appear in the pickles we read.
_RECORD_MODULE_PREFIXES: tuple[str, ...] = ("omegaconf.",)
_RECORD_CLASSES: set[tuple[str, str]] = {
    ("fairseq.data.dictionary", "Dictionary"),
}


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so that BUILD can be extended (km.bin)
    """Unpickler with an allow-list. ``record_modules`` adds module prefixes whose classes become records."""

    def __init__(self, file: Any, *, source: str = "<pickle>", record_modules: Sequence[str] = (), **kwargs: Any):
        super().__init__(file, **kwargs)
        self.source = source
        self.record_modules = tuple(_RECORD_MODULE_PREFIXES) + tuple(record_modules)

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 era names (protocol 2 pickles say __builtin__, copy_reg)
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = (module, name)
        if key == ("copyreg", "_reconstructor"):
            return self._reconstructor
        if key == ("_codecs", "encode"):
            return _safe_encode
        if module in _NUMPY_MULTIARRAY and name == "_reconstruct":
            return _np_reconstruct
        if module in _NUMPY_MULTIARRAY and name == "scalar":
            return _np_scalar
        if module == "numpy.dtypes" and name.endswith("DType"):  # numpy 2 pickles dtype classes
            return np.dtype
        if key in _ALLOWED:
            return _ALLOWED[key]
        if key in _RECORD_CLASSES or module.startswith(self.record_modules):
            return record_class(module, name)
        raise UnsafeCheckpointError(
            f"{self.source}: refusing to unpickle {module}.{name}: it is not on the allow-list of "
            "fairseq/sklearn artefacts (a tampered or unsupported file?)"
        )

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        if not (isinstance(cls, type) and (issubclass(cls, Record) or cls in _ALLOWED.values())):
            raise UnsafeCheckpointError(f"{self.source}: refusing copyreg._reconstructor for {cls!r}")
        obj = object.__new__(cls) if base is object else base.__new__(cls, state)
        return obj


class _SafePickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and a ``load`` function."""

    def __init__(self, source: str) -> None:
        source_ = source

        class Unpickler(SafeUnpickler):
            def __init__(self, file: Any, **kwargs: Any) -> None:
                super().__init__(file, source=source_, **kwargs)

        self.Unpickler = Unpickler
        self.__name__ = "speechprompt_safe_pickle"

    def load(self, file: Any, **kwargs: Any) -> Any:
        return self.Unpickler(file, **kwargs).load()


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` through :class:`SafeUnpickler`, on CPU. Works for zip and legacy formats."""
    path = str(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", pickle_module=_SafePickleModule(path), weights_only=False)
    except UnsafeCheckpointError:
        raise
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as e:
        # The pure-Python unpickler reports an unknown opcode as a KeyError.
        raise CheckpointError(f"{path}: not a readable torch/fairseq checkpoint ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------------------
# fairseq checkpoints


def load_fairseq_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a fairseq checkpoint safely and normalise it.

    Returns a dict with ``model`` (the state dict), ``cfg`` (a plain nested dict with at least ``model`` and
    ``task`` sections, built from legacy ``args`` when the checkpoint has no ``cfg``) and ``task_state`` (with
    fairseq ``Dictionary`` objects turned into :class:`Dictionary`). Other top-level entries are kept as read.
    """
    return fairseq_checkpoint_from_raw(safe_torch_load(path), path)


def fairseq_checkpoint_from_raw(raw: Any, path: str | os.PathLike) -> dict[str, Any]:
    """:func:`load_fairseq_checkpoint` on what :func:`safe_torch_load` already read (a loader that looks at the
    file first to tell formats apart reads it once); ``path`` is named in errors."""
    if not isinstance(raw, dict) or "model" not in raw:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' entry)")
    out = dict(raw)
    cfg = omegaconf_to_plain(raw.get("cfg"))
    args = raw.get("args")
    if cfg is None or not cfg.get("model"):
        if args is None:
            raise CheckpointError(f"{path}: fairseq checkpoint has neither 'cfg' nor 'args'")
        flat = omegaconf_to_plain(args)
        cfg = {"model": dict(flat), "task": dict(flat), "common": dict(flat)}
    elif isinstance(cfg.get("model"), argparse.Namespace):
        cfg["model"] = vars(cfg["model"])
    out["cfg"] = cfg
    out["task_state"] = _convert_dictionaries(raw.get("task_state") or {})
    return out


def _convert_dictionaries(obj: Any) -> Any:
    """Replace records of fairseq ``Dictionary`` objects (HuBERT keeps a list of them) by :class:`Dictionary`."""
    if isinstance(obj, Record) and obj.qualname == "fairseq.data.dictionary.Dictionary":
        return Dictionary.from_state(obj.state or {})
    if isinstance(obj, dict):
        return {k: _convert_dictionaries(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_convert_dictionaries(v) for v in obj]
    return obj


class _AsFairseqDictionary:
    """A :class:`Dictionary` that pickles as fairseq's ``fairseq.data.dictionary.Dictionary`` (HuBERT keeps its
    label dictionaries in ``task_state``), without fairseq: the class is written by name, the state is the
    attributes fairseq's ``Dictionary.__init__`` sets, which unpickling restores as its ``__dict__``."""

    FAIRSEQ_CLASS = ("fairseq.data.dictionary", "Dictionary")

    def __init__(self, d: Dictionary) -> None:
        self.state = {
            "bos_word": d.bos_word, "unk_word": d.unk_word, "pad_word": d.pad_word, "eos_word": d.eos_word,
            "symbols": list(d.symbols), "count": [int(c) for c in d.count], "indices": dict(d.indices),
            "bos_index": d.bos_index, "pad_index": d.pad_index, "eos_index": d.eos_index, "unk_index": d.unk_index,
            "nspecial": d.nspecial,
        }

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return copyreg.__newobj__, (type(self),), self.state


class _FairseqPickler(pickle._Pickler):  # the pure-Python pickler, whose save_global can be extended
    """Writes :class:`_AsFairseqDictionary` under fairseq's class name (its module need not be importable)."""

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is not _AsFairseqDictionary:
            super().save_global(obj, name)
            return
        module, qualname = obj.FAIRSEQ_CLASS
        if self.proto >= 4:
            self.save(module)
            self.save(qualname)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)


class _FairseqPickleModule:
    """What ``torch.save(pickle_module=...)`` needs: the pickler above, and ``dump`` for torch's header."""

    __name__ = "speechprompt_fairseq_pickle"
    Pickler = _FairseqPickler

    @staticmethod
    def dump(obj: Any, file: Any, protocol: int | None = None) -> None:
        _FairseqPickler(file, protocol).dump(obj)


def _fairseq_objects(obj: Any) -> Any:
    """``obj`` with every :class:`Dictionary` turned into one that pickles as fairseq's."""
    if isinstance(obj, Dictionary):
        return _AsFairseqDictionary(obj)
    if isinstance(obj, dict):
        return {k: _fairseq_objects(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fairseq_objects(v) for v in obj)
    return obj


def save_fairseq_checkpoint(
    path: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    task_state: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    num_updates: int = 0,
) -> None:
    """Write a checkpoint in fairseq's layout (``model``, ``cfg``, ``args``, ``extra_state``...), atomically.

    ``cfg`` is a plain dict, as fairseq itself saves it (``OmegaConf.to_container``). fairseq's
    ``load_checkpoint_to_cpu`` reads the result and rebuilds the model from ``cfg``. Every :class:`Dictionary` in
    ``task_state`` (HuBERT's ``{"dictionaries": [...]}``) is written as a fairseq ``Dictionary``, as fairseq's
    trainer saves it, so that fairseq's task and :func:`load_fairseq_checkpoint` both read it back; the file then
    needs ``weights_only=False`` (or that class allowed) in ``torch.load``, as every official HuBERT checkpoint.
    """
    state = {
        "args": None,
        "cfg": cfg,
        "model": {k: v.detach().cpu().contiguous() for k, v in model_state.items()},
        "criterion": None,
        "optimizer_history": [
            {"criterion_name": "CrossEntropyCriterion", "optimizer_name": "Adam", "lr_scheduler_state": {},
             "num_updates": int(num_updates)}
        ],
        "task_state": _fairseq_objects(task_state or {}),
        "extra_state": {"metrics": {}, "previous_training_time": 0, **(extra_state or {})},
        "last_optimizer_state": None,
    }
    with atomic_open(path, "wb") as f:
        torch.save(state, f, pickle_module=_FairseqPickleModule)
