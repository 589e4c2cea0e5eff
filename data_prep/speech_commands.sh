#!/usr/bin/env bash
# Google Speech Commands v1 (12 classes) -> OUT/{train,dev,test}.tsv + .labels + summary.json.
# A thin wrapper of `speechprompt prepare-dataset speech_commands`; the logic is in speechprompt/data_prep/datasets/.
set -euo pipefail
usage="Usage: $0 ROOT OUT [KEY=VALUE ...]  (layout and options: speechprompt prepare-dataset speech_commands --help)"
case "${1:-}" in -h|--help) echo "${usage}"; exit 0 ;; esac
[ $# -ge 2 ] || { echo "${usage}" >&2; exit 2; }
exec speechprompt prepare-dataset speech_commands --root "$1" --out "$2" "${@:3}"
