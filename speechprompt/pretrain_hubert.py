"""Pretrain a HuBERT by masked prediction of cluster labels (one iteration; one CPU, one GPU or torchrun).

HuBERT (Hsu et al., 2021) is trained in iterations. Each predicts, at masked frames, the k-means cluster of every
frame, and each iteration's clusters come from better features than the last:

  iteration 1  labels = k-means of MFCC frames (100 Hz, label_rate=100)
      speechprompt kmeans  --manifest train.tsv --features mfcc --k 100 --out km_mfcc.safetensors
      speechprompt prepare --manifest train.tsv --features mfcc --kmeans km_mfcc.safetensors --out it1   (no --dedup)
      speechprompt prepare --manifest dev.tsv   --features mfcc --kmeans km_mfcc.safetensors --out it1
      speechprompt pretrain-hubert --config C.yaml train=train.tsv train_labels=it1/train.units dev=dev.tsv \\
          dev_labels=it1/dev.units n_units=100 label_rate=100 run_dir=exp/hubert_it1
  iteration 2  labels = k-means of a layer of the iteration-1 model (50 Hz, label_rate=50)
      speechprompt kmeans  --manifest train.tsv --features hubert --checkpoint exp/hubert_it1/checkpoint_best.pt \\
          --layer L --k 500 --out km_it1.safetensors
      speechprompt prepare ... --features hubert --checkpoint exp/hubert_it1/checkpoint_best.pt --layer L ...
      speechprompt pretrain-hubert --config C.yaml ... n_units=500 label_rate=50 run_dir=exp/hubert_it2

The model's frames are 50 Hz (320 samples); 100 Hz labels are read every second frame, as fairseq's
``label_rate`` handling does. The computation is fairseq's (masks, cosine logits over label embeddings, the
``hubert`` criterion with its feature penalty): see speechprompt.models.hubert_pretraining and speechprompt.hubert_data.
``frontend=conv`` is the published architecture on raw waveforms (``model=base`` or ``large`` for GPUs);
``frontend=fbank`` replaces the conv stack by stacked log-mel frames (MelHuBERT's light front end, for small
compute).

The run directory receives ``config.yaml``, ``log.csv`` (masked-frame loss and accuracy, dev loss),
``checkpoint_last.pt`` / ``checkpoint_best.pt`` (best dev loss) in fairseq's format with ``dict.<label>.txt``,
``train_state.pt`` (exact resume), ``learning_curves.png`` and ``metrics.json``. A conv-front-end checkpoint loads in
fairseq (``checkpoint_utils.load_model_ensemble_and_task``, with fairseq's ``Dictionary`` allowed in ``torch.load``)
and in ``speechprompt`` (``--features hubert --checkpoint``, SUPERB, every tuning method); an fbank one in
``speechprompt`` only. A run killed at any point resumes where it stopped (resume=auto) to the weights of an
uninterrupted run; under ``torchrun --nproc_per_node N`` each process takes 1/N of every update's utterances.

Example:
  speechprompt pretrain-hubert --config recipes/pretrain_hubert/conf/tiny.yaml train=... train_labels=...
  torchrun --nproc_per_node 8 -m speechprompt.cli pretrain-hubert --config recipes/pretrain_hubert/conf/base.yaml ...
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch

from speechprompt.config import to_dict
from speechprompt.devices import torch_threads
from speechprompt.dictionary import Dictionary
from speechprompt.hubert_data import BatchMaker, LabeledAudio, Masking, StepBatches, dev_batches, share
from speechprompt.models.hubert import HubertConfig, HubertModel
from speechprompt.models.hubert_pretraining import (
    fairseq_hubert_cfg,
    init_like_fairseq,
    masked_prediction,
    pretraining_loss,
    save_hubert_checkpoint,
)
from speechprompt.models.transformer import set_activation_checkpointing
from speechprompt.pretrain_hubert_config import PretrainHubertConfig
from speechprompt.rng import seed_everything
from speechprompt.training.config import PRETRAIN_KEYS_MAY_CHANGE
from speechprompt.training.distributed import Dist, distributed
from speechprompt.training.ema import maybe_averaged
from speechprompt.training.optim import Updater
from speechprompt.training.precision import MixedPrecision
from speechprompt.training.pretraining import Clock, add_config_arguments, finish, resume, run_command, step_loader
from speechprompt.training.run import RunDir

logger = logging.getLogger(__name__)

KIND = "pretrain-hubert"
STATE_VERSION = 1

# Config keys that may change when a run is resumed: they do not change what the next update computes.
MAY_CHANGE = PRETRAIN_KEYS_MAY_CHANGE

# --------------------------------------------------------------------------------------------------------------
# Evaluation


_STAT_KEYS = ("loss", "sample_size", "loss_m", "correct_m", "count_m", "loss_u", "correct_u", "count_u",
              "features_pen")


def _summary(totals: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Means from summed statistics (ordered as :data:`_STAT_KEYS`): loss per sample-size term, masked and unmasked
    cross entropy per frame (nats, summed over label sets) and accuracy, the feature penalty."""
    t = dict(zip(_STAT_KEYS, totals.tolist()))
    out = {f"{prefix}loss": t["loss"] / max(t["sample_size"], 1),
           f"{prefix}loss_m": t["loss_m"] / max(t["count_m"], 1),
           f"{prefix}acc_m": t["correct_m"] / max(t["count_m"], 1),
           f"{prefix}features_pen": t["features_pen"] / max(t["sample_size"], 1)}
    if t["count_u"]:
        out[f"{prefix}loss_u"] = t["loss_u"] / t["count_u"]
        out[f"{prefix}acc_u"] = t["correct_u"] / t["count_u"]
    return out


def _stats_vector(loss: torch.Tensor, sample_size: int, stats: dict[str, float]) -> torch.Tensor:
    values = {"loss": float(loss.detach()), "sample_size": float(sample_size), **stats}
    return torch.tensor([values.get(k, 0.0) for k in _STAT_KEYS], dtype=torch.float64)


@torch.no_grad()
def evaluate(model: HubertModel, maker: BatchMaker, batches: list[Any], cfg: PretrainHubertConfig,
             device: torch.device, d: Dist) -> dict[str, float]:
    """The dev loss and masked-frame accuracy with fixed crops and masks.

    ``batches`` are global batches (:func:`~speechprompt.hubert_data.dev_batches` of the update's size); each
    process takes its share of every one in micro-batches, as in training, so that the crops and masks, and the
    result, do not depend on the number of processes.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(len(_STAT_KEYS), dtype=torch.float64)
    for rows, crop_seed, mask_seed in batches:
        batch = maker.make(rows, share(len(rows), d.rank, d.world_size), crop_seed, mask_seed)
        for micro in batch.split(cfg.grad_accum):
            out = masked_prediction(model, micro.source.to(device), [t.to(device) for t in micro.targets],
                                    micro.mask.to(device), logit_temp=cfg.logit_temp, skip_nomask=cfg.skip_nomask)
            loss, n, stats = pretraining_loss(out, cfg.pred_masked_weight, cfg.pred_nomask_weight,
                                              cfg.features_pen_weight)
            totals += _stats_vector(loss, n, stats)
    totals = d.all_reduce(totals.to(device)).cpu()
    model.train(was_training)
    return _summary(totals, "dev_")


# --------------------------------------------------------------------------------------------------------------
# The run


def _checkpoint_cfg(cfg: PretrainHubertConfig, model_cfg: HubertConfig) -> dict[str, Any]:
    """The ``cfg`` of the fairseq checkpoints: fairseq's sections, resolved, and this run's config."""
    pretraining = {
        "mask_prob": cfg.mask_prob, "mask_length": cfg.mask_length, "mask_selection": "static", "mask_other": 0.0,
        "no_mask_overlap": False, "mask_min_space": 1, "mask_channel_prob": 0.0, "logit_temp": cfg.logit_temp,
        "skip_masked": False, "skip_nomask": cfg.skip_nomask, "encoder_layerdrop": cfg.encoder_layerdrop,
        "checkpoint_activations": cfg.activation_checkpointing,
    }
    names = cfg.label_names()
    return {
        "_name": None,
        "common": {"seed": cfg.seed, "fp16": cfg.precision.value == "fp16", "bf16": cfg.precision.value == "bf16",
                   "tpu": False},
        "model": fairseq_hubert_cfg(model_cfg, cfg.label_rate, pretraining),
        "task": {
            "_name": "hubert_pretraining", "data": str(Path(cfg.train).resolve().parent), "fine_tuning": False,
            "labels": names, "label_dir": str(Path(cfg.train_labels[0]).resolve().parent),
            "label_rate": cfg.label_rate, "sample_rate": 16000, "normalize": cfg.task_normalize,
            "enable_padding": False, "max_keep_size": None, "max_sample_size": cfg.max_sample_size,
            "min_sample_size": cfg.min_sample_size, "single_target": False, "random_crop": True, "pad_audio": False,
        },
        "criterion": {"_name": "hubert", "pred_masked_weight": cfg.pred_masked_weight,
                      "pred_nomask_weight": cfg.pred_nomask_weight, "loss_weights": [cfg.features_pen_weight],
                      "log_keys": []},
        "optimization": {"max_update": cfg.max_steps, "lr": [cfg.lr], "clip_norm": cfg.clip_norm},
        "optimizer": {"_name": "adam", "adam_betas": list(cfg.betas), "adam_eps": cfg.adam_eps,
                      "weight_decay": cfg.weight_decay},
        "lr_scheduler": {"_name": cfg.schedule, "warmup_updates": cfg.warmup_steps},
        "speechprompt": {"pretrain_hubert_config": to_dict(cfg)},
    }


def pretrain_hubert(cfg: PretrainHubertConfig) -> dict[str, Any]:
    """Run (or resume) one pretraining iteration as ``cfg`` says. Returns the final metrics (also in
    ``run_dir/metrics.json``)."""
    with torch_threads(cfg.threads), distributed(cfg.device) as (d, device), \
            RunDir(cfg.run_dir, KIND, cfg, STATE_VERSION, MAY_CHANGE, cfg.resume, d) as run:
        return _pretrain(cfg, run, d, device)


def _pretrain(cfg: PretrainHubertConfig, run: RunDir, d: Dist, device: torch.device) -> dict[str, Any]:
    model_cfg = cfg.model_config()
    dictionaries = [Dictionary.for_units(k) for k in cfg.n_units]
    train_data = LabeledAudio(cfg.train, cfg.train_labels, cfg.n_units, cfg.label_rate, cfg.min_sample_size,
                              cfg.task_normalize)
    dev_data = LabeledAudio(cfg.dev, cfg.dev_labels, cfg.n_units, cfg.label_rate, cfg.min_sample_size,
                            cfg.task_normalize)

    seed_everything(cfg.seed)  # the same initial weights on every process
    model = HubertModel(model_cfg, num_classes=[len(x) for x in dictionaries])
    init_like_fairseq(model)
    model.to(device)
    if cfg.activation_checkpointing:
        set_activation_checkpointing(model)
    seed_everything(cfg.seed + d.rank)  # dropout differs between processes; every RNG is part of the saved state
    optim = cfg.optim()
    updater = Updater(model.parameters(), optim, MixedPrecision(cfg.precision, device), d, cfg.ema_decay)
    pos = resume(run, cfg, model, updater)

    masking = Masking(cfg.mask_prob, cfg.mask_length)
    makers = [BatchMaker(data, model.num_frames, model.downsample, masking, cfg.max_sample_size)
              for data in (train_data, dev_data)]
    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    batches = StepBatches(makers[0], global_batch, cfg.seed, d.rank, d.world_size)
    dev = dev_batches(makers[1], global_batch, cfg.seed)
    ckpt_cfg = _checkpoint_cfg(cfg, model_cfg)
    if d.main:
        for name, dictionary in zip(cfg.label_names(), dictionaries):
            dictionary.save(run.path / f"dict.{name}.txt")

    def save_checkpoint(name: str, metrics: dict[str, Any]) -> None:
        """A fairseq checkpoint of the weights (the moving average when there is one); main process."""
        save_hubert_checkpoint(run.path / name, model, dictionaries, ckpt_cfg, num_updates=pos.step,
                               extra_state={"speechprompt": {"step": pos.step, **metrics}})

    def save() -> None:
        """checkpoint_last.pt, then the training state, whose atomic rename commits the step."""
        clock.lap()
        if d.main:
            with maybe_averaged(updater.ema):
                save_checkpoint("checkpoint_last.pt", {})
        run.save_state(position=dataclasses.asdict(pos), model=model.state_dict(), updater=updater.state_dict())

    def evaluate_dev() -> dict[str, float]:
        """Dev loss (of the moving average when there is one); a new best is saved as checkpoint_best.pt."""
        with maybe_averaged(updater.ema):
            metrics = evaluate(model, makers[1], dev, cfg, device, d)
            improved = metrics["dev_loss"] < pos.best_dev_loss
            if improved:
                pos.best_dev_loss, pos.best_step = metrics["dev_loss"], pos.step
                if d.main:
                    save_checkpoint("checkpoint_best.pt", metrics)
        log.log(pos.step, **metrics)
        if d.main:
            logger.info("step %d: dev loss %.4f, masked-frame accuracy %.3f%s", pos.step, metrics["dev_loss"],
                        metrics["dev_acc_m"], " (best)" if improved else "")
        return metrics

    # Update s takes global batch s, cropped and masked from (seed, s) alone (hubert_data.StepBatches): resuming
    # at step s replays exactly, with any number of loader workers.
    loader = step_loader(batches, pos, cfg.max_steps, cfg.num_workers, device)
    if d.main:
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(
            "%s on %s: HuBERT %s (%s front end), %d parameters; train %d utterances (%.1f min; dropped %s), dev %d; "
            "%d utterances per update, %d updates per epoch", f"resuming at step {pos.step}" if pos.step else
            "starting", f"{d.world_size} processes" if d.active else device, cfg.model, cfg.frontend, n_params,
            len(train_data), train_data.seconds / 60, train_data.dropped, len(dev_data), global_batch,
            batches.batches_per_epoch)
    clock = Clock(pos)
    window = torch.zeros(len(_STAT_KEYS), dtype=torch.float64)
    window_start, window_audio, session_audio = clock.session_start, 0.0, 0.0
    train_metrics: dict[str, float] = {}
    dev_metrics: dict[str, float] | None = None
    with run.logger(pos.step) as log, run.progress(cfg.max_steps, pos.step, every=cfg.log_every) as bar:
        model.train()
        for batch in loader:
            lr = optim.lr_at(pos.step, cfg.max_steps)
            for micro in batch.split(cfg.grad_accum):
                with updater.precision.autocast():
                    out = masked_prediction(model, micro.source.to(device), [t.to(device) for t in micro.targets],
                                            micro.mask.to(device), logit_temp=cfg.logit_temp,
                                            layerdrop=cfg.encoder_layerdrop, skip_nomask=cfg.skip_nomask)
                    loss, sample_size, stats = pretraining_loss(out, cfg.pred_masked_weight, cfg.pred_nomask_weight,
                                                                cfg.features_pen_weight)
                updater.backward(loss, sample_size)
                window += _stats_vector(loss, sample_size, stats)
            window_audio += batch.source.numel() / 16000
            step_stats = updater.step(lr)
            pos.step += 1
            bar.update(loss=step_stats.loss, lr=lr)
            last = pos.step == cfg.max_steps
            if pos.step % cfg.log_every == 0 or last:
                totals = d.all_reduce(window.to(device)).cpu()
                audio = float(d.all_reduce(torch.tensor([window_audio], dtype=torch.float64, device=device)))
                now = time.monotonic()
                train_metrics = _summary(totals, "train_")
                log.log(pos.step, **train_metrics, lr=lr, grad_norm=step_stats.grad_norm,
                        audio_s_per_s=audio / max(now - window_start, 1e-9), epoch=batches.epoch_of(pos.step))
                session_audio += audio
                window.zero_()
                window_start, window_audio = now, 0.0
            if pos.step % cfg.eval_every == 0 or last:
                dev_metrics = evaluate_dev()
            if pos.step % cfg.save_every == 0 or last:
                save()

        if dev_metrics is None:  # a finished run resumed: nothing trained, report what is there
            with maybe_averaged(updater.ema):
                dev_metrics = evaluate(model, makers[1], dev, cfg, device, d)
    metrics = {
        "step": pos.step,
        **train_metrics,
        **dev_metrics,
        "best_dev_loss": pos.best_dev_loss,
        "best_step": pos.best_step,
        "num_params": sum(p.numel() for p in model.parameters()),
        "train_utterances": len(train_data),
        "train_hours": train_data.seconds / 3600,
    }
    return finish(run, clock, metrics, ("audio_s_per_s", session_audio),
                  f"HuBERT pretraining ({cfg.model}, {cfg.frontend} front end)")


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PretrainHubertConfig)


def run(args: argparse.Namespace) -> int:
    return run_command(args, PretrainHubertConfig, pretrain_hubert)
