# shellcheck shell=bash
# Helpers and the two last stages (train, evaluate) shared by the recipe templates in this folder. Sourced, never
# run: the functions read the variables the template has set (config, seeds, device, ulm, data, units, runs).

# The recipe's folder name prefixes the log, also when run.sh is started from inside that folder.
recipe_name=$(basename "$(cd "$(dirname "$0")" && pwd)")
log() { echo "$(date +%H:%M:%S) ${recipe_name}: $*" >&2; }
die() { echo "$0: error: $*" >&2; exit 1; }
need_file() { [ -f "$1" ] || die "missing $2: $1"; }
stage_on() { [ "${stage}" -le "$1" ] && [ "${stop_stage}" -ge "$1" ]; }

# Train ${config} on the frozen unit LM ${ulm}, one run per seed in ${seeds}, into ${runs}/seed<S>.
#   $1  the stage that writes ${units}/{train,dev}.units, named when they are missing
train_per_seed() {
    local units_stage=$1 split seed
    need_file "${config}" "the training config"
    for split in train dev; do need_file "${units}/${split}.units" "the ${split} units (run stage ${units_stage})"; done
    for seed in ${seeds}; do
        speechprompt train --config "${config}" base="${ulm}" seed="${seed}" device="${device}" \
            run_dir="${runs}/seed${seed}" \
            data.train_units="${units}/train.units" data.train_labels="${data}/train.labels" \
            data.dev_units="${units}/dev.units" data.dev_labels="${data}/dev.labels"
    done
}

# Evaluate the best checkpoint of every seed; the metrics go to ${runs}/seed<S>/<split>.metrics.json.
#   $1     the stage that trains the checkpoints, named when one is missing
#   $2...  the splits to evaluate on (${units}/<split>.units with ${data}/<split>.labels)
evaluate_per_seed() {
    local train_stage=$1 split seed
    shift
    local unit_files=() label_files=()
    for split in "$@"; do
        unit_files+=("${units}/${split}.units")
        label_files+=("${data}/${split}.labels")
    done
    for seed in ${seeds}; do
        need_file "${runs}/seed${seed}/best.safetensors" "the best checkpoint of seed ${seed} (run stage ${train_stage})"
        speechprompt evaluate --checkpoint "${runs}/seed${seed}/best.safetensors" --device "${device}" \
            --units "${unit_files[@]}" --labels "${label_files[@]}" --out "${runs}/seed${seed}"
    done
}
