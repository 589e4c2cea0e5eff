#!/usr/bin/env bash
# Intent classification (Fluent-Speech-Commands-like action|object|location) on the embedded synthetic corpus,
# end to end on a CPU: no dataset, no pretrained weights.
#
#   stages 1-3  synth sentences, k-means, pretrain a small unit LM   (shared base, --base-dir)
#   stage 4     synth --task intent   the task corpus: test on unseen voices, test_synth on an unseen engine
#   stages 5-7  prepare, train (prompt tuning, one run per seed), evaluate on test and test_synth
#
# Stages 1-3 write to --base-dir, which synthetic_digits shares: after one of the two has run them, start the
# other at --stage 4. Run from the repository root:
#   recipes/synthetic_intent/run.sh
# The stages and options are those of every synthetic recipe: recipes/TEMPLATE/synthetic_task.sh.
set -euo pipefail

recipe=$(dirname "${BASH_SOURCE[0]}")
task=intent
config=${recipe}/conf/prompt.yaml
exp=exp/synthetic_intent
shared_with=synthetic_digits
about="Intent classification (action|object|location, 31 intents) on the embedded synthetic corpus with SpeechPrompt,
from synthesized speech to test accuracy on unseen voices (test) and an unseen synthesizer (test_synth)."
config_help="training config (conf/prompt.yaml: SpeechPrompt v1, one token per slot;
                     conf/prompt_v2.yaml: learnable verbalizer over the 31 intents)"
per_class_help="training utterances per intent"

source "${recipe}/../TEMPLATE/synthetic_task.sh" "$@"
