# shellcheck shell=bash
# The stages of the recipes on the embedded synthetic corpus, end to end on a CPU with no dataset and no pretrained
# weights: a recipe's run.sh sets the task, then sources this file with its arguments.
#
#   stage 1  synth --task sentences   random-word sentences: the unit LM's pretraining speech   (shared base)
#   stage 2  kmeans                   k-means of MFCC (or log-mel) frames of those sentences      (shared base)
#   stage 3  prepare + pretrain-ulm   their units, and a small unit LM pretrained on them         (shared base)
#   stage 4  synth --task TASK        the task corpus: test on unseen voices, test_synth on an unseen engine
#   stage 5  prepare                  the task corpus as units, with the base k-means
#   stage 6  train                    prompt tuning of the frozen small unit LM, one run per seed
#   stage 7  evaluate                 every seed on test and test_synth
#
# Stages 1-3 write to --base-dir, which every synthetic task shares: after one has run them, start the others at
# --stage 4.
#
# Set by run.sh before `source`:
#   recipe           the recipe folder (its conf/ holds the training configs)
#   task             the corpus of 'speechprompt synth --task'
#   about            the --help text after the usage line: what the recipe does and measures
#   config           the default training config
#   config_help      the --help text of --config
#   per_class_help   the --help text of --per-class
#   exp              the default folder of the task corpus, units and runs
#   shared_with      the other recipes that share --base-dir, for --help
set -euo pipefail

for required in recipe task about config config_help per_class_help exp shared_with; do
    [ -n "${!required:-}" ] || { echo "$0: error: '${required}' must be set by the recipe's run.sh before it" \
                                      "sources ${BASH_SOURCE[0]}" >&2; exit 1; }
done
# shellcheck source=recipes/TEMPLATE/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stage=1
stop_stage=7
features=mfcc
k=100
ulm_steps=1000
base_dir=exp/synthetic_base
ulm_config=recipes/pretrain_ulm/conf/small.yaml
seeds="1 2 3"
synth_seed=0
per_class=
device=auto

usage() {
    cat <<USAGE
Usage: $0 [options]

${about}

Options [default]:
  --stage N          first stage to run [${stage}]
  --stop-stage N     last stage to run [${stop_stage}]
  --features NAME    frame features of the k-means: mfcc, mfcc_cmn or logmel [${features}]
  --k N              number of units [${k}]
  --ulm-steps N      unit LM pretraining updates [${ulm_steps}]
  --base-dir DIR     sentences corpus, k-means and unit LM, shared with ${shared_with} [${base_dir}]
  --ulm-config FILE  unit LM pretraining config [${ulm_config}]
  --config FILE      ${config_help} [${config}]
  --exp DIR          where the task corpus, units and runs go [${exp}]
  --seeds "S ..."    training seeds [${seeds}]
  --synth-seed N     seed of the synthesized corpora [${synth_seed}]
  --per-class N      ${per_class_help} (empty: synth's default) [${per_class:-default}]
  --device DEV       auto, cpu, cuda or cuda:N [${device}]
  -h, --help         this message
USAGE
}

while [ $# -gt 0 ]; do
    case "$1" in
        --stage) stage=$2; shift 2 ;;
        --stop-stage|--stop_stage) stop_stage=$2; shift 2 ;;
        --features) features=$2; shift 2 ;;
        --k) k=$2; shift 2 ;;
        --ulm-steps) ulm_steps=$2; shift 2 ;;
        --base-dir) base_dir=$2; shift 2 ;;
        --ulm-config) ulm_config=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --exp) exp=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --synth-seed) synth_seed=$2; shift 2 ;;
        --per-class) per_class=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

command -v speechprompt >/dev/null || die "speechprompt is not on PATH (pip install -e . in the active environment)"

sentences=${base_dir}/sentences
kmeans=${base_dir}/km${k}_${features}.safetensors
base_units=${base_dir}/units_${features}${k}
ulm_dir=${base_dir}/ulm_${features}${k}
ulm=${ulm_dir}/checkpoint_best.pt
data=${exp}/data
units=${exp}/units
runs=${exp}/$(basename "${config}" .yaml)
splits="train dev test test_synth"
per_class_arg=()
[ -z "${per_class}" ] || per_class_arg=(--per-class "${per_class}")

if stage_on 1; then
    log "stage 1: sentences for unit-LM pretraining -> ${sentences}"
    speechprompt synth --task sentences --out "${sentences}" --seed "${synth_seed}" --no-progress
fi

if stage_on 2; then
    log "stage 2: ${k}-means of ${features} frames of the sentences -> ${kmeans}"
    need_file "${sentences}/train.tsv" "the sentences corpus (run stage 1)"
    speechprompt kmeans --manifest "${sentences}/train.tsv" --features "${features}" --k "${k}" --percent 1.0 \
        --n-init 3 --seed "${synth_seed}" --out "${kmeans}"
fi

if stage_on 3; then
    log "stage 3: sentence units and the small unit LM -> ${ulm_dir}"
    need_file "${kmeans}" "the k-means (run stage 2)"
    need_file "${ulm_config}" "the unit LM config"
    for split in train dev; do
        speechprompt prepare --manifest "${sentences}/${split}.tsv" --features "${features}" --kmeans "${kmeans}" \
            --out "${base_units}" --dedup --device "${device}"
    done
    speechprompt pretrain-ulm --config "${ulm_config}" train="${base_units}/train.units" \
        dev="${base_units}/dev.units" n_units="${k}" max_steps="${ulm_steps}" run_dir="${ulm_dir}" device="${device}"
fi

if stage_on 4; then
    log "stage 4: the ${task} corpus -> ${data}"
    speechprompt synth --task "${task}" --out "${data}" --seed "${synth_seed}" --no-progress "${per_class_arg[@]}"
fi

if stage_on 5; then
    log "stage 5: units of ${splits}"
    need_file "${kmeans}" "the k-means (run stage 2)"
    for split in ${splits}; do
        need_file "${data}/${split}.tsv" "the ${split} manifest (run stage 4)"
        speechprompt prepare --manifest "${data}/${split}.tsv" --features "${features}" --kmeans "${kmeans}" \
            --out "${units}" --dedup --device "${device}"
    done
fi

if stage_on 6; then
    log "stage 6: train ${config} for seeds ${seeds}"
    need_file "${ulm}" "the pretrained unit LM (run stage 3)"
    train_per_seed 5
fi

if stage_on 7; then
    log "stage 7: evaluate every seed on test (unseen voices) and test_synth (unseen synthesizer)"
    evaluate_per_seed 6 test test_synth
    log "test metrics: ${runs}/seed*/{test,test_synth}.metrics.json"
fi
