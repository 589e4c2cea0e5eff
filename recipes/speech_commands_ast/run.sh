#!/usr/bin/env bash
# AST on Speech Commands v2 (35 classes): AAT adapters against full fine-tuning.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  compare           every method x seed: train, score, tabulate (results.md)
#
# Run from the repository root; the stages and options are recipes/TEMPLATE/superb_task.sh's.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=speech_commands
exp=exp/speech_commands_ast
upstream=checkpoints/ast-audioset
upstream_help="an AudioSet-pretrained AST as a Hugging Face directory"
methods="finetune aat_m aat_ms prefix linear"
prepare_options="all_words=true silence=false test_set=official"
about="AST on Speech Commands v2 (35 words, official splits, no _unknown_/_silence_), the setting of AST and AAT.
Published (test accuracy %): AST 98.1 (full fine-tuning, AST paper); AAT: see README.md."
root_help="speech_commands_v0.02 as extracted (word folders, validation_list.txt, testing_list.txt)"
root_name="the extracted speech_commands_v0.02"

source "${recipe}/../TEMPLATE/superb_task.sh" "$@"
