#!/usr/bin/env bash
# SUPERB IC: Fluent Speech Commands intent classification on HuBERT-base.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  compare           every method x seed: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=fluent_commands
exp=exp/fluent_commands_superb
upstream=checkpoints/hubert_base_ls960.pt
upstream_help="the HuBERT-base checkpoint (fairseq hubert_base_ls960.pt; any encoder
                     load_encoder reads)"
methods="superb finetune adapter lora prefix bitfit"
about="SUPERB intent classification (Fluent Speech Commands; an utterance is right when action, object and
location all are) with s3prl's head. Published (test accuracy %): SUPERB HuBERT-base 98.34."
root_help="fluent_speech_commands_dataset as extracted (data/*.csv, wavs/)"
root_name="the extracted fluent_speech_commands_dataset"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
