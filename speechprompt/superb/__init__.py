"""SUPERB downstreams on an encoder with the efficient-tuning methods inside it (``speechprompt superb``).

=============================  =========================================================================
module                         what
=============================  =========================================================================
:mod:`.model`                  the weighted layer sum, the model; build and load
:mod:`.head_registry`          heads by name, with their options and the features they read
:mod:`.heads`                  utterance-level heads: classification, s3prl's utterance and multislot, AST's
:mod:`.ctc_heads`              CTC heads: linear, s3prl's BiLSTM (SUPERB ASR), fairseq's encoder CTC
:mod:`.feature_mask`           fairseq fine-tuning's span masking of the encoder's features
:mod:`.data`                   audio manifests and labels, read by a ``DataLoader``; crops, balanced sampling
:mod:`.evaluation`             metrics of a model on an audio split
:mod:`.train`                  the config and the training loop (on :mod:`speechprompt.training`)
=============================  =========================================================================
"""

from speechprompt.superb.ctc_heads import BiLSTMCTCHead, CTCHead, EncoderCTCHead
from speechprompt.superb.data import AudioSplit, load_audio_split, read_batches
from speechprompt.superb.evaluation import evaluate_superb, write_superb_report
from speechprompt.superb.feature_mask import FeatureMaskConfig
from speechprompt.superb.head_registry import HEADS, Features, build_head, register_head
from speechprompt.superb.heads import ASTHead, ClassificationHead, MultiSlotHead
from speechprompt.superb.model import TASK_TYPE, SuperbModel, WeightedLayerSum, build_superb, load_superb
from speechprompt.superb.train import SuperbConfig, SuperbDataConfig, fit_superb, train_superb

__all__ = [
    "HEADS", "TASK_TYPE", "ASTHead", "AudioSplit", "BiLSTMCTCHead", "CTCHead", "ClassificationHead",
    "EncoderCTCHead", "FeatureMaskConfig", "Features", "MultiSlotHead", "SuperbConfig", "SuperbDataConfig",
    "SuperbModel", "WeightedLayerSum", "build_head", "build_superb", "evaluate_superb", "fit_superb",
    "load_audio_split", "load_superb", "read_batches", "register_head", "train_superb", "write_superb_report",
]
