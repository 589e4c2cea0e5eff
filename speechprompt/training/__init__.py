"""The training core every trainer shares: plumbing, not loops.

``train`` (tasks on the frozen unit LM), ``superb`` (SUPERB downstreams on an encoder), ``pretrain-ulm`` (unit LM
pretraining) and ``pretrain-hubert`` (HuBERT pretraining) each keep a short loop of their own and share, from here:

======================  =======================================================================================
module                  what
======================  =======================================================================================
:mod:`.run`             :class:`RunDir`: lock, resume policy, ``config.yaml``, state save/RNG, log, progress,
                        learning curves
:mod:`.config`          :class:`RunOptions`, the keys every trainer has; :class:`PretrainOptions`, those the two
                        pretraining trainers add (steps, optimizer, schedule, evaluation and save intervals)
:mod:`.pretraining`     the pretraining trainers' position, resume, clock, step loader, ``metrics.json`` and CLI
:mod:`.state`           ``train_state.pt``: atomic save, safe load, the resume policy (``auto|true|false``)
:mod:`.optim`           :class:`OptimConfig`, :class:`Updater`: gradient accumulation, all-reduce over processes,
                        clipping, fp16 loss scaling, moving average, non-finite loss check
:mod:`.schedule`        warmup + constant / inverse_sqrt / cosine, as pure functions of the step
:mod:`.ema`             the moving average of trained tensors
:mod:`.early_stopping`  NaN-safe best tracking and patience
:mod:`.distributed`     ``torchrun`` process groups, rank-0 decisions, sharding a global batch
:mod:`.precision`       fp32 / bf16 / fp16 autocast
======================  =======================================================================================
"""
