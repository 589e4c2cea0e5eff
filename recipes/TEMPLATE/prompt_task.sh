# shellcheck shell=bash
# The stages of every recipe on a public dataset, as ESPnet's egs2/TEMPLATE/asr1/asr.sh: a recipe's run.sh sets
# what differs between datasets, then sources this file with its arguments.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset
#   stage 2  prepare           HuBERT-base layer 6 -> official km.bin (100 units) -> deduplicated unit files
#   stage 3  train             deep prompt tuning of the frozen unit LM, one run per seed
#   stage 4  evaluate          the best checkpoint of every seed on the test split
#
# Set by run.sh before `source`:
#   recipe           the recipe folder (its conf/ holds the training configs)
#   dataset          the dataset name of 'speechprompt prepare-dataset'
#   about            the --help text after the usage line: the task and its published numbers
#   root_help        the --help text of --root (what the folder must hold)
#   root_name        what --root is, for the error when it is missing
#   config           the default training config
#   exp              the default folder of data, units and runs
#   prepare_options  the default KEY=VALUE options of prepare-dataset (may be empty)
set -euo pipefail

for required in recipe dataset about root_help root_name config exp; do
    [ -n "${!required:-}" ] || { echo "$0: error: '${required}' must be set by the recipe's run.sh before it" \
                                      "sources ${BASH_SOURCE[0]}" >&2; exit 1; }
done
prepare_options=${prepare_options:-}
# shellcheck source=recipes/TEMPLATE/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stage=1
stop_stage=4
root=
hubert=checkpoints/hubert_base_ls960.pt
kmeans=checkpoints/km.bin
ulm=checkpoints/checkpoint_best.pt
layer=6
seeds="1 2 3"
nj=1
device=auto

usage() {
    cat <<USAGE
Usage: $0 --root DIR [options]

${about}

Options [default]:
  --root DIR         ${root_help} [required by stage 1]
  --stage N          first stage to run [${stage}]
  --stop-stage N     last stage to run [${stop_stage}]
  --hubert FILE      official HuBERT-base checkpoint [${hubert}]
  --kmeans FILE      official GSLM k-means of HuBERT-base layer 6, 100 units [${kmeans}]
  --ulm FILE         official GSLM unit LM, dict.txt beside it [${ulm}]
  --layer N          HuBERT layer the k-means was learned on [${layer}]
  --config FILE      training config [${config}]
  --exp DIR          where data, units and runs go [${exp}]
  --seeds "S ..."    training seeds [${seeds}]
  --nj N             parallel unit-extraction jobs per split [${nj}]
  --device DEV       auto, cpu, cuda or cuda:N [${device}]
  --prepare-options "KEY=VALUE ..."
                     options of 'speechprompt prepare-dataset ${dataset}' [${prepare_options:-none}]
  -h, --help         this message
USAGE
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) root=$2; shift 2 ;;
        --stage) stage=$2; shift 2 ;;
        --stop-stage|--stop_stage) stop_stage=$2; shift 2 ;;
        --hubert) hubert=$2; shift 2 ;;
        --kmeans) kmeans=$2; shift 2 ;;
        --ulm) ulm=$2; shift 2 ;;
        --layer) layer=$2; shift 2 ;;
        --config) config=$2; shift 2 ;;
        --exp) exp=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --nj) nj=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --prepare-options) prepare_options=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

# Units of one manifest: HuBERT layer -> k-means -> dedup, split over ${nj} jobs that are merged at the end.
hubert_units() {
    local manifest=$1 out=$2 rank
    local args=(--manifest "${manifest}" --features hubert --checkpoint "${hubert}" --layer "${layer}"
                --kmeans "${kmeans}" --out "${out}" --dedup --device "${device}")
    if [ "${nj}" -le 1 ]; then
        speechprompt prepare "${args[@]}"
        return
    fi
    for ((rank = 0; rank < nj; rank++)); do
        speechprompt prepare "${args[@]}" --nshard "${nj}" --rank "${rank}" &
    done
    wait
    speechprompt prepare "${args[@]}" --nshard "${nj}" --merge
}

data=${exp}/data
units=${exp}/units
runs=${exp}/$(basename "${config}" .yaml)

if stage_on 1; then
    log "stage 1: manifests and labels from ${root:-<unset>}"
    [ -n "${root}" ] || die "--root is required for stage 1 (${root_name})"
    # shellcheck disable=SC2086  # prepare_options is a list of KEY=VALUE words
    speechprompt prepare-dataset "${dataset}" --root "${root}" --out "${data}" ${prepare_options}
fi

if stage_on 2; then
    log "stage 2: HuBERT layer ${layer} units (deduplicated) of every split"
    need_file "${hubert}" "the HuBERT-base checkpoint (hubert_base_ls960.pt)"
    need_file "${kmeans}" "the GSLM k-means (km.bin, HuBERT-base layer 6, 100 units)"
    for split in train dev test; do
        need_file "${data}/${split}.tsv" "the ${split} manifest (run stage 1)"
        hubert_units "${data}/${split}.tsv" "${units}"
    done
fi

if stage_on 3; then
    log "stage 3: train ${config} for seeds ${seeds}"
    need_file "${ulm}" "the GSLM unit LM (checkpoint_best.pt, with dict.txt beside it)"
    train_per_seed 2
fi

if stage_on 4; then
    log "stage 4: evaluate every seed on test"
    need_file "${units}/test.units" "the test units (run stage 2)"
    evaluate_per_seed 3 test
    log "test metrics: ${runs}/seed*/test.metrics.json"
fi
