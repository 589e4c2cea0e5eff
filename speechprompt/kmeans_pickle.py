"""Reading GSLM's ``km.bin`` without sklearn or joblib: a joblib pickle of sklearn's ``MiniBatchKMeans``, read
through the restricted unpickler of :mod:`speechprompt.fairseq_compat` (no code from the file runs)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from speechprompt.errors import CheckpointError, UnsafeCheckpointError
from speechprompt.fairseq_compat import Record, SafeUnpickler, record_class

# --------------------------------------------------------------------------------------------------------------
# km.bin (a joblib pickle of sklearn MiniBatchKMeans)

_JOBLIB_WRAPPER = ("joblib.numpy_pickle", "NumpyArrayWrapper")


class _JoblibUnpickler(SafeUnpickler):
    """Reads joblib's format: each ``NumpyArrayWrapper`` is followed, after its BUILD, by the raw array bytes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: Any, source: str) -> None:
        super().__init__(file, source=source, record_modules=("sklearn.", "numpy.random."))
        self._raw = file

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _JOBLIB_WRAPPER:
            return record_class(module, name)
        return super().find_class(module, name)

    def load_build(self) -> None:
        pickle._Unpickler.load_build(self)
        top = self.stack[-1]
        if isinstance(top, Record) and top.qualname == ".".join(_JOBLIB_WRAPPER):
            self.stack[-1] = self._read_array(top.state or {})

    dispatch[pickle.BUILD[0]] = load_build

    def _read_array(self, w: dict[str, Any]) -> np.ndarray:
        dtype, shape, order = w.get("dtype"), tuple(w.get("shape", ())), w.get("order", "C")
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise UnsafeCheckpointError(f"{self.source}: refusing a joblib array of object dtype")
        if w.get("numpy_array_alignment_bytes") is not None:
            pad = self._raw.read(1)
            if pad and pad[0]:
                self._raw.read(pad[0])
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * dtype.itemsize
        data = self._raw.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{self.source}: truncated joblib array ({len(data)} of {nbytes} bytes)")
        arr = np.frombuffer(data, dtype=dtype, count=count).copy()
        return arr.reshape(shape[::-1]).T if order == "F" else arr.reshape(shape)


def _open_maybe_compressed(path: Path) -> io.BufferedIOBase:
    head = path.read_bytes()[:6]
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if head.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if head.startswith(b"\xfd7zXZ") or head.startswith(b"]\x00\x00"):
        return lzma.open(path, "rb")
    if head[:1] == b"x" and len(head) > 1 and (head[0] * 256 + head[1]) % 31 == 0:
        return io.BytesIO(zlib.decompress(path.read_bytes()))
    return open(path, "rb")


def read_kmeans_pickle(path: str | os.PathLike) -> np.ndarray:
    """The ``cluster_centers_`` (K, D) of a joblib-pickled sklearn k-means (GSLM's ``km.bin``), as float32.

    Nothing in the pickle is executed: the estimator becomes a record of its attributes and only the centroids
    are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such k-means file")
    try:
        with _open_maybe_compressed(path) as f:
            obj = _JoblibUnpickler(f, source=str(path)).load()
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable joblib/pickle k-means model ({e})") from None
    state = obj.state if isinstance(obj, Record) else obj
    centers = state.get("cluster_centers_") if isinstance(state, dict) else None
    if not isinstance(centers, np.ndarray) or centers.ndim != 2:
        raise CheckpointError(f"{path}: k-means pickle has no 2-D cluster_centers_ (is it a fitted sklearn KMeans?)")
    return np.ascontiguousarray(centers, dtype=np.float32)
