#!/usr/bin/env bash
# Fluent Speech Commands intent classification (action|object|location) with SpeechPrompt on the GSLM unit LM.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  prepare           HuBERT-base layer 6 -> official km.bin (100 units) -> deduplicated unit files
#   stage 3  train             deep prompt tuning of the frozen unit LM, one run per seed
#   stage 4  evaluate          the best checkpoint of every seed on the test split
#
# Run from the repository root:
#   recipes/fluent_commands/run.sh --root /data/fluent_speech_commands_dataset
# Every path may be relative to the working directory. The GSLM files are the official ones (see checkpoints/).
# The stages and options are those of every public-dataset recipe: recipes/TEMPLATE/prompt_task.sh.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
dataset=fluent_commands
config=${recipe}/conf/prompt.yaml
exp=exp/fluent_commands
prepare_options=""
about="Fluent Speech Commands intent classification (action|object|location) with SpeechPrompt.
Published: 98.40% test accuracy (all three slots right) with 0.15M trainable parameters (SpeechPrompt v1);
.973 with the learnable verbalizer over the 31 intents (SpeechPrompt v2, --config ${recipe}/conf/prompt_v2.yaml)."
root_help="fluent_speech_commands_dataset as extracted (data/*.csv, wavs/)"
root_name="the extracted fluent_speech_commands_dataset"

source "${recipe}/../TEMPLATE/prompt_task.sh" "$@"
