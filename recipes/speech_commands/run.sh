#!/usr/bin/env bash
# Speech Commands v1 keyword spotting (12 classes) with SpeechPrompt on the GSLM unit LM.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  prepare           HuBERT-base layer 6 -> official km.bin (100 units) -> deduplicated unit files
#   stage 3  train             deep prompt tuning of the frozen unit LM, one run per seed
#   stage 4  evaluate          the best checkpoint of every seed on the test split
#
# Run from the repository root:
#   recipes/speech_commands/run.sh --root /data/speech_commands_v0.01
# Every path may be relative to the working directory. The GSLM files are the official ones (see checkpoints/).
# The stages and options are those of every public-dataset recipe: recipes/TEMPLATE/prompt_task.sh.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=speech_commands
config=${recipe}/conf/prompt.yaml
exp=exp/speech_commands
prepare_options=""
about="Speech Commands v1 keyword spotting (12 classes) with SpeechPrompt.
Published: 95.16% test accuracy with 0.08M trainable parameters (SpeechPrompt v1); .946 with the learnable
verbalizer (SpeechPrompt v2, --config ${recipe}/conf/prompt_v2.yaml)."
root_help="speech_commands_v0.01 as extracted; SUPERB's speech_commands_test_set_v0.01 beside it
                     becomes the test set"
root_name="the extracted speech_commands_v0.01"

source "${recipe}/../TEMPLATE/prompt_task.sh" "$@"
