# shellcheck shell=bash
# The stages of every recipe that tunes an encoder (SUPERB downstreams, CTC fine-tuning, AST/AAT): a recipe's run.sh
# sets what differs, then sources this file with its arguments.
#
#   stage 1  prepare-dataset   manifests + labels from the extracted dataset (once per fold for cross-validation)
#   stage 2  compare           every method config x seed (x fold): train, score the test splits, tabulate
#                              -> ${exp}/compare/results.{md,json,csv}, metric_vs_params.png
#
# Set by run.sh before `source`:
#   recipe           the recipe folder (conf/<method>.yaml per method, conf/compare.yaml)
#   dataset          the dataset name of 'speechprompt prepare-dataset'
#   about            the --help text after the usage line: the task and its published numbers
#   root_help        the --help text of --root (what the folder must hold)
#   root_name        what --root is, for the error when it is missing
#   exp              the default folder of data and runs
#   upstream         the default encoder (a fairseq checkpoint or a Hugging Face directory)
#   upstream_help    the --help text of --upstream
#   methods          the default methods (names of conf/<method>.yaml)
# and optionally:
#   eval_splits      the splits scored after training [test]
#   folds            cross-validation folds, passed to prepare-dataset as fold=N [none]
#   with_dev         "no" when the dataset has no dev split (the last checkpoint is scored) [yes]
#   prepare_options  default KEY=VALUE options of prepare-dataset [none]
set -euo pipefail

for required in recipe dataset about root_help root_name exp upstream upstream_help methods; do
    [ -n "${!required:-}" ] || { echo "$0: error: '${required}' must be set by the recipe's run.sh before it" \
                                      "sources ${BASH_SOURCE[0]}" >&2; exit 1; }
done
eval_splits=${eval_splits:-test}
folds=${folds:-}
with_dev=${with_dev:-yes}
prepare_options=${prepare_options:-}
# shellcheck source=recipes/TEMPLATE/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

stage=1
stop_stage=2
root=
seeds=3
jobs=1
device=auto

usage() {
    cat <<USAGE
Usage: $0 --root DIR [options]

${about}

Options [default]:
  --root DIR         ${root_help} [required by stage 1]
  --stage N          first stage to run [${stage}]
  --stop-stage N     last stage to run [${stop_stage}]
  --upstream PATH    ${upstream_help} [${upstream}]
  --methods "M ..."  methods to compare, names of ${recipe}/conf/<method>.yaml [${methods}]
  --exp DIR          where data and runs go [${exp}]
  --seeds N          seeds 1..N per method [${seeds}]
  --jobs N           runs trained at once [${jobs}]
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
        --upstream) upstream=$2; shift 2 ;;
        --methods) methods=$2; shift 2 ;;
        --exp) exp=$2; shift 2 ;;
        --seeds) seeds=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        --device) device=$2; shift 2 ;;
        --prepare-options) prepare_options=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

data=${exp}/data
# Where one fold's manifests are: compare replaces {fold} by each fold's name.
fold_data=${data}
[ -z "${folds}" ] || fold_data="${data}/fold{fold}"

if stage_on 1; then
    log "stage 1: manifests and labels from ${root:-<unset>}"
    [ -n "${root}" ] || die "--root is required for stage 1 (${root_name})"
    if [ -z "${folds}" ]; then
        # shellcheck disable=SC2086  # prepare_options is a list of KEY=VALUE words
        speechprompt prepare-dataset "${dataset}" --root "${root}" --out "${data}" ${prepare_options}
    else
        for fold in ${folds}; do
            # shellcheck disable=SC2086
            speechprompt prepare-dataset "${dataset}" --root "${root}" --out "${data}/fold${fold}" fold="${fold}" \
                ${prepare_options}
        done
    fi
fi

if stage_on 2; then
    log "stage 2: ${methods} x ${seeds} seeds${folds:+ x folds ${folds}} -> ${exp}/compare"
    [ -e "${upstream}" ] || die "missing the upstream encoder: ${upstream}"
    if [ -z "${folds}" ]; then
        need_file "${data}/train.tsv" "the train manifest (run stage 1)"
    else
        for fold in ${folds}; do need_file "${data}/fold${fold}/train.tsv" "the fold ${fold} train manifest (run stage 1)"; done
    fi
    overrides="upstream=${upstream},device=${device},data.train_manifest=${fold_data}/train.tsv"
    [ "${with_dev}" = no ] || overrides="${overrides},data.dev_manifest=${fold_data}/dev.tsv"
    splits=()
    for split in ${eval_splits}; do splits+=("eval.${split}.manifest=${fold_data}/${split}.tsv"); done
    speechprompt compare --config "${recipe}/conf/compare.yaml" --out "${exp}/compare" --seeds "${seeds}" \
        --jobs "${jobs}" --methods "${methods// /,}" "overrides=[${overrides}]" "${splits[@]}"
    log "results: ${exp}/compare/results.md (per run: ${exp}/compare/<method>/.../seed<S>/)"
fi
