"""What every fairseq oracle script shares: its command line, a quiet fairseq, and how references are written.

Only fairseq, torch, numpy and omegaconf (and, for ``km.bin``, sklearn/joblib) are imported by the oracle scripts,
never ``speechprompt``: they run in ``.venv-fairseq`` (numpy<2), not in the toolkit's environment. References are
written with ``torch.save`` as tensors, numbers, strings, lists and dicts only, which the tests read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch


def setup() -> tuple[Path, dict[str, Any]]:
    """Parse ``SCRIPT OUT_DIR JSON_PARAMS``; one torch thread, fairseq's INFO logging off.

    Returns:
        The output directory (it exists) and the parameters.
    """
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR JSON_PARAMS")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny models, and two CPU cores shared by the whole suite
    logging.basicConfig(level=logging.WARNING)
    for name in ("fairseq", "fairseq_cli"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return out, json.loads(sys.argv[2])


def versions() -> dict[str, str]:
    """The versions of the oracle environment's libraries, for the tests to record or check."""
    import fairseq

    return {"numpy": np.__version__, "torch": str(torch.__version__), "fairseq": fairseq.__version__}


def numpy_training_state() -> dict[str, Any]:
    """An ``extra_state`` as fairseq's trainer saves it, with the numpy values real checkpoints carry (the best
    validation loss is a numpy float64 and meters keep numpy scalars), so that a checkpoint written here pickles
    ``numpy.core.multiarray`` paths, as every checkpoint saved under numpy 1 does."""
    return {
        "train_iterator": {"epoch": 3, "iterations_in_epoch": 0, "shuffle": True},
        "val_loss": np.float64(4.25),
        "best": np.float64(4.125),
        "metrics": {"train": [("loss", np.float32(4.5)), ("nupdates", np.int64(1200))]},
        "previous_training_time": 123.5,
        "loss_history": np.array([5.0, 4.5, 4.25], dtype=np.float64),
    }
