#!/usr/bin/env bash
# IEMOCAP 4-class emotion recognition, one leave-one-session-out fold (SUPERB ER) -> OUT/<split>.tsv + .labels + summary.json.
# A thin wrapper of `speechprompt prepare-dataset iemocap`; the logic is in speechprompt/data_prep/datasets/.
set -euo pipefail
usage="Usage: $0 ROOT OUT [KEY=VALUE ...]  (layout and options: speechprompt prepare-dataset iemocap --help)"
case "${1:-}" in -h|--help) echo "${usage}"; exit 0 ;; esac
[ $# -ge 2 ] || { echo "${usage}" >&2; exit 2; }
exec speechprompt prepare-dataset iemocap --root "$1" --out "$2" "${@:3}"
