#!/usr/bin/env bash
# SUPERB ER: IEMOCAP emotion recognition (4 classes, 5 folds) on HuBERT-base.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset (one folder per fold)
#   stage 2  compare           every method x seed x fold: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=iemocap
exp=exp/iemocap_superb
upstream=checkpoints/hubert_base_ls960.pt
upstream_help="the HuBERT-base checkpoint (fairseq hubert_base_ls960.pt; any encoder
                     load_encoder reads)"
methods="superb finetune adapter lora prefix bitfit"
folds="1 2 3 4 5"
about="SUPERB emotion recognition (IEMOCAP, neu/hap+exc/ang/sad), leave one session out: stage 1 prepares
the five folds, stage 2 trains every method and seed on each and reports the mean +- std over the folds.
Published (mean test accuracy % of the 5 folds): SUPERB HuBERT-base 64.92."
root_help="IEMOCAP_full_release as extracted (Session1-5)"
root_name="the extracted IEMOCAP_full_release"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
