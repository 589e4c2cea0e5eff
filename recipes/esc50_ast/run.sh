#!/usr/bin/env bash
# AST on ESC-50 (5-fold cross-validation): AAT adapters against full fine-tuning.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset (one folder per fold)
#   stage 2  compare           every method x seed x fold: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=esc50
exp=exp/esc50_ast
upstream=checkpoints/ast-audioset
upstream_help="an AudioSet-pretrained AST as a Hugging Face directory"
methods="finetune aat_m aat_ms prefix linear"
folds="1 2 3 4 5"
with_dev="no"
about="AST on ESC-50, 5-fold cross-validation (mean +- std over the folds), as AAT compares methods.
Published (accuracy %): AST 95.6 (full fine-tuning, AST paper); AAT (likely ESC-50): full fine-tuning 95.8,
AAT-M 98.1, AAT-MS 98.7, prompt tuning 67.2, head only 56.8."
root_help="ESC-50-master as extracted (meta/esc50.csv, audio/)"
root_name="the extracted ESC-50-master"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
