"""SUPERB downstreams on an encoder with the efficient-tuning methods inside it (``speechprompt superb``).

=============================  =========================================================================
module                         what
=============================  =========================================================================
:mod:`.model`                  the weighted layer sum, the heads, the model; build and load
:mod:`.data`                   audio manifests and labels, read by a ``DataLoader``; unreadable files
:mod:`.evaluation`             metrics of a model on an audio split
:mod:`.train`                  the config and the training loop (on :mod:`speechprompt.training`)
=============================  =========================================================================
"""

from speechprompt.superb.data import AudioSplit, load_audio_split, read_batches
from speechprompt.superb.evaluation import evaluate_superb
from speechprompt.superb.model import (
    TASK_TYPE,
    ClassificationHead,
    CTCHead,
    HeadKind,
    SuperbModel,
    WeightedLayerSum,
    build_superb,
    load_superb,
)
from speechprompt.superb.train import SuperbConfig, SuperbDataConfig, fit_superb, train_superb

__all__ = [
    "TASK_TYPE", "AudioSplit", "CTCHead", "ClassificationHead", "HeadKind", "SuperbConfig", "SuperbDataConfig",
    "SuperbModel", "WeightedLayerSum", "build_superb", "evaluate_superb", "fit_superb", "load_audio_split",
    "load_superb", "read_batches", "train_superb",
]
