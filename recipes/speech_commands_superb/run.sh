#!/usr/bin/env bash
# SUPERB KS: Speech Commands v1 keyword spotting (12 classes) on HuBERT-base.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  compare           every method x seed: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=speech_commands
exp=exp/speech_commands_superb
upstream=checkpoints/hubert_base_ls960.pt
upstream_help="the HuBERT-base checkpoint (fairseq hubert_base_ls960.pt; any encoder
                     load_encoder reads)"
methods="superb finetune adapter lora prefix bitfit"
about="SUPERB keyword spotting (Speech Commands v1, 12 classes) with s3prl's head, on a frozen or tuned encoder.
Published (test accuracy %): SUPERB HuBERT-base 96.30 (frozen upstream). See README.md for the other studies."
root_help="speech_commands_v0.01 as extracted; SUPERB's speech_commands_test_set_v0.01 beside it
                     becomes the test set"
root_name="the extracted speech_commands_v0.01"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
