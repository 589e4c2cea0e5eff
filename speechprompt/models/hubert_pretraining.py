"""HuBERT's masked prediction (Hsu et al., 2021), computed as fairseq's ``HubertModel.forward`` and ``hubert``
criterion compute it, on our :class:`~speechprompt.models.hubert.HubertModel`::

    mask = compute_mask_indices((B, F), None, 0.8, 10, min_masks=2, rngs=[np.random.default_rng(...)] * B)
    out = masked_prediction(model, source, targets, torch.from_numpy(mask), logit_temp=0.1)
    loss_sum, sample_size, stats = pretraining_loss(out, pred_masked_weight=1.0, pred_nomask_weight=0.0,
                                                    features_pen_weight=10.0)

1. **Masks** (:func:`compute_mask_indices`, fairseq's function of the same name with HuBERT's arguments): each row
   draws ``num_mask = max(min_masks, int(mask_prob * F / mask_length + u))`` span starts without replacement,
   spans of ``mask_length`` frames may overlap, and every row of a batch is then cut down to the smallest number of
   masked frames. About half of the frames end up masked at ``mask_prob=0.8``.
2. **Forward** (:func:`masked_prediction`): front end -> ``features_pen`` (the mean squared conv output) ->
   ``layer_norm`` -> ``post_extract_proj`` -> ``dropout_input`` -> masked frames replaced by ``mask_emb`` ->
   transformer (with layer drop) -> ``final_proj`` of the masked (and unmasked) frames, split per label set when
   ``untie_final_proj``.
3. **Logits**: cosine similarity between a projected frame and every embedding of its label set
   (``label_embs_concat``, through ``target_glu`` if any), divided by ``logit_temp``. fairseq writes this as the
   positive embedding followed by all of them with the duplicate set to ``-inf``; that is the same softmax as one
   logit per class with the target class as the label, which is how it is computed here (a normalised matmul, not
   a ``(classes, frames, dim)`` expansion).
4. **Loss** (:func:`pretraining_loss`): summed cross entropy over masked frames times ``pred_masked_weight``, plus
   unmasked frames times ``pred_nomask_weight``, plus ``features_pen_weight * features_pen * sample_size``; the
   gradient is normalised by ``sample_size`` (the frames whose loss has a non-zero weight).

Targets are dictionary indices: a k-means label ``u`` is ``u + 4`` in fairseq's ``dict.km.txt`` dictionary, whose 4
special symbols are never targets but are in every softmax, as in fairseq (``label_embs_concat`` of
``hubert_base_ls960`` has 504 rows for 500 clusters).

:func:`fairseq_hubert_cfg` and :func:`save_hubert_checkpoint` write what fairseq's trainer writes, so that
``fairseq.checkpoint_utils.load_model_ensemble_and_task`` builds the model, and :func:`~speechprompt.models.
hubert.load_hubert` and every feature reader read it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechprompt.dictionary import Dictionary
from speechprompt.errors import SpeechPromptError
from speechprompt.fairseq_compat import save_fairseq_checkpoint
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.wav2vec2 import ConvFeatureExtractor

# Fields of our HubertConfig that fairseq's HubertConfig has too (same names, same meaning).
FAIRSEQ_FIELDS = frozenset({
    "extractor_mode", "conv_feature_layers", "conv_bias", "encoder_layers", "encoder_embed_dim",
    "encoder_ffn_embed_dim", "encoder_attention_heads", "activation_fn", "layer_norm_first", "conv_pos",
    "conv_pos_groups", "dropout", "attention_dropout", "activation_dropout", "dropout_input", "feature_grad_mult",
    "final_dim", "untie_final_proj", "target_glu",
})


class MaskingError(SpeechPromptError):
    """A sequence too short to mask as asked (fairseq fails on it in the middle of training)."""


# --------------------------------------------------------------------------------------------------------------
# Masks


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: np.ndarray | Tensor | None,
    mask_prob: float,
    mask_length: int,
    min_masks: int,
    rngs: Sequence[np.random.Generator],
    require_same_masks: bool = True,
) -> np.ndarray:
    """Random span masks, as fairseq's ``compute_mask_indices`` with ``mask_type="static"``, ``no_overlap=False``
    (HuBERT's settings) and one random generator per row.

    fairseq draws each row from ``np.random.default_rng(seed_i)``; given the same generators this returns fairseq's
    masks exactly, draw for draw: per row a uniform number for the probabilistic rounding of the span count, the
    span starts without replacement, and, to equalise the rows, a choice of frames made with the *last* row's
    generator (fairseq's loop variable).

    Args:
        shape: ``(B, F)`` rows and frames.
        padding_mask: ``(B, F)`` True at padded frames (they are never masked), or ``None``.
        mask_prob: the expected fraction of frames that start a span, times ``mask_length`` (0.8 in HuBERT).
        mask_length: frames per span (10).
        min_masks: spans per row at least (fairseq's HuBERT passes 2).
        rngs: one generator per row.
        require_same_masks: cut every row down to the smallest number of masked frames in the batch.

    Returns:
        ``(B, F)`` bool, True at masked frames.

    Raises:
        MaskingError: a row would be masked entirely (too short for ``mask_length`` and ``min_masks``).
    """
    bsz, all_sz = shape
    if len(rngs) != bsz:
        raise ValueError(f"need one generator per row: {bsz} rows, {len(rngs)} generators")
    if isinstance(padding_mask, Tensor):
        padding_mask = padding_mask.cpu().numpy()
    mask = np.zeros((bsz, all_sz), dtype=bool)
    spans: list[np.ndarray] = []
    rng = rngs[0]
    for i in range(bsz):
        rng = rngs[i]
        sz = all_sz - int(padding_mask[i].sum()) if padding_mask is not None else all_sz
        num_mask = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
        min_len = mask_length
        if sz - min_len <= num_mask:
            min_len = sz - num_mask - 1
        starts = rng.choice(sz - min_len, num_mask, replace=False)
        idx = (starts[:, None] + np.arange(mask_length)[None, :]).reshape(-1)  # every frame of every span
        idx = np.unique(idx[idx < sz])
        if len(idx) >= sz:
            raise MaskingError(f"a row of {sz} frames would be masked entirely ({num_mask} spans of {mask_length}); "
                               "use longer crops (min_sample_size) or a shorter mask_length")
        spans.append(idx)
    target_len = min(len(s) for s in spans) if require_same_masks else None
    for i, idx in enumerate(spans):
        if target_len is not None and len(idx) > target_len:
            idx = rng.choice(idx, target_len, replace=False)  # `rng` is the last row's, as in fairseq
        mask[i, idx] = True
    return mask


def min_maskable_frames(mask_prob: float, mask_length: int, min_masks: int = 2) -> int:
    """The fewest frames a row needs so that :func:`compute_mask_indices` can never mask all of it: ``num_mask``
    spans cover at most ``num_mask * mask_length < (mask_prob F / mask_length + 1) mask_length`` frames."""
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    # Rounded first: 10 / (1 - 0.8) is 50.00000000000001 in floating point.
    return max(math.ceil(round(mask_length / (1.0 - mask_prob), 9)), min_masks * mask_length + 1)


# --------------------------------------------------------------------------------------------------------------
# Forward and loss


@dataclass
class PretrainingOutput:
    """What :func:`masked_prediction` computes: per label set, the logits of the selected frames and their targets.

    Attributes:
        logits_masked: per label set ``(S_m, C_k)`` float32 logits of the masked frames (``[]`` if skipped).
        targets_masked: per label set ``(S_m,)`` target class indices.
        logits_unmasked: the same for the unmasked frames ``(S_u, C_k)`` (``[]`` if skipped).
        targets_unmasked: ``(S_u,)`` per label set.
        features_pen: the mean squared front-end output (fairseq's ``features_pen``), a scalar.
    """

    logits_masked: list[Tensor]
    targets_masked: list[Tensor]
    logits_unmasked: list[Tensor]
    targets_unmasked: list[Tensor]
    features_pen: Tensor


def masked_prediction(
    model: HubertModel,
    source: Tensor,
    targets: Sequence[Tensor],
    mask: Tensor,
    padding_mask: Tensor | None = None,
    logit_temp: float = 0.1,
    layerdrop: float = 0.0,
    skip_masked: bool = False,
    skip_nomask: bool = False,
) -> PretrainingOutput:
    """fairseq's ``HubertModel.forward`` with the masks given (see the module docstring).

    Args:
        model: a HuBERT with its pretraining heads and label embeddings.
        source: ``(B, T)`` waveforms (normalised first if the task says ``normalize``).
        targets: per label set ``(B, F)`` class indices, already at the model's frame rate (fairseq's
            ``forward_targets`` sampling); the front end's output is trimmed to these ``F`` frames.
        mask: ``(B, F)`` bool, the frames to replace by ``mask_emb`` (:func:`compute_mask_indices`).
        padding_mask: ``(B, F)`` bool, True at padded frames (excluded from the loss); ``None``: no padding.
        logit_temp: the cosine similarities are divided by this.
        layerdrop: fairseq's ``encoder_layerdrop`` (training mode only).
        skip_masked: do not compute the masked frames' logits.
        skip_nomask: do not compute the unmasked frames' logits.
    """
    if model.final_proj is None or model.label_embs_concat is None or model.mask_emb is None:
        raise ValueError("masked prediction needs the pretraining heads, the label embeddings and mask_emb")
    if len(targets) != len(model.num_classes):
        raise ValueError(f"{len(targets)} target sets for a model of {len(model.num_classes)} label sets")
    frames = mask.shape[1]
    features = model.frontend_features(source)  # (B, T', C), T' >= F
    if features.shape[1] < frames:
        raise ValueError(f"the front end gives {features.shape[1]} frames, the targets ask for {frames}")
    features = features[:, :frames]  # (B, F, C)
    features_pen = features.float().pow(2).mean()
    x = model.layer_norm(features) if model.layer_norm is not None else features
    if model.post_extract_proj is not None:
        x = model.post_extract_proj(x)  # (B, F, D)
    x = model.dropout_input(x)
    x = torch.where(mask[..., None], model.mask_emb.to(x.dtype), x)  # (B, F, D)
    hidden = model.encoder(x, padding_mask, layerdrop=layerdrop)
    x = model.final_features(hidden)  # (B, F, D)

    real = ~padding_mask if padding_mask is not None else torch.ones_like(mask)
    label_embs = model.label_embs_concat.split(model.num_classes, dim=0)  # per label set (C_k, final_dim)

    def logits_of(selected: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        proj = model.final_proj(x[selected])  # (S, final_dim * n_proj)
        projs = proj.chunk(len(targets), dim=-1) if model.cfg.untie_final_proj else [proj] * len(targets)
        logits, picked = [], []
        for proj_k, emb_k, target_k in zip(projs, label_embs, targets):
            if model.target_glu is not None:
                emb_k = model.target_glu(emb_k)
            cos = F.normalize(proj_k.float(), dim=-1, eps=1e-8) @ F.normalize(emb_k.float(), dim=-1, eps=1e-8).T
            logits.append(cos / logit_temp)  # (S, C_k)
            picked.append(target_k[selected])  # (S,)
        return logits, picked

    logits_m, targets_m = logits_of(mask & real) if not skip_masked else ([], [])
    logits_u, targets_u = logits_of(~mask & real) if not skip_nomask else ([], [])
    return PretrainingOutput(logits_m, targets_m, logits_u, targets_u, features_pen)


def pretraining_loss(
    out: PretrainingOutput,
    pred_masked_weight: float = 1.0,
    pred_nomask_weight: float = 0.0,
    features_pen_weight: float = 10.0,
) -> tuple[Tensor, int, dict[str, float]]:
    """fairseq's ``hubert`` criterion: the summed loss, its ``sample_size`` and what it logs.

    Returns:
        ``loss_sum`` (a scalar to normalise by ``sample_size``), ``sample_size`` (masked frames if
        ``pred_masked_weight > 0``, plus unmasked frames if ``pred_nomask_weight > 0``), and sums to log:
        ``loss_m``/``loss_u`` (cross entropy summed over label sets and frames), ``correct_m``/``correct_u`` and
        ``count_m``/``count_u`` (frames whose highest logit is the target, of the first label set, as fairseq
        counts), ``features_pen`` (times ``sample_size``, so that sums over batches average correctly).
    """
    loss: Tensor = out.features_pen.new_zeros(())
    sample_size = 0
    stats: dict[str, float] = {}
    for tag, logits, targets, weight in (("m", out.logits_masked, out.targets_masked, pred_masked_weight),
                                         ("u", out.logits_unmasked, out.targets_unmasked, pred_nomask_weight)):
        if not logits:
            continue
        ce = sum(F.cross_entropy(lg, t, reduction="sum") for lg, t in zip(logits, targets))
        stats[f"loss_{tag}"] = float(ce.detach())
        with torch.no_grad():
            stats[f"correct_{tag}"] = float((logits[0].argmax(-1) == targets[0]).sum()) if len(targets[0]) else 0.0
        stats[f"count_{tag}"] = float(len(targets[0]))
        if weight > 0:
            loss = loss + weight * ce
            sample_size += len(targets[0])
    if features_pen_weight:
        loss = loss + features_pen_weight * out.features_pen.float() * sample_size
    stats["features_pen"] = float(out.features_pen.detach()) * sample_size
    return loss, sample_size, stats


# --------------------------------------------------------------------------------------------------------------
# Initialisation


@torch.no_grad()
def init_like_fairseq(model: HubertModel) -> None:
    """fairseq's initialisation of a HuBERT trained from scratch: BERT's ``N(0, 0.02)`` for every Linear of the
    transformer (biases zero; fairseq applies ``init_bert_params`` to its encoder), and He-normal conv weights in the
    waveform front end (``ConvFeatureExtractionModel``). Everything else keeps its constructor's init, as there."""
    for module in model.encoder.layers.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, 0.02)
            if module.bias is not None:
                module.bias.zero_()
    if isinstance(model.feature_extractor, ConvFeatureExtractor):
        for module in model.feature_extractor.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight)


# --------------------------------------------------------------------------------------------------------------
# fairseq's checkpoint format


def fairseq_hubert_cfg(model_cfg: HubertConfig, label_rate: float, pretraining: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` section of a fairseq ``hubert`` checkpoint for ``model_cfg``.

    fairseq's fields come first (``pretraining`` adds its masking and loss settings: ``mask_prob``, ``logit_temp``,
    ...). A field of ours that fairseq lacks is written only where it differs from HuBERT's: a model that needs one
    (the fbank front end) is not a fairseq architecture, and fairseq, which drops keys it does not know, then fails
    on its state dict instead of building another model.
    """
    ours = {f.name: getattr(model_cfg, f.name) for f in fields(HubertConfig)}
    default = HubertConfig()
    out: dict[str, Any] = {"_name": "hubert", "label_rate": float(label_rate), "layer_type": "transformer"}
    for name, value in ours.items():
        if name in FAIRSEQ_FIELDS or value != getattr(default, name):
            out[name] = value.value if hasattr(value, "value") else value
    out.update(pretraining)
    return out


def is_fairseq_architecture(model_cfg: HubertConfig) -> bool:
    """Whether fairseq's ``HubertModel`` can be built from this config (every field of ours it lacks at HuBERT's
    value)."""
    default = HubertConfig()
    return all(getattr(model_cfg, f.name) == getattr(default, f.name)
               for f in fields(HubertConfig) if f.name not in FAIRSEQ_FIELDS)


def save_hubert_checkpoint(
    path: str | os.PathLike,
    model: HubertModel,
    dictionaries: Sequence[Dictionary],
    cfg: Mapping[str, Any],
    num_updates: int = 0,
    extra_state: Mapping[str, Any] | None = None,
) -> None:
    """Write ``model`` as fairseq's trainer writes a HuBERT: ``cfg`` (plain dicts: ``model`` as
    :func:`fairseq_hubert_cfg`, ``task``, ``criterion`` ...), the state dict under fairseq's names and the label
    dictionaries in ``task_state`` as fairseq ``Dictionary`` objects."""
    if [len(d) for d in dictionaries] != list(model.num_classes):
        raise ValueError(f"dictionaries of {[len(d) for d in dictionaries]} symbols for label embeddings of "
                         f"{list(model.num_classes)} rows")
    save_fairseq_checkpoint(path, model.state_dict(), dict(cfg), task_state={"dictionaries": list(dictionaries)},
                            extra_state=dict(extra_state or {}), num_updates=num_updates)
