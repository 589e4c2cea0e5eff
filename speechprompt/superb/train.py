"""SUPERB-style training on an encoder: a learned weighted sum of layers and a small task head.

    speechprompt superb --config recipes/superb_hubert/conf/ks_frozen.yaml seed=1 run_dir=exp/superb/ks_frozen
    torchrun --nproc_per_node 2 -m speechprompt.cli superb --config C.yaml run_dir=exp/superb/ks_ddp

The model is the SUPERB protocol (Yang et al., 2021) with the efficient-tuning methods of the speech SSL study
placed *inside* the encoder (see :mod:`speechprompt.superb.model`). What trains is chosen by ``method.name``, from
the same registry as ``speechprompt train``: ``prefix``, ``adapter``, ``lora``, ``bitfit``, ``mask``, or the two
baselines, ``linear_probe`` (the upstream is frozen and untouched: only the layer weights and the head train;
SUPERB's own protocol) and ``full_finetune`` (every upstream parameter trains too, but modules listed in its
``frozen`` option). ``prompt`` is refused: it is an input of the unit LM, not of an encoder. The layer weights (when
the head reads them) and the head always train.

The head is chosen by name (``head:``, with ``head_options:``): s3prl's SUPERB heads (``utterance`` for KS, SID and
ER; ``multislot`` for IC; ``bilstm_ctc`` for ASR), linear probes (``classification``, ``ctc``), AST's classifier
(``ast``) and fairseq's CTC fine-tuning projection (``encoder_ctc``, with ``freeze_upstream_updates`` and
``feature_mask`` for fairseq's schedule of it). ``speechprompt superb --help`` lists them with their options.

The run directory receives::

    config.yaml               the resolved config
    log.csv                   step, metric, value (train loss, learning rate, gradient norm, dev metrics)
    learning_curves.png       train loss and dev metrics against the step
    best.safetensors/.json    the task checkpoint: the method's exported tensors under ``method.*``, the layer
                              weights and head under ``head.*``, nothing of the frozen upstream
    train_state.pt            trainable tensors, optimizer, RNG and loop state, saved every ``eval_every``
                              updates: a killed run resumes from here (resume=auto, the default)
    metrics.json              dev metrics of the best checkpoint, parameter counts, layer weights, checkpoint bytes

The sidecar records the upstream's path and fingerprint (sha256 of its state dict); ``load_superb`` refuses any
other upstream. Runs are reproducible: the seed fixes initialisation, the batch order of each epoch and dropout,
and a resumed run ends with the same tensors as one that was never interrupted (bitwise on CPU). A finished run
started again reports its metrics without training; raising ``max_steps`` (or ``patience``) continues it, unless
the learning-rate schedule depends on ``max_steps`` (cosine without ``optim.decay_steps``). Audio is read by
``num_workers`` processes ahead of the loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import time
from typing import Any

import torch

from speechprompt import config as C
from speechprompt.audio import SAMPLE_RATE
from speechprompt.checkpoint import base_record, save_checkpoint
from speechprompt.config import ConfigError, option
from speechprompt.devices import torch_threads
from speechprompt.errors import CheckpointError
from speechprompt.fileio import write_json
from speechprompt.models.transformer import set_activation_checkpointing
from speechprompt.rng import seed_everything
from speechprompt.superb.data import Crop, balanced_order, epoch_order, load_audio_split, read_batches
from speechprompt.superb.evaluation import evaluate_superb
from speechprompt.superb.feature_mask import FeatureMaskConfig
from speechprompt.superb.head_registry import describe_heads, head_options
from speechprompt.superb.model import TASK_TYPE, SuperbModel, build_superb, check_method
from speechprompt.training.config import RUN_KEYS_MAY_CHANGE, RunOptions
from speechprompt.training.distributed import Dist, distributed
from speechprompt.training.early_stopping import BestTracker
from speechprompt.training.ema import maybe_averaged
from speechprompt.training.optim import OptimConfig, Updater, check_schedule_unchanged
from speechprompt.training.precision import MixedPrecision
from speechprompt.training.run import RunDir, peak_memory
from speechprompt.tuning import MethodConfig, count_parameters

logger = logging.getLogger(__name__)

KIND = "superb"
STATE_VERSION = 2
CHECKPOINT_NAME = "best"


@dataclasses.dataclass
class SuperbDataConfig:
    """Audio manifests (fairseq TSV) with line-aligned labels or transcripts."""

    train_manifest: str = option(help="training manifest (root line, then relpath<TAB>num_samples)")
    train_labels: str | None = option(None, help="training labels (null: the manifest's .labels sidecar)")
    dev_manifest: str | None = option(None, help="dev manifest for model selection and early stopping")
    dev_labels: str | None = option(None, help="dev labels (null: the dev manifest's .labels sidecar)")
    crop_seconds: float = option(0.0, help="cut longer training utterances to a random window of this length "
                                 "(s3prl SID: 8; 0: never)")
    class_balanced: bool = option(False, help="draw each epoch's training rows with replacement, every class equally "
                                  "likely (s3prl KS's WeightedRandomSampler)")

    def __post_init__(self) -> None:
        if self.dev_labels is not None and self.dev_manifest is None:
            raise ConfigError("data.dev_labels needs data.dev_manifest")
        if self.crop_seconds < 0:
            raise ConfigError(f"data.crop_seconds must be >= 0, got {self.crop_seconds}")


@dataclasses.dataclass(kw_only=True)
class SuperbConfig(RunOptions):
    """A SUPERB-style run on an upstream encoder."""

    data: SuperbDataConfig = option(help="audio and labels")
    upstream: str = option(help="the upstream encoder: a fairseq checkpoint (HuBERT, wav2vec 2.0, data2vec-audio, "
                           "WavLM) or a Hugging Face directory (also AST), frozen except for what the method trains")
    head: str = option("classification", help="the task head, by name: classification | utterance | multislot | "
                       "ast | ctc | bilstm_ctc | encoder_ctc (see the list below)")
    head_options: dict[str, Any] = option({}, help="the head's options, e.g. {projector_dim: 256} (see the list "
                                          "below)")
    method: MethodConfig = option(
        help="what trains inside the upstream: prefix | adapter | lora | bitfit | mask | linear_probe (frozen "
        "upstream) | full_finetune", default_factory=lambda: MethodConfig(name="linear_probe"))
    optim: OptimConfig = option(help="optimizer (one learning rate for the method, layer weights and head)",
                                default_factory=lambda: OptimConfig(lr=1e-3))
    layer_norm: bool = option(False, help="LayerNorm each hidden state before the weighted sum")
    upstream_dropout: bool = option(False, help="keep the upstream's dropout active while training")
    exact_padding: bool = option(False, help="each utterance of a padded batch gets the upstream features it gets "
                                 "alone (GroupNorm front ends normalise per utterance); off: padding as fairseq/s3prl")
    run_dir: str = option("exp/superb", help="where the run's files go (a moved run directory resumes where it is)")
    batch_size: int = option(8, help="utterances per micro-batch and process (see grad_accum)")
    max_steps: int = option(1000, help="updates at most")
    eval_every: int = option(100, help="evaluate on dev, keep the best checkpoint and save the training state "
                             "every N updates")
    patience: int = option(0, help="stop after this many evaluations without a better dev metric (0: never)")
    eval_batch_size: int = option(16, help="utterances per batch when evaluating")
    num_workers: int = option(0, help="processes reading audio ahead of the training loop (0: read in the loop)")
    freeze_upstream_updates: int = option(
        0, help="run the upstream without gradients for the first N updates, so that only the head learns (fairseq "
        "freeze_finetune_updates; 0: never)")
    feature_mask: FeatureMaskConfig = option(
        help="span masking of the encoder's features while training (fairseq fine-tuning's apply_mask)",
        default_factory=FeatureMaskConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_method(self.method.name)
        head_options(self.head, self.head_options)  # an unknown head, option or bad value fails here, not mid-run
        for name in ("batch_size", "max_steps", "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0 or self.num_workers < 0 or self.freeze_upstream_updates < 0:
            raise ConfigError("patience, num_workers and freeze_upstream_updates must be >= 0")


# Keys a resumed run may change (max_steps is checked against the learning-rate schedule).
MAY_CHANGE = RUN_KEYS_MAY_CHANGE | {"eval_batch_size", "patience", "max_steps", "num_workers"}


@dataclasses.dataclass
class _Position:
    """Where the training loop is: with the tensors, optimizer and RNG, all that a resumed run needs."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # updates of this epoch already taken
    best_metrics: dict[str, float] | None = None
    seconds: float = 0.0  # training time of all sessions so far
    step_seconds: float = 0.0  # time spent in updates (forward, backward, step), reading and evaluation excluded
    timed_steps: int = 0


def train_superb(cfg: SuperbConfig) -> dict[str, Any]:
    """Train (or resume), keep the checkpoint with the best dev metric (the last one without dev); returns
    ``metrics.json``."""
    return fit_superb(cfg)[1]


def fit_superb(cfg: SuperbConfig) -> tuple[SuperbModel, dict[str, Any]]:
    """:func:`train_superb`, also returning the model as it is after the last update (not reloaded)."""
    with torch_threads(cfg.threads), distributed(cfg.device) as (d, device), \
            RunDir(cfg.run_dir, KIND, cfg, STATE_VERSION, MAY_CHANGE, cfg.resume, d) as run:
        return _train(cfg, run, d, device)


def _trainable_tensors(model: SuperbModel) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (after :meth:`SuperbModel.trainable_parameters` froze the rest)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _train(cfg: SuperbConfig, run: RunDir, d: Dist, device: torch.device) -> tuple[SuperbModel, dict[str, Any]]:
    seed_everything(cfg.seed)
    train_split = load_audio_split(cfg.data.train_manifest, cfg.data.train_labels)
    dev_split = load_audio_split(cfg.data.dev_manifest, cfg.data.dev_labels) if cfg.data.dev_manifest else None
    model, fingerprint = build_superb(cfg.upstream, cfg.method.resolved(), cfg.head, train_split.labels,
                                      cfg.layer_norm, cfg.upstream_dropout, device, cfg.head_options, cfg.feature_mask,
                                      cfg.exact_padding)
    params = model.trainable_parameters()
    if cfg.activation_checkpointing:
        set_activation_checkpointing(model.upstream)
    n_method = count_parameters(model.method)
    updater = Updater(params, cfg.optim, MixedPrecision(cfg.precision, device), d, cfg.ema_decay)
    logger.info("method %s: %d trainable parameters (%d in the upstream)", cfg.method.name, updater.num_parameters,
                n_method)
    pos, best = _Position(), BestTracker(model.head.higher_is_better, cfg.patience)
    saved = run.saved
    if saved is not None:
        if saved["fingerprint"] != fingerprint:
            raise CheckpointError(f"{run.state_path} was trained on an upstream with fingerprint "
                                  f"{saved['fingerprint']}, but {cfg.upstream} has {fingerprint}; use another run_dir")
        check_schedule_unchanged(cfg.optim, saved["config"]["max_steps"], cfg.max_steps, saved["position"]["step"],
                                 run.state_path)
        trainable = _trainable_tensors(model)
        if set(trainable) != set(saved["trainable"]):
            raise CheckpointError(f"{run.state_path}: its trainable tensors are not this model's; use another run_dir")
        with torch.no_grad():
            for name, p in trainable.items():
                p.copy_(saved["trainable"][name])
        updater.load_state_dict(saved["updater"])
        best.load_state_dict(saved["best"])
        pos = _Position(**saved["position"])
        run.restore_rng(saved)  # last: building the model above drew from the RNG
        if saved["summary"] is not None and _done(cfg, pos, best):
            logger.info("%s: the run already finished at step %d; nothing to do", run.path, pos.step)
            return model.eval(), saved["summary"]
        logger.info("resuming %s at step %d (epoch %d)", run.path, pos.step, pos.epoch)

    head_kind = cfg.head
    selected = f"dev.{model.head.default_metric}" if dev_split else None
    meta = {
        "task": {"type": TASK_TYPE, **model.head.describe()},
        "method": {"name": cfg.method.name, "config": C.to_dict(cfg.method.resolved())},
        "head": f"superb_{head_kind}",
        "verbalizer": None,
        "base": base_record(cfg.upstream, fingerprint, kind=model.upstream.architecture,
                            parameters=model.upstream_parameters),
        "superb": {"head": head_kind, "head_options": C.to_dict(head_options(cfg.head, cfg.head_options)),
                   "layer_norm": cfg.layer_norm, "upstream_dropout": cfg.upstream_dropout,
                   "exact_padding": cfg.exact_padding},
    }

    def save_best(step: int, metrics: dict[str, float] | None) -> None:
        training = {"step": step, "trainable_parameters": updater.num_parameters, "method_parameters": n_method,
                    "seed": cfg.seed, "selected_on": selected, "metrics": metrics}
        if d.main:
            save_checkpoint(run.path / CHECKPOINT_NAME, model.method.export_state_dict(), model.head_state_dict(),
                            {**meta, "training": training})

    session_start, seconds_before = time.perf_counter(), pos.seconds

    def save_state(summary: dict[str, Any] | None = None) -> None:
        """``train_state.pt``, written after the best checkpoint: its atomic rename commits the step."""
        pos.seconds = seconds_before + time.perf_counter() - session_start
        run.save_state(fingerprint=fingerprint, position=dataclasses.asdict(pos), best=best.state_dict(),
                       summary=summary, updater=updater.state_dict(),
                       trainable={k: v.detach().cpu() for k, v in _trainable_tensors(model).items()})

    global_batch = cfg.batch_size * cfg.grad_accum * d.world_size
    with run.logger(pos.step) as log, run.progress(cfg.max_steps, pos.step, every=cfg.log_every) as bar:
        while not _done(cfg, pos, best):
            if cfg.data.class_balanced:
                order = balanced_order(train_split.labels, cfg.seed, pos.epoch)
            else:
                order = epoch_order(len(train_split), cfg.seed, pos.epoch)
            groups = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
            mine = [d.shard(g) for g in groups[pos.batch_in_epoch :]]
            crop = Crop(round(cfg.data.crop_seconds * SAMPLE_RATE), cfg.seed, pos.epoch) if cfg.data.crop_seconds \
                else None
            for batch in read_batches(train_split, mine, cfg.num_workers, crop):
                step_start = time.perf_counter()
                model.train()
                model.freeze_upstream = pos.step < cfg.freeze_upstream_updates
                lr = cfg.optim.lr_at(pos.step, cfg.max_steps)
                n = len(batch.rows)
                for j in range(cfg.grad_accum):
                    lo, hi = n * j // cfg.grad_accum, n * (j + 1) // cfg.grad_accum
                    if lo == hi:
                        continue
                    with updater.precision.autocast():
                        output, frame_mask = model(*model.prepare(batch.wavs[lo:hi]))
                        total, terms = model.head.loss(output, frame_mask, batch.labels[lo:hi])
                    updater.backward(total, terms)
                stats = updater.step(lr)
                pos.step += 1
                pos.batch_in_epoch += 1
                pos.step_seconds += time.perf_counter() - step_start
                pos.timed_steps += 1
                bar.update(loss=stats.loss, lr=lr)
                if pos.step % cfg.log_every == 0:
                    log.log(pos.step, train_loss=stats.loss, lr=lr, grad_norm=stats.grad_norm)
                if pos.step % cfg.eval_every == 0 or pos.step == cfg.max_steps:
                    if dev_split is not None:
                        with maybe_averaged(updater.ema):
                            metrics = evaluate_superb(model, dev_split, cfg.eval_batch_size,
                                                      cfg.num_workers)[0] if d.main else None
                            metrics = d.broadcast_object(metrics)
                            log.log(pos.step, **{f"dev_{k}": v for k, v in metrics.items()})
                            if best.update(metrics[model.head.default_metric], pos.step):
                                pos.best_metrics = metrics
                                save_best(pos.step, metrics)
                    save_state()
                if _done(cfg, pos, best):
                    break
            else:  # the epoch ran out (a break leaves it unfinished: a longer resumed run continues it)
                pos.epoch += 1
                pos.batch_in_epoch = 0
    if dev_split is None or pos.best_metrics is None:
        best.best_step = pos.step
        with maybe_averaged(updater.ema):
            save_best(pos.step, None)
    path = run.path / f"{CHECKPOINT_NAME}.safetensors"
    summary = {
        "method": cfg.method.name,
        "head": head_kind,
        "steps": pos.step,
        "best_step": best.best_step,
        "seconds": round(seconds_before + time.perf_counter() - session_start, 3),
        "trainable_parameters": updater.num_parameters,
        "method_parameters": n_method,
        "mean_step_seconds": pos.step_seconds / pos.timed_steps if pos.timed_steps else None,
        "layer_weights": model.layer_weights(),
        "checkpoint": str(path),
        "checkpoint_bytes": path.stat().st_size if d.main else None,
        "dev": pos.best_metrics,
        "processes": d.world_size,
        **peak_memory(device),
    }
    summary = d.broadcast_object(summary)
    if d.main:
        write_json(run.path / "metrics.json", summary)
        run.plot_learning_curves(f"SUPERB {head_kind}: {cfg.method.name}")
    save_state(summary)
    return model.eval(), summary


def _done(cfg: SuperbConfig, pos: _Position, best: BestTracker) -> bool:
    """The loop stops here: ``max_steps`` reached, or ``patience`` evaluations without improvement."""
    return pos.step >= cfg.max_steps or best.should_stop


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (keys below)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    parser.epilog = "config keys:\n" + C.describe(SuperbConfig) + "\n\nheads (head: NAME, head_options: {...}):\n" \
        + describe_heads()


def run(args: argparse.Namespace) -> int:
    cfg = C.load_config(SuperbConfig, args.config, args.overrides)
    summary = train_superb(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        print(json.dumps(summary))
    return 0
