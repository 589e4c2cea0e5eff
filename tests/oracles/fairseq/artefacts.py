"""fairseq and sklearn artefacts written under numpy 1, the oracle of tests/test_fairseq_compat.py.

What the official GSLM files are: pickles made by fairseq and sklearn under numpy 1, which name
``numpy.core.multiarray`` (numpy 2 renamed it ``numpy._core``) for arrays and scalars. The test reads them with the
toolkit's safe unpickler under numpy 2.

Params (JSON), each part optional:
    dictionary: ``{"dict_txt": PATH, "lines": [...]}``: fairseq's ``Dictionary.load`` of that file and its
        ``encode_line`` of each line (``add_if_not_exist=False``);
    checkpoint: ``{"n_units": N, "cfg": {...}}``: a checkpoint as older fairseq versions save it: the config as an
        omegaconf ``DictConfig``, a fairseq ``Dictionary`` of N units in ``task_state``, a trainer's
        ``extra_state`` with numpy values, a small state dict;
    kmeans: ``{NAME: {"n": rows, "dim": D, "seed": S, "params": MiniBatchKMeans kwargs, "compress": joblib's
        compress argument, or "pickle" for a plain ``pickle.dump`` with the given ``"protocol"``}}``: sklearn's
        MiniBatchKMeans fitted on ``np.random.default_rng(S).normal(size=(n, D))`` (float32 when ``"float32"``), saved
        as GSLM saves km.bin (``joblib.dump``), or pickled.

Writes:
    dictionary.pt: ``{"symbols": [...], "encoded": [[ids] per line]}``;
    checkpoint.pt and checkpoint.ref.pt: ``{"cfg": the config as a plain dict, "symbols": the dictionary's symbols,
        "model": the state dict, "extra_state": the numpy values as Python floats, ints and tensors}``;
    NAME.bin (or NAME.pkl for a plain pickle) and kmeans.ref.pt: ``{NAME: cluster_centers_ as float32}``;
    versions.pt: numpy, sklearn, joblib, torch and fairseq versions.
"""

from __future__ import annotations

import pickle

import joblib
import numpy as np
import sklearn
import torch
from common import numpy_training_state, setup, versions
from fairseq.checkpoint_utils import torch_persistent_save
from fairseq.data.dictionary import Dictionary
from omegaconf import OmegaConf
from sklearn.cluster import MiniBatchKMeans


def plain(value):
    """numpy values (and containers of them) as Python numbers and tensors, for a weights_only reference."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def main() -> None:
    out, params = setup()
    if "dictionary" in params:
        d = Dictionary.load(params["dictionary"]["dict_txt"])
        encoded = [d.encode_line(line, add_if_not_exist=False).tolist() for line in params["dictionary"]["lines"]]
        torch.save({"symbols": list(d.symbols), "encoded": encoded}, out / "dictionary.pt")

    if "checkpoint" in params:
        spec = params["checkpoint"]
        d = Dictionary()
        for u in range(spec["n_units"]):
            d.add_symbol(str(u))
        extra_state = numpy_training_state()
        model = {"x": torch.ones(1), "w": torch.arange(6.0).view(2, 3)}
        torch_persistent_save({"cfg": OmegaConf.create(spec["cfg"]), "model": model,
                               "task_state": {"dictionaries": [d]}, "extra_state": extra_state},
                              str(out / "checkpoint.pt"))
        torch.save({"cfg": spec["cfg"], "symbols": list(d.symbols), "model": model, "extra_state": plain(extra_state)},
                   out / "checkpoint.ref.pt")

    centers = {}
    for name, spec in params.get("kmeans", {}).items():
        x = np.random.default_rng(spec["seed"]).normal(size=(spec["n"], spec["dim"]))
        if spec.get("float32"):
            x = x.astype(np.float32)
        km = MiniBatchKMeans(**spec["params"]).fit(x)
        if spec["compress"] == "pickle":
            with open(out / f"{name}.pkl", "wb") as f:
                pickle.dump(km, f, protocol=spec.get("protocol", pickle.DEFAULT_PROTOCOL))
        else:
            compress = spec["compress"]
            joblib.dump(km, out / f"{name}.bin", compress=tuple(compress) if isinstance(compress, list) else compress)
        centers[name] = torch.from_numpy(km.cluster_centers_.astype(np.float32))
    if centers:
        torch.save(centers, out / "kmeans.ref.pt")

    torch.save({**versions(), "sklearn": sklearn.__version__, "joblib": joblib.__version__}, out / "versions.pt")


if __name__ == "__main__":
    main()
