"""fairseq reads a HuBERT that ``speechprompt pretrain-hubert`` wrote: the oracle of tests/test_pretrain_hubert.py.

Run by ``tests/oracle.py`` as ``python hubert_pretraining.py OUT_DIR JSON`` in the fairseq environment; imports only
fairseq, torch, numpy and omegaconf.

Params (JSON):
    checkpoint (optional): a checkpoint written by ``pretrain-hubert``, loaded the way a fairseq user loads one:
        ``checkpoint_utils.load_model_ensemble_and_task`` (the task from ``cfg.task``, its label dictionaries from
        ``task_state``, the model built from ``cfg.model`` by ``HubertModel.build_model`` and loaded with
        ``strict=True``), with fairseq's ``Dictionary`` allowed in ``torch.load`` (torch >= 2.6 loads
        ``weights_only``; every HuBERT checkpoint holds that class).
    inputs (with checkpoint): a ``torch.save``d ``{"source": (B, T), "targets": [(B, L)] label-rate class indices,
        "mask": (B, F)}``.
    layers (with checkpoint): 1-based output layers to extract (the final output always too).
    masks: calls of fairseq's ``compute_mask_indices``: ``{"shape": [B, F], "mask_prob", "mask_length", "seed",
        "epoch", "indices": [..B ints]}`` (HuBERT's other arguments: static spans, ``min_masks=2``, overlaps allowed).

Writes ``ref.pt``: ``{"masks": [(B, F) bool]}`` and, with a checkpoint, ``"model_class"``, ``"num_classes"``,
``"features": {"1", ..., "final": (B, F', D)}``, ``"loss"``, ``"sample_size"``, ``"logging"`` (the criterion's
logging outputs) and ``"logits_m": [(S, 1 + C)]``. The loss is fairseq's ``hubert`` criterion on the model in eval
mode (no dropout, no layer drop) with the given masks in place of its random ones.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import fairseq.models.hubert.hubert as fairseq_hubert
import numpy as np
import torch
from fairseq import checkpoint_utils
from fairseq.criterions.hubert_criterion import HubertCriterion
from fairseq.data.data_utils import compute_mask_indices
from fairseq.data.dictionary import Dictionary


def read_checkpoint(path: str, inputs: dict, layers: list[int]) -> dict:
    """Load ``path`` as a fairseq user does; its layer outputs, and the criterion's loss on ``inputs``."""
    torch.serialization.add_safe_globals([Dictionary])
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0].eval()
    ref: dict = {"model_class": type(model).__name__, "num_classes": list(model.num_classes),
                 "label_rate": float(cfg.model.label_rate), "features": {}}
    with torch.no_grad():
        for layer in layers:
            x, _ = model.extract_features(inputs["source"], padding_mask=None, mask=False, output_layer=layer)
            ref["features"][str(layer)] = x
        ref["features"]["final"], _ = model.extract_features(inputs["source"], padding_mask=None, mask=False)

        given = inputs["mask"].numpy()

        def fixed_mask(shape, *args, **kwargs) -> np.ndarray:
            assert tuple(shape) == given.shape, (shape, given.shape)
            return given

        fairseq_hubert.compute_mask_indices = fixed_mask  # the test's masks instead of fairseq's random ones
        criterion = HubertCriterion(task, pred_masked_weight=1.0, pred_nomask_weight=0.5, loss_weights=[10.0])
        sample = {"net_input": {"source": inputs["source"],
                                "padding_mask": torch.zeros_like(inputs["source"], dtype=torch.bool)},
                  "target_list": inputs["targets"], "id": torch.arange(len(inputs["source"]))}
        loss, sample_size, logging_output = criterion(model, sample)
        net = model(target_list=inputs["targets"], **sample["net_input"])
    ref.update(loss=float(loss), sample_size=int(sample_size), logging=logging_output,
               logits_m=[x.float() for x in net["logit_m_list"]])
    return ref


def main() -> None:
    out, params = Path(sys.argv[1]), json.loads(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("fairseq").setLevel(logging.WARNING)

    ref: dict = {}
    if "checkpoint" in params:
        ref.update(read_checkpoint(params["checkpoint"], torch.load(params["inputs"]), params["layers"]))
    ref["masks"] = []
    for spec in params["masks"]:
        mask = compute_mask_indices(tuple(spec["shape"]), None, spec["mask_prob"], spec["mask_length"], "static", 0.0,
                                    min_masks=2, no_overlap=False, seed=spec["seed"], epoch=spec["epoch"],
                                    indices=torch.tensor(spec["indices"]))
        ref["masks"].append(torch.from_numpy(mask))
    torch.save(ref, out / "ref.pt")


if __name__ == "__main__":
    main()
